//! The estimate files: `att.csv` and `path.csv` (formats in `docs/formats.md`).

use std::io::Write;
use std::path::Path;

use crate::{DidError, Profile, Result};

/// Header of `att.csv`.
pub const ATT_HEADER: &str =
    "cohort,checkpoint,event_time,estimate,std_error,ci_lower,ci_upper,band_lower,band_upper,n_treated,n_control";
/// Header of `path.csv`.
pub const PATH_HEADER: &str = "event_time,estimate,std_error,ci_lower,ci_upper,band_lower,band_upper";

/// Writes `att.csv`: one row per cell, cohort and checkpoint as steps, event time in checkpoint indices.
pub fn write_att_csv(profile: &Profile, w: &mut dyn Write) -> std::io::Result<()> {
    writeln!(w, "{ATT_HEADER}")?;
    for c in &profile.cells {
        writeln!(
            w,
            "{},{},{},{},{},{},{},{},{},{},{}",
            c.cohort,
            c.checkpoint,
            c.event_time,
            c.estimate,
            c.std_error,
            c.ci_lower,
            c.ci_upper,
            c.band_lower,
            c.band_upper,
            c.n_treated,
            c.n_control
        )?;
    }
    Ok(())
}

/// Writes `path.csv`.
pub fn write_path_csv(profile: &Profile, w: &mut dyn Write) -> std::io::Result<()> {
    writeln!(w, "{PATH_HEADER}")?;
    for p in &profile.path {
        writeln!(
            w,
            "{},{},{},{},{},{},{}",
            p.event_time, p.estimate, p.std_error, p.ci_lower, p.ci_upper, p.band_lower, p.band_upper
        )?;
    }
    Ok(())
}

/// One row of an `att.csv` read back.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct AttRow {
    /// Cohort step.
    pub cohort: u64,
    /// Checkpoint step.
    pub checkpoint: u64,
    /// Event time in checkpoint indices.
    pub event_time: i64,
    /// Point estimate.
    pub estimate: f64,
    /// Uniform band.
    pub band_lower: f64,
    /// Uniform band.
    pub band_upper: f64,
}

impl AttRow {
    /// A row from its values.
    pub fn new(cohort: u64, checkpoint: u64, event_time: i64, estimate: f64, band_lower: f64, band_upper: f64) -> Self {
        Self { cohort, checkpoint, event_time, estimate, band_lower, band_upper }
    }

    /// Zero lies outside the band.
    pub fn is_significant(&self) -> bool {
        self.band_lower > 0.0 || self.band_upper < 0.0
    }
}

/// Reads an `att.csv` written by `memsteer profile`.
pub fn read_att_csv(path: &Path) -> Result<Vec<AttRow>> {
    let input = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| DidError::Estimates {
        input: input.clone(),
        line: 0,
        message: e.to_string(),
    })?;
    parse_att_csv(&text, &input)
}

/// Parses the text of an `att.csv`; `input` names it in errors.
pub fn parse_att_csv(text: &str, input: &str) -> Result<Vec<AttRow>> {
    let err = |line: usize, message: String| DidError::Estimates { input: input.into(), line, message };
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = match lines.next() {
        Some((_, h)) => h.trim().split(',').collect(),
        None => return Err(err(1, "empty file; expected an att.csv header".into())),
    };
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| err(1, format!("missing column `{name}`; expected the header {ATT_HEADER}")))
    };
    let idx = [
        col("cohort")?,
        col("checkpoint")?,
        col("event_time")?,
        col("estimate")?,
        col("band_lower")?,
        col("band_upper")?,
    ];
    let mut rows = Vec::new();
    for (i, line) in lines {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.trim().split(',').collect();
        if f.len() != header.len() {
            return Err(err(line_no, format!("expected {} fields like the header, found {}", header.len(), f.len())));
        }
        let int = |j: usize, what: &str| {
            f[idx[j]]
                .parse::<i64>()
                .map_err(|_| err(line_no, format!("{what}: expected an integer, found {:?}", f[idx[j]])))
        };
        let num = |j: usize, what: &str| {
            f[idx[j]]
                .parse::<f64>()
                .map_err(|_| err(line_no, format!("{what}: expected a number, found {:?}", f[idx[j]])))
        };
        let cohort = int(0, "cohort")?;
        let checkpoint = int(1, "checkpoint")?;
        if cohort < 0 || checkpoint < 0 {
            return Err(err(line_no, "cohort and checkpoint must be non-negative steps".into()));
        }
        rows.push(AttRow {
            cohort: cohort as u64,
            checkpoint: checkpoint as u64,
            event_time: int(2, "event_time")?,
            estimate: num(3, "estimate")?,
            band_lower: num(4, "band_lower")?,
            band_upper: num(5, "band_upper")?,
        });
    }
    if rows.is_empty() {
        return Err(err(2, "no cells after the header".into()));
    }
    Ok(rows)
}
