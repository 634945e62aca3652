//! The HMM figures of `cargo xtask reproduce hmm`, from the `memsteer-hmm` library.

use anyhow::{Context, Result};
use memsteer_hmm::theorem2::Theorem2Config;

/// The HMM figures of `cargo xtask reproduce`: the Theorem 2 illustration and estimator vs truth on a
/// synthetic training run, without and with a shifted validation set. Returns the files written.
pub fn reproduce_figures(out: &std::path::Path, quick: bool) -> Result<Vec<std::path::PathBuf>> {
    use memsteer_did::{Estimator, NoProgress, ProfileConfig};
    use memsteer_hmm::simulate::{SimulationConfig, simulate};
    use std::collections::HashMap;

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files = Vec::new();
    let ill = memsteer_hmm::theorem2::illustrate(&Theorem2Config::default(), 2)?;
    files.extend(memsteer_plot::theorem2_figures(out, &ill)?);
    let sizes = if quick { vec![10, 30, 100, 300, 1000] } else { vec![10, 30, 100, 300, 1000, 3000] };
    let curve = memsteer_hmm::theorem2::learn_steers(&memsteer_hmm::theorem2::LearnConfig {
        model: Theorem2Config { seed: 1, ..Theorem2Config::default() },
        sample_sizes: sizes,
        steps: 100,
        ..Default::default()
    })?;
    files.extend(memsteer_plot::learned_steer_figures(out, &curve)?);

    for (name, shift, title) in [
        ("estimator-vs-truth", 0.0, "Synthetic training run: estimates vs exact counterfactual memorisation"),
        ("estimator-vs-truth-shifted", 0.2, "Shifted validation set (parallel trends violated): estimates vs truth"),
    ] {
        let cfg = SimulationConfig {
            seed: 1,
            validation_shift: shift,
            replicates: if quick { 4 } else { 16 },
            ..SimulationConfig::default()
        };
        let sim = simulate(&cfg)?;
        let estimate = |estimator| -> Result<memsteer_did::Profile> {
            let settings = ProfileConfig::default()
                .with_estimator(estimator)
                .with_bootstrap(0)
                .with_min_cohort_size(1)
                .validate()?;
            Ok(memsteer_did::estimate(&sim.panel, &settings, &NoProgress)?)
        };
        let (did, difference) = (estimate(Estimator::Did)?, estimate(Estimator::Difference)?);
        // The true path: cohort-size weighted τ(g, g + e), as the estimated path weights cells.
        let steps = sim.panel.grid().steps().to_vec();
        let index: HashMap<u64, usize> = steps.iter().enumerate().map(|(i, &s)| (s, i)).collect();
        let mut sizes: HashMap<usize, f64> = HashMap::new();
        for c in sim.panel.cohorts() {
            if let Some(g) = c.index() {
                *sizes.entry(g).or_default() += 1.0;
            }
        }
        let mut acc: std::collections::BTreeMap<i64, (f64, f64)> = std::collections::BTreeMap::new();
        for t in &sim.truth {
            let (g, c) = (index[&t.cohort_step], index[&t.checkpoint_step]);
            let n = sizes.get(&g).copied().unwrap_or(0.0);
            let entry = acc.entry(c as i64 - g as i64).or_default();
            entry.0 += n * t.tau;
            entry.1 += n;
        }
        let truth: Vec<(i64, f64)> =
            acc.into_iter().filter(|(_, (_, n))| *n > 0.0).map(|(e, (s, n))| (e, s / n)).collect();
        let alpha = ProfileConfig::default().alpha;
        files.extend(memsteer_plot::estimator_vs_truth_figures(
            out,
            name,
            title,
            &truth,
            &did.path,
            &difference.path,
            alpha,
        )?);
    }
    Ok(files)
}
