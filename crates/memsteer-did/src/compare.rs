//! Correlation between memorisation profiles (e.g. of models of different sizes).

use std::collections::HashMap;

use crate::io::AttRow;

/// Which shared post-treatment cells enter the correlation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CompareCells {
    /// All shared post-treatment cells (what the paper's Figure 6 used).
    #[default]
    All,
    /// Only cells significant in both profiles.
    Significant,
}

/// A Pearson correlation and the number of cells behind it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct Correlation {
    /// Pearson's r (NaN with fewer than two cells or no variation).
    pub r: f64,
    /// Cells used.
    pub n: usize,
}

/// Pearson correlation of two profiles over their shared post-treatment (cohort, checkpoint) cells.
///
/// ```
/// use memsteer_did::{compare::{profile_correlation, CompareCells}, io::AttRow};
/// let row = |g, c, y: f64| AttRow::new(g, c, 0, y, y - 1.0, y + 1.0);
/// let a = [row(1, 1, 1.0), row(2, 2, 2.0), row(3, 3, 3.0)];
/// let b = [row(1, 1, 2.0), row(2, 2, 4.0), row(3, 3, 6.5)];
/// let r = profile_correlation(&a, &b, CompareCells::All);
/// assert_eq!(r.n, 3);
/// assert!(r.r > 0.99);
/// ```
pub fn profile_correlation(a: &[AttRow], b: &[AttRow], cells: CompareCells) -> Correlation {
    let index: HashMap<(u64, u64), &AttRow> =
        b.iter().filter(|r| r.event_time >= 0).map(|r| ((r.cohort, r.checkpoint), r)).collect();
    let pairs: Vec<(f64, f64)> = a
        .iter()
        .filter(|r| r.event_time >= 0)
        .filter_map(|r| index.get(&(r.cohort, r.checkpoint)).map(|s| (r, *s)))
        .filter(|(r, s)| cells == CompareCells::All || (r.is_significant() && s.is_significant()))
        .map(|(r, s)| (r.estimate, s.estimate))
        .collect();
    Correlation { r: pearson(&pairs), n: pairs.len() }
}

fn pearson(pairs: &[(f64, f64)]) -> f64 {
    let n = pairs.len() as f64;
    if pairs.len() < 2 {
        return f64::NAN;
    }
    let mx = pairs.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for &(x, y) in pairs {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}
