//! The in-memory panel.

use std::io::Write;
use std::path::Path;

use crate::{CheckpointGrid, Cohort, PanelError, Result};

/// A balanced panel: one outcome per (instance, checkpoint), with each instance's treatment step.
///
/// Outcomes are stored row-major, `instances × checkpoints`, in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    grid: CheckpointGrid,
    ids: Vec<String>,
    treatment: Vec<Option<u64>>,
    cohorts: Vec<Cohort>,
    outcomes: Vec<f64>,
}

impl Panel {
    /// Builds a panel from instance ids, treatment steps (`None` = never trained) and row-major outcomes.
    ///
    /// Errors when shapes disagree, an id repeats, an outcome is not finite, or a treatment step lies
    /// after the last checkpoint.
    pub fn new(
        grid: CheckpointGrid,
        ids: Vec<String>,
        treatment: Vec<Option<u64>>,
        outcomes: Vec<f64>,
    ) -> Result<Self> {
        let n = ids.len();
        let c = grid.len();
        if treatment.len() != n {
            return Err(PanelError::ShapeMismatch {
                what: "treatment steps (one per instance id)",
                expected: n,
                found: treatment.len(),
            });
        }
        match n.checked_mul(c) {
            Some(cells) if cells == outcomes.len() => {}
            cells => {
                return Err(PanelError::ShapeMismatch {
                    what: "outcomes (instances × checkpoints)",
                    expected: cells.unwrap_or(usize::MAX),
                    found: outcomes.len(),
                });
            }
        }
        if let Some(pos) = outcomes.iter().position(|y| !y.is_finite()) {
            return Err(PanelError::NonFiniteOutcome {
                instance: ids[pos / c].clone(),
                checkpoint: grid.step(pos % c),
                value: outcomes[pos],
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(n);
        for id in &ids {
            if !seen.insert(id.as_str()) {
                return Err(PanelError::DuplicateId(id.clone()));
            }
        }
        let mut cohorts = Vec::with_capacity(n);
        for (id, t) in ids.iter().zip(&treatment) {
            cohorts.push(match t {
                None => Cohort::Never,
                Some(t) => match grid.cohort_of(*t) {
                    Some(g) => Cohort::Treated(g),
                    None => {
                        return Err(PanelError::TreatmentAfterLastCheckpoint {
                            input: "panel".into(),
                            instance: id.clone(),
                            treatment: *t,
                            last_checkpoint: grid.last_step(),
                        });
                    }
                },
            });
        }
        Ok(Self { grid, ids, treatment, cohorts, outcomes })
    }

    /// Internal constructor for readers that have already validated everything.
    pub(crate) fn from_parts(
        grid: CheckpointGrid,
        ids: Vec<String>,
        treatment: Vec<Option<u64>>,
        cohorts: Vec<Cohort>,
        outcomes: Vec<f64>,
    ) -> Self {
        debug_assert_eq!(outcomes.len(), ids.len() * grid.len());
        Self { grid, ids, treatment, cohorts, outcomes }
    }

    /// The checkpoint grid.
    pub fn grid(&self) -> &CheckpointGrid {
        &self.grid
    }

    /// Number of instances.
    pub fn n_instances(&self) -> usize {
        self.ids.len()
    }

    /// Number of checkpoints.
    pub fn n_checkpoints(&self) -> usize {
        self.grid.len()
    }

    /// Id of instance `i`.
    pub fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    /// All instance ids.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Treatment step of instance `i` (`None` = never trained).
    pub fn treatment_step(&self, i: usize) -> Option<u64> {
        self.treatment[i]
    }

    /// Cohort of instance `i`.
    pub fn cohort(&self, i: usize) -> Cohort {
        self.cohorts[i]
    }

    /// Cohorts of all instances.
    pub fn cohorts(&self) -> &[Cohort] {
        &self.cohorts
    }

    /// Outcomes of instance `i` across the grid.
    pub fn outcomes(&self, i: usize) -> &[f64] {
        let c = self.grid.len();
        &self.outcomes[i * c..(i + 1) * c]
    }

    /// All outcomes, row-major `instances × checkpoints`.
    pub fn outcome_matrix(&self) -> &[f64] {
        &self.outcomes
    }

    /// Keeps only the instances for which `keep` returns true.
    pub fn retain_instances(&mut self, mut keep: impl FnMut(usize, &str, Cohort) -> bool) -> usize {
        let c = self.grid.len();
        let mut write = 0;
        let n = self.ids.len();
        for read in 0..n {
            if keep(read, &self.ids[read], self.cohorts[read]) {
                if write != read {
                    self.ids.swap(write, read);
                    self.treatment[write] = self.treatment[read];
                    self.cohorts[write] = self.cohorts[read];
                    self.outcomes.copy_within(read * c..(read + 1) * c, write * c);
                }
                write += 1;
            }
        }
        self.ids.truncate(write);
        self.treatment.truncate(write);
        self.cohorts.truncate(write);
        self.outcomes.truncate(write * c);
        n - write
    }

    /// Writes the panel in the long CSV format (`instance_id,treatment_step,checkpoint_step,outcome`),
    /// atomically: to a temporary file next to `path`, then renamed.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        write_atomic(path, |w| self.write_csv_to(w))
    }

    /// Writes the panel by extension: Parquet for `.parquet` (feature `parquet`), long CSV otherwise.
    pub fn write(&self, path: &Path) -> Result<()> {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
            #[cfg(feature = "parquet")]
            return crate::read::write_parquet(self, path);
            #[cfg(not(feature = "parquet"))]
            return Err(PanelError::FeatureDisabled {
                path: path.to_path_buf(),
                action: "write",
                format: "Parquet",
                feature: "parquet",
            });
        }
        self.write_csv(path)
    }

    /// Writes the long CSV format to any writer.
    pub fn write_csv_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        writeln!(w, "instance_id,treatment_step,checkpoint_step,outcome")?;
        for i in 0..self.n_instances() {
            let id = csv_field(&self.ids[i]);
            let t = match self.treatment[i] {
                Some(t) => t.to_string(),
                None => "never".to_string(),
            };
            for (c, y) in self.outcomes(i).iter().enumerate() {
                // `{:?}` prints the shortest representation that round-trips exactly.
                writeln!(w, "{id},{t},{},{y:?}", self.grid.step(c))?;
            }
        }
        Ok(())
    }
}

fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")).into() } else { s.into() }
}

/// Writes a file durably and atomically ([`crate::durable::write`]): a temporary file beside `path`,
/// `fsync`ed, renamed onto `path`, the directory `fsync`ed.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    crate::durable::write(path, fill).map_err(|source| PanelError::Io {
        action: "writing",
        path: path.to_path_buf(),
        source,
    })
}
