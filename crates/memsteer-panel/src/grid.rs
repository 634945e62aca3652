//! Checkpoint grids and cohorts.

use crate::{PanelError, Result};

/// The sorted optimizer steps at which checkpoints were evaluated (any spacing, e.g. Pythia's
/// `0, 1, 2, 4, …, 512, 1000, 2000, …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointGrid {
    steps: Vec<u64>,
}

impl CheckpointGrid {
    /// Builds a grid from strictly increasing steps.
    ///
    /// ```
    /// use memsteer_panel::CheckpointGrid;
    /// let grid = CheckpointGrid::new(vec![0, 1000, 2000]).unwrap();
    /// assert_eq!(grid.cohort_of(1), Some(1)); // trained at step 1 → first seen by checkpoint 1000
    /// assert_eq!(grid.cohort_of(2000), Some(2));
    /// assert_eq!(grid.cohort_of(2001), None);
    /// ```
    pub fn new(steps: Vec<u64>) -> Result<Self> {
        if steps.is_empty() {
            return Err(PanelError::Grid("no checkpoints".into()));
        }
        if let Some(w) = steps.windows(2).find(|w| w[0] >= w[1]) {
            return Err(PanelError::Grid(format!("steps must be strictly increasing, found {} before {}", w[0], w[1])));
        }
        Ok(Self { steps })
    }

    /// The checkpoint steps.
    pub fn steps(&self) -> &[u64] {
        &self.steps
    }

    /// Number of checkpoints.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Always false: a grid holds at least one checkpoint.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Step of checkpoint `index`.
    pub fn step(&self, index: usize) -> u64 {
        self.steps[index]
    }

    /// The last checkpoint step.
    pub fn last_step(&self) -> u64 {
        self.steps[self.steps.len() - 1]
    }

    /// Index of the checkpoint at exactly `step`.
    pub fn index_of(&self, step: u64) -> Option<usize> {
        self.steps.binary_search(&step).ok()
    }

    /// The cohort of an instance trained at optimizer step `treatment_step`: the index of the first
    /// checkpoint whose step is `≥ treatment_step`, or `None` when it lies after the last checkpoint.
    pub fn cohort_of(&self, treatment_step: u64) -> Option<usize> {
        let i = self.steps.partition_point(|&s| s < treatment_step);
        (i < self.steps.len()).then_some(i)
    }
}

/// The treatment cohort of an instance: the checkpoint index at which it is first "treated"
/// (trained on), or never (validation instances).
///
/// Cohorts order by checkpoint index with `Never` last, the order estimators sweep them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cohort {
    /// First checkpoint index whose step is at or after the instance's treatment step.
    Treated(usize),
    /// Never trained on (validation instances).
    Never,
}

impl Cohort {
    /// The checkpoint index of a treated cohort.
    pub fn index(self) -> Option<usize> {
        match self {
            Cohort::Treated(g) => Some(g),
            Cohort::Never => None,
        }
    }
}
