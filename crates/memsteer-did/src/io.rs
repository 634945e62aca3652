//! The estimate files: `att.csv`, `path.csv`, `summary.json` and `diagnostics.json` (formats in
//! `docs/formats.md`), written together by [`write_outputs`].

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{Aggregate, CohortSummary, Diagnostics, DidError, Profile, ProfileConfig, Result};

/// How the panel was read, for `summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReadSummary {
    /// Data rows read.
    pub rows: usize,
    /// Distinct instances seen.
    pub instances_seen: usize,
    /// Instances dropped for lacking checkpoints.
    pub dropped_incomplete: usize,
    /// Instances dropped for being trained after the maximum step.
    pub dropped_after_max_step: usize,
    /// Instances dropped for having no checkpoint before their treatment.
    pub dropped_no_pre_period: usize,
    /// The maximum step the panel was cut at.
    pub max_step: Option<u64>,
    /// Whether outcomes were negated (a loss read as a log-probability).
    pub negated: bool,
}

/// What `summary.json` holds.
#[derive(Debug, Serialize)]
struct SummaryFile<'a> {
    memsteer_version: &'static str,
    format_version: u32,
    panel: &'a str,
    settings: &'a ProfileConfig,
    seed: u64,
    inference: &'static str,
    n_instances: usize,
    n_never_trained: usize,
    n_cohorts: usize,
    n_checkpoints: usize,
    n_cells: usize,
    n_significant_post_cells: usize,
    critical_value: f64,
    path_critical_value: f64,
    instantaneous: Option<Aggregate>,
    persistent: Option<Aggregate>,
    residual: Option<Aggregate>,
    per_cohort: &'a [CohortSummary],
    read: &'a ReadSummary,
}

fn write_file(path: PathBuf, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<PathBuf> {
    memsteer_panel::durable::write(&path, fill).map_err(|source| DidError::Io { path: path.clone(), source })?;
    Ok(path)
}

fn write_json(path: PathBuf, value: &impl Serialize) -> Result<PathBuf> {
    write_file(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value).map_err(std::io::Error::other)?;
        writeln!(w)
    })
}

/// Writes a profile's files into `dir` (created if missing), each atomically: `att.csv`, `path.csv`,
/// `summary.json` (the settings, counts, aggregates and how `panel` was read) and `diagnostics.json`
/// (the profile's diagnostics with the reader's `read_warnings` first). Returns the files and the
/// diagnostics as written.
pub fn write_outputs(
    dir: &Path,
    panel: &str,
    profile: &Profile,
    cfg: &ProfileConfig,
    (read, read_warnings): (&ReadSummary, &[String]),
) -> Result<(Vec<PathBuf>, Diagnostics)> {
    std::fs::create_dir_all(dir).map_err(|source| DidError::Io { path: dir.into(), source })?;
    let mut files = vec![
        write_file(dir.join("att.csv"), |w| write_att_csv(profile, w))?,
        write_file(dir.join("path.csv"), |w| write_path_csv(profile, w))?,
    ];
    files.push(write_json(dir.join("summary.json"), &summary_file(panel, profile, cfg, read))?);
    let diagnostics = diagnostics_with(profile, read_warnings);
    files.push(write_json(dir.join("diagnostics.json"), &diagnostics)?);
    Ok((files, diagnostics))
}

/// What `summary.json` holds, as JSON text (the file's content without its last newline).
pub fn summary_json(panel: &str, profile: &Profile, cfg: &ProfileConfig, read: &ReadSummary) -> String {
    serde_json::to_string_pretty(&summary_file(panel, profile, cfg, read))
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
}

fn summary_file<'a>(
    panel: &'a str,
    profile: &'a Profile,
    cfg: &'a ProfileConfig,
    read: &'a ReadSummary,
) -> SummaryFile<'a> {
    SummaryFile {
        memsteer_version: env!("CARGO_PKG_VERSION"),
        format_version: 1,
        panel,
        settings: cfg,
        seed: cfg.seed,
        inference: if cfg.bootstrap > 0 { "multiplier bootstrap" } else { "analytic" },
        n_instances: profile.n_instances,
        n_never_trained: profile.n_never,
        n_cohorts: profile.per_cohort.len(),
        n_checkpoints: profile.checkpoints.len(),
        n_cells: profile.cells.len(),
        n_significant_post_cells: profile.cells.iter().filter(|c| c.is_post() && c.is_significant()).count(),
        critical_value: profile.critical_value,
        path_critical_value: profile.path_critical_value,
        instantaneous: profile.instantaneous,
        persistent: profile.persistent,
        residual: profile.residual,
        per_cohort: &profile.per_cohort,
        read,
    }
}

/// The profile's diagnostics as `diagnostics.json` holds them: the reader's `read_warnings` first.
pub fn diagnostics_with(profile: &Profile, read_warnings: &[String]) -> Diagnostics {
    let mut diagnostics = profile.diagnostics.clone();
    diagnostics.warnings.splice(0..0, read_warnings.iter().cloned());
    diagnostics
}

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
