//! Readers for the long panel format and for statistics files people already have.
//!
//! The long CSV format has a header naming at least the four columns
//! `instance_id,treatment_step,checkpoint_step,outcome` (any order, other columns ignored) and one row
//! per (instance, checkpoint). `treatment_step` is the 1-based optimizer step whose batch held the
//! instance, or `never` / empty for never-trained (validation) instances. [`ReadOptions`] maps other
//! column names, decodes the `seq_idx` layout of released Pythia statistics, negates loss-like
//! outcomes and cuts the panel at a maximum step.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;

use crate::{CheckpointGrid, Cohort, Panel, PanelError, Result};

/// Names of the four columns the reader needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMap {
    /// Instance identifier column (default `instance_id`).
    pub instance: String,
    /// Treatment column (default `treatment_step`).
    pub treatment: String,
    /// Checkpoint step column (default `checkpoint_step`).
    pub checkpoint: String,
    /// Outcome column (default `outcome`).
    pub outcome: String,
}

impl Default for ColumnMap {
    fn default() -> Self {
        Self {
            instance: "instance_id".into(),
            treatment: "treatment_step".into(),
            checkpoint: "checkpoint_step".into(),
            outcome: "outcome".into(),
        }
    }
}

/// How the treatment column encodes when an instance was trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TreatmentEncoding {
    /// The optimizer step (1-based); `never` or empty for never-trained instances.
    #[default]
    Step,
    /// A sequence index as in the memorisation-profile paper's released Pythia statistics:
    /// `seq_idx > 0` was trained at step `ceil(seq_idx / batch_size)`, `seq_idx ≤ 0` is a validation
    /// sequence.
    FromSeqIdx {
        /// Sequences per optimizer step.
        batch_size: u64,
    },
}

/// What to do with instances that lack outcomes at some checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncompletePolicy {
    /// Fail with an error naming the first such instance.
    #[default]
    Error,
    /// Drop them and report how many were dropped.
    Drop,
}

/// Options of [`read_csv`] / [`parse_csv`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadOptions {
    /// Column names.
    pub columns: ColumnMap,
    /// Encoding of the treatment column.
    pub treatment: TreatmentEncoding,
    /// Multiply outcomes by −1 (for losses / surprisals, so that memorisation is positive).
    pub negate: bool,
    /// Keep only checkpoints at or before this step, and drop instances trained after it.
    pub max_step: Option<u64>,
    /// Handling of instances with missing checkpoints.
    pub incomplete: IncompletePolicy,
}

/// What the reader did besides building the panel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadReport {
    /// Data rows read.
    pub rows: usize,
    /// Distinct instances seen.
    pub instances_seen: usize,
    /// Instances dropped because they lacked checkpoints (with [`IncompletePolicy::Drop`]).
    pub dropped_incomplete: usize,
    /// Instances dropped because they were trained after `max_step`.
    pub dropped_after_max_step: usize,
    /// Rows ignored because their checkpoint lies after `max_step`.
    pub rows_after_max_step: usize,
    /// Human-readable notes worth showing the user.
    pub warnings: Vec<String>,
}

/// Reads a long CSV panel from a file.
pub fn read_csv(path: &Path, options: &ReadOptions) -> Result<(Panel, ReadReport)> {
    let bytes =
        std::fs::read(path).map_err(|source| PanelError::Io { action: "reading", path: path.to_path_buf(), source })?;
    parse_csv(&bytes, &path.display().to_string(), options)
}

/// Parses a long CSV panel held in memory; `source` names it in error messages.
pub fn parse_csv(bytes: &[u8], source: &str, options: &ReadOptions) -> Result<(Panel, ReadReport)> {
    Parser::new(bytes, source, options)?.run()
}

struct Columns {
    instance: usize,
    treatment: usize,
    checkpoint: usize,
    outcome: usize,
    count: usize,
    names: Vec<String>,
}

struct Parser<'a> {
    source: &'a str,
    options: &'a ReadOptions,
    body: &'a [u8],
    first_body_line: usize,
    cols: Columns,
}

/// One instance as collected while scanning.
struct Instance {
    first_line: usize,
    treatment: Option<u64>,
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Splits one CSV line into fields, honouring double quotes. Returns the number of fields.
fn split_fields<'b>(line: &'b [u8], out: &mut Vec<std::borrow::Cow<'b, [u8]>>) {
    out.clear();
    if !line.contains(&b'"') {
        out.extend(line.split(|&b| b == b',').map(std::borrow::Cow::Borrowed));
        return;
    }
    let mut field = Vec::new();
    let mut in_quotes = false;
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if in_quotes {
            if b == b'"' {
                if line.get(i + 1) == Some(&b'"') {
                    field.push(b'"');
                    i += 1;
                } else {
                    in_quotes = false;
                }
            } else {
                field.push(b);
            }
        } else if b == b'"' {
            in_quotes = true;
        } else if b == b',' {
            out.push(std::mem::take(&mut field).into());
        } else {
            field.push(b);
        }
        i += 1;
    }
    out.push(field.into());
}

fn show(value: &[u8]) -> String {
    let s = String::from_utf8_lossy(value);
    if s.chars().count() > 40 { format!("{}…", s.chars().take(40).collect::<String>()) } else { s.into_owned() }
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8], source: &'a str, options: &'a ReadOptions) -> Result<Self> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let (header, body) = match bytes.iter().position(|&b| b == b'\n') {
            Some(p) => (&bytes[..p], &bytes[p + 1..]),
            None => (bytes, &bytes[bytes.len()..]),
        };
        let header = trim_cr(header);
        if header.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(PanelError::Empty {
                input: source.into(),
                what: "the file is empty; expected a header line such as instance_id,treatment_step,checkpoint_step,outcome".into(),
            });
        }
        let mut fields = Vec::new();
        split_fields(header, &mut fields);
        let names: Vec<String> = fields.iter().map(|f| String::from_utf8_lossy(f).trim().to_string()).collect();
        let find = |name: &str, role: &'static str| {
            names.iter().position(|n| n == name).ok_or_else(|| PanelError::MissingColumn {
                input: source.into(),
                column: name.into(),
                role,
                available: names.join(","),
            })
        };
        let m = &options.columns;
        let cols = Columns {
            instance: find(&m.instance, "instance id")?,
            treatment: find(&m.treatment, "treatment step")?,
            checkpoint: find(&m.checkpoint, "checkpoint step")?,
            outcome: find(&m.outcome, "outcome")?,
            count: names.len(),
            names,
        };
        Ok(Self { source, options, body, first_body_line: 2, cols })
    }

    fn field_error(&self, line: usize, col: usize, value: &[u8], expected: &str) -> PanelError {
        PanelError::Field {
            input: self.source.into(),
            line,
            column: self.cols.names[col].clone(),
            value: show(value),
            expected: expected.into(),
        }
    }

    fn parse_step(&self, line: usize, col: usize, v: &[u8]) -> Result<u64> {
        let s = std::str::from_utf8(v).unwrap_or("").trim();
        if let Ok(x) = s.parse::<u64>() {
            return Ok(x);
        }
        // Accept integral floats such as "1000.0" written by pandas.
        if let Ok(x) = s.parse::<f64>()
            && x.is_finite()
            && x >= 0.0
            && x.fract() == 0.0
            && x < 9.0e15
        {
            return Ok(x as u64);
        }
        let expected = if s.starts_with('-') { "a non-negative integer step" } else { "an integer step" };
        Err(self.field_error(line, col, v, expected))
    }

    fn parse_treatment(&self, line: usize, v: &[u8]) -> Result<Option<u64>> {
        let col = self.cols.treatment;
        let s = std::str::from_utf8(v).unwrap_or("\u{fffd}").trim();
        match self.options.treatment {
            TreatmentEncoding::Step => {
                if s.is_empty() || s.eq_ignore_ascii_case("never") {
                    return Ok(None);
                }
                let step = self.parse_step(line, col, v).map_err(|_| {
                    self.field_error(
                        line,
                        col,
                        v,
                        "a non-negative integer optimizer step, `never` or empty (never trained)",
                    )
                })?;
                if step == 0 {
                    return Err(self.field_error(
                        line,
                        col,
                        v,
                        "a 1-based optimizer step (the step whose batch held the instance), `never` or empty",
                    ));
                }
                Ok(Some(step))
            }
            TreatmentEncoding::FromSeqIdx { batch_size } => {
                let idx: i64 = s
                    .parse()
                    .or_else(|_| match s.parse::<f64>() {
                        Ok(x) if x.is_finite() && x.fract() == 0.0 => Ok(x as i64),
                        _ => Err(()),
                    })
                    .map_err(|()| {
                        self.field_error(line, col, v, "an integer sequence index (> 0 trained, ≤ 0 validation)")
                    })?;
                if idx <= 0 { Ok(None) } else { Ok(Some((idx as u64).div_ceil(batch_size))) }
            }
        }
    }

    fn parse_outcome(&self, line: usize, v: &[u8]) -> Result<f64> {
        let col = self.cols.outcome;
        let s = std::str::from_utf8(v).unwrap_or("\u{fffd}").trim();
        match s.parse::<f64>() {
            Ok(y) if y.is_finite() => Ok(if self.options.negate { -y } else { y }),
            Ok(_) => Err(self.field_error(line, col, v, "a finite number")),
            Err(_) => Err(self.field_error(line, col, v, "a number")),
        }
    }

    fn run(self) -> Result<(Panel, ReadReport)> {
        if let TreatmentEncoding::FromSeqIdx { batch_size: 0 } = self.options.treatment {
            return Err(PanelError::Invalid("--treatment-from-seq-idx needs a batch size ≥ 1".into()));
        }
        let mut report = ReadReport::default();
        let mut index: HashMap<&'a [u8], u32> = HashMap::new();
        let mut owned_index: HashMap<Vec<u8>, u32> = HashMap::new();
        let mut instances: Vec<Instance> = Vec::new();
        let mut ids: Vec<String> = Vec::new();
        // Rows as (instance, checkpoint step, outcome, line).
        let mut rows: Vec<(u32, u64, f64, u32)> = Vec::new();
        let mut steps: HashMap<u64, ()> = HashMap::new();
        let mut fields = Vec::with_capacity(self.cols.count);
        let mut last: Option<(&'a [u8], u32)> = None;
        let max_step = self.options.max_step;

        let mut line_no = self.first_body_line - 1;
        for raw in self.body.split(|&b| b == b'\n') {
            line_no += 1;
            let line = trim_cr(raw);
            if line.is_empty() {
                continue;
            }
            split_fields(line, &mut fields);
            if fields.len() != self.cols.count {
                return Err(PanelError::FieldCount {
                    input: self.source.into(),
                    line: line_no,
                    expected: self.cols.count,
                    found: fields.len(),
                });
            }
            report.rows += 1;
            let id_bytes = &fields[self.cols.instance];
            if id_bytes.is_empty() {
                return Err(self.field_error(line_no, self.cols.instance, b"", "a non-empty instance id"));
            }
            let step = self.parse_step(line_no, self.cols.checkpoint, &fields[self.cols.checkpoint])?;
            let outcome = self.parse_outcome(line_no, &fields[self.cols.outcome])?;
            let treatment = self.parse_treatment(line_no, &fields[self.cols.treatment])?;

            // Intern the instance id; rows of one instance are usually adjacent.
            let inst = match (&last, id_bytes) {
                (Some((prev, i)), std::borrow::Cow::Borrowed(b)) if *prev == *b => *i,
                _ => {
                    let next = instances.len() as u32;
                    let (i, is_new) = match id_bytes {
                        std::borrow::Cow::Borrowed(b) => match index.entry(b) {
                            Entry::Occupied(e) => (*e.get(), false),
                            Entry::Vacant(e) => (*e.insert(next), true),
                        },
                        std::borrow::Cow::Owned(b) => match owned_index.entry(b.clone()) {
                            Entry::Occupied(e) => (*e.get(), false),
                            Entry::Vacant(e) => (*e.insert(next), true),
                        },
                    };
                    if is_new {
                        instances.push(Instance { first_line: line_no, treatment });
                        ids.push(String::from_utf8_lossy(id_bytes).into_owned());
                    }
                    if let std::borrow::Cow::Borrowed(b) = id_bytes {
                        last = Some((b, i));
                    } else {
                        last = None;
                    }
                    i
                }
            };
            let info = &instances[inst as usize];
            if info.treatment != treatment {
                let fmt = |t: Option<u64>| t.map_or("never".to_string(), |t| t.to_string());
                return Err(PanelError::ConflictingTreatment {
                    input: self.source.into(),
                    line: line_no,
                    first_line: info.first_line,
                    instance: ids[inst as usize].clone(),
                    first: fmt(info.treatment),
                    second: fmt(treatment),
                });
            }
            if max_step.is_some_and(|m| step > m) {
                report.rows_after_max_step += 1;
                continue;
            }
            steps.insert(step, ());
            rows.push((inst, step, outcome, line_no as u32));
        }
        report.instances_seen = instances.len();
        if rows.is_empty() {
            return Err(PanelError::Empty {
                input: self.source.into(),
                what: if report.rows == 0 {
                    "no data rows after the header".into()
                } else {
                    format!("no rows at or before --max-step {}", max_step.unwrap_or(0))
                },
            });
        }
        let mut steps: Vec<u64> = steps.into_keys().collect();
        steps.sort_unstable();
        let grid = CheckpointGrid::new(steps)?;
        let c = grid.len();
        let n = instances.len();
        let mut outcomes = vec![0.0f64; n * c];
        let mut filled = vec![0u32; n * c]; // line number of the row that filled a cell, 0 = empty
        // Map steps to indices through a hash map: the grid is small, rows are many.
        let step_index: HashMap<u64, usize> = grid.steps().iter().enumerate().map(|(i, &s)| (s, i)).collect();
        let mut last_step = (u64::MAX, 0usize);
        for &(inst, step, y, line) in &rows {
            let ci = if last_step.0 == step {
                last_step.1
            } else {
                let ci = step_index[&step];
                last_step = (step, ci);
                ci
            };
            let cell = inst as usize * c + ci;
            if filled[cell] != 0 {
                return Err(PanelError::Duplicate {
                    input: self.source.into(),
                    line: line as usize,
                    first_line: filled[cell] as usize,
                    instance: ids[inst as usize].clone(),
                    checkpoint: step,
                });
            }
            filled[cell] = line;
            outcomes[cell] = y;
        }
        drop(rows);

        // Completeness, cohorts and the max-step cut.
        let mut keep = vec![true; n];
        let mut cohorts = Vec::with_capacity(n);
        for i in 0..n {
            let row = &filled[i * c..(i + 1) * c];
            let missing = row.iter().filter(|&&l| l == 0).count();
            if missing > 0 {
                match self.options.incomplete {
                    IncompletePolicy::Error => {
                        let first_missing = row.iter().position(|&l| l == 0).unwrap_or(0);
                        return Err(PanelError::Incomplete {
                            input: self.source.into(),
                            instance: ids[i].clone(),
                            missing,
                            total: c,
                            example_step: grid.step(first_missing),
                        });
                    }
                    IncompletePolicy::Drop => {
                        keep[i] = false;
                        report.dropped_incomplete += 1;
                        cohorts.push(Cohort::Never);
                        continue;
                    }
                }
            }
            let cohort = match instances[i].treatment {
                None => Cohort::Never,
                Some(t) => match grid.cohort_of(t) {
                    Some(g) => Cohort::Treated(g),
                    None if max_step.is_some() => {
                        keep[i] = false;
                        report.dropped_after_max_step += 1;
                        Cohort::Never
                    }
                    None => {
                        return Err(PanelError::TreatmentAfterLastCheckpoint {
                            input: self.source.into(),
                            instance: ids[i].clone(),
                            treatment: t,
                            last_checkpoint: grid.last_step(),
                        });
                    }
                },
            };
            cohorts.push(cohort);
        }
        drop(filled);
        let treatment: Vec<Option<u64>> = instances.iter().map(|x| x.treatment).collect();
        let mut panel = Panel::from_parts(grid, ids, treatment, cohorts, outcomes);
        if keep.iter().any(|k| !k) {
            panel.retain_instances(|i, _, _| keep[i]);
        }
        if report.dropped_incomplete > 0 {
            report.warnings.push(format!(
                "dropped {} of {} instances that lack outcomes at some checkpoints (--drop-incomplete)",
                report.dropped_incomplete, report.instances_seen
            ));
        }
        if report.dropped_after_max_step > 0 {
            report.warnings.push(format!(
                "dropped {} instances trained after --max-step {}",
                report.dropped_after_max_step,
                max_step.unwrap_or(0)
            ));
        }
        if panel.n_instances() == 0 {
            return Err(PanelError::Empty {
                input: self.source.into(),
                what: "no instances left after dropping incomplete ones".into(),
            });
        }
        Ok((panel, report))
    }
}
