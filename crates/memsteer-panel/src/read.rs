//! Readers for the long panel format and for statistics files people already have.
//!
//! The long CSV format has a header naming at least the four columns
//! `instance_id,treatment_step,checkpoint_step,outcome` (any order, other columns ignored) and one row
//! per (instance, checkpoint). `treatment_step` is the 1-based optimizer step whose batch held the
//! instance, or `never` / empty for never-trained (validation) instances. [`ReadOptions`] maps other
//! column names, decodes the `seq_idx` layout of released Pythia statistics, negates loss-like
//! outcomes and cuts the panel at a maximum step.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;

use crate::{CheckpointGrid, Cohort, Location, Panel, PanelError, Result};

/// Names of the four columns the reader needs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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

impl ColumnMap {
    /// The four column names.
    pub fn new(
        instance: impl Into<String>,
        treatment: impl Into<String>,
        checkpoint: impl Into<String>,
        outcome: impl Into<String>,
    ) -> Self {
        Self {
            instance: instance.into(),
            treatment: treatment.into(),
            checkpoint: checkpoint.into(),
            outcome: outcome.into(),
        }
    }
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
#[non_exhaustive]
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
#[non_exhaustive]
pub enum IncompletePolicy {
    /// Fail with an error naming the first such instance.
    #[default]
    Error,
    /// Drop them and report how many were dropped.
    Drop,
}

/// Options of [`read_csv`] / [`parse_csv`]: start from [`ReadOptions::default`] and chain `with_*`.
///
/// ```
/// use memsteer_panel::read::{ColumnMap, ReadOptions, TreatmentEncoding};
/// let opts = ReadOptions::default()
///     .with_columns(ColumnMap::new("seq_idx", "seq_idx", "step", "sup_seq"))
///     .with_treatment(TreatmentEncoding::FromSeqIdx { batch_size: 1024 })
///     .with_negate(true);
/// assert!(opts.negate);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
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

impl ReadOptions {
    /// Sets [`ReadOptions::columns`].
    #[must_use]
    pub fn with_columns(mut self, columns: ColumnMap) -> Self {
        self.columns = columns;
        self
    }
    /// Sets [`ReadOptions::treatment`].
    #[must_use]
    pub fn with_treatment(mut self, treatment: TreatmentEncoding) -> Self {
        self.treatment = treatment;
        self
    }
    /// Sets [`ReadOptions::negate`].
    #[must_use]
    pub fn with_negate(mut self, negate: bool) -> Self {
        self.negate = negate;
        self
    }
    /// Sets [`ReadOptions::max_step`].
    #[must_use]
    pub fn with_max_step(mut self, max_step: Option<u64>) -> Self {
        self.max_step = max_step;
        self
    }
    /// Sets [`ReadOptions::incomplete`].
    #[must_use]
    pub fn with_incomplete(mut self, incomplete: IncompletePolicy) -> Self {
        self.incomplete = incomplete;
        self
    }
}

/// What the reader did besides building the panel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
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

/// Reads a panel file: Parquet when the name ends in `.parquet` (feature `parquet`), long CSV otherwise.
pub fn read_panel(path: &Path, options: &ReadOptions) -> Result<(Panel, ReadReport)> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
        #[cfg(feature = "parquet")]
        return parquet::read(path, options);
        #[cfg(not(feature = "parquet"))]
        return Err(PanelError::FeatureDisabled {
            path: path.to_path_buf(),
            action: "read",
            format: "Parquet",
            feature: "parquet",
        });
    }
    read_csv(path, options)
}

#[cfg(feature = "parquet")]
#[path = "read_parquet.rs"]
mod parquet;

#[cfg(feature = "parquet")]
pub(crate) use parquet::write as write_parquet;

#[cfg(feature = "parquet")]
pub use parquet::read_batches;

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

impl Columns {
    /// Finds the four columns in a header, or names the missing one and lists what is there.
    fn find(names: &[String], m: &ColumnMap, source: &str) -> Result<Self> {
        let find = |name: &str, role: &'static str| {
            names.iter().position(|n| n == name).ok_or_else(|| PanelError::MissingColumn {
                input: source.into(),
                column: name.into(),
                role,
                available: names.join(","),
            })
        };
        Ok(Columns {
            instance: find(&m.instance, "instance id")?,
            treatment: find(&m.treatment, "treatment step")?,
            checkpoint: find(&m.checkpoint, "checkpoint step")?,
            outcome: find(&m.outcome, "outcome")?,
            count: names.len(),
            names: names.to_vec(),
        })
    }
}

struct Parser<'a> {
    source: &'a str,
    options: &'a ReadOptions,
    body: &'a [u8],
    first_body_line: usize,
    cols: Columns,
    /// How positions are reported (`line` for CSV, `row` for Parquet).
    loc: fn(u32) -> Location,
}

/// One instance as collected while scanning.
struct Instance {
    first_line: usize,
    treatment: Option<u64>,
}

/// A run of adjacent rows with the same instance id, within one chunk.
struct LocalId<'a> {
    id: Cow<'a, [u8]>,
    first_line: usize,
    treatment: Option<u64>,
}

/// One parsed row; `local` indexes its chunk's [`LocalId`]s.
struct RawRow {
    local: u32,
    line: u32,
    step: u64,
    outcome: f64,
}

/// What one chunk of lines parses into.
struct Chunk<'a> {
    ids: Vec<LocalId<'a>>,
    rows: Vec<RawRow>,
    steps: FxHashSet<u64>,
    last_step: Option<u64>,
    rows_read: usize,
    rows_after_max_step: usize,
}

/// Splits `body` into about `parts` pieces that end at line boundaries.
fn split_lines(body: &[u8], parts: usize) -> Vec<&[u8]> {
    let target = (body.len() / parts.max(1)).max(1 << 16);
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() <= target {
            out.push(rest);
            break;
        }
        let cut = match rest[target..].iter().position(|&b| b == b'\n') {
            Some(p) => target + p + 1,
            None => rest.len(),
        };
        let (head, tail) = rest.split_at(cut);
        out.push(head);
        rest = tail;
    }
    if out.is_empty() {
        out.push(body);
    }
    out
}

/// A fast, non-cryptographic hasher (the multiply–rotate "Fx" hash) for ids and steps.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        }
        for &b in chunks.remainder() {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
}

type FxBuild = std::hash::BuildHasherDefault<FxHasher>;
type FxHashMap<K, V> = HashMap<K, V, FxBuild>;
type FxHashSet<K> = std::collections::HashSet<K, FxBuild>;

/// Line and row numbers past `u32::MAX` (a 4-billion-line file) saturate in messages.
fn sat(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Splits one CSV line into fields, honouring double quotes. Returns the number of fields.
fn split_fields<'b>(line: &'b [u8], out: &mut Vec<Cow<'b, [u8]>>) {
    out.clear();
    if !line.contains(&b'"') {
        out.extend(line.split(|&b| b == b',').map(Cow::Borrowed));
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
        let cols = Columns::find(&names, &options.columns, source)?;
        Ok(Self { source, options, body, first_body_line: 2, cols, loc: Location::Line })
    }

    fn check_options(&self) -> Result<()> {
        if let TreatmentEncoding::FromSeqIdx { batch_size: 0 } = self.options.treatment {
            return Err(PanelError::InvalidOption {
                option: "batch_size",
                message: "decoding a sequence index needs a batch size ≥ 1, found 0".into(),
            });
        }
        Ok(())
    }

    fn field_error(&self, line: usize, col: usize, value: &[u8], expected: &str) -> PanelError {
        PanelError::Field {
            input: self.source.into(),
            line: (self.loc)(sat(line)),
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

    /// Parses the rows of one chunk of the body (whole lines, starting at line `first_line`).
    fn parse_chunk(&self, chunk: &'a [u8], first_line: usize) -> Result<Chunk<'a>> {
        let mut out = Chunk {
            ids: Vec::new(),
            rows: Vec::with_capacity(chunk.len() / 32),
            steps: FxHashSet::default(),
            last_step: None,
            rows_read: 0,
            rows_after_max_step: 0,
        };
        let mut fields = Vec::with_capacity(self.cols.count);
        let mut line_no = first_line - 1;
        for raw in chunk.split(|&b| b == b'\n') {
            line_no += 1;
            let line = trim_cr(raw);
            if line.is_empty() {
                continue;
            }
            split_fields(line, &mut fields);
            if fields.len() != self.cols.count {
                return Err(PanelError::FieldCount {
                    input: self.source.into(),
                    line: (self.loc)(sat(line_no)),
                    expected: self.cols.count,
                    found: fields.len(),
                });
            }
            out.rows_read += 1;
            let id = &fields[self.cols.instance];
            if id.is_empty() {
                return Err(self.field_error(line_no, self.cols.instance, b"", "a non-empty instance id"));
            }
            if std::str::from_utf8(id).is_err() {
                return Err(self.field_error(line_no, self.cols.instance, id, "an instance id in UTF-8"));
            }
            let step = self.parse_step(line_no, self.cols.checkpoint, &fields[self.cols.checkpoint])?;
            let outcome = self.parse_outcome(line_no, &fields[self.cols.outcome])?;
            let treatment = self.parse_treatment(line_no, &fields[self.cols.treatment])?;
            let id = std::mem::take(&mut fields[self.cols.instance]);
            self.push_row(&mut out, line_no, id, treatment, step, outcome)?;
        }
        Ok(out)
    }

    /// Adds one parsed row to a chunk: local id runs, treatment consistency, the max-step cut.
    fn push_row(
        &self,
        out: &mut Chunk<'a>,
        line_no: usize,
        id: Cow<'a, [u8]>,
        treatment: Option<u64>,
        step: u64,
        outcome: f64,
    ) -> Result<()> {
        // Rows of one instance are usually adjacent: one local id per run of rows.
        let local = match out.ids.last() {
            Some(last) if last.id[..] == id[..] => out.ids.len() - 1,
            _ => {
                out.ids.push(LocalId { id, first_line: line_no, treatment });
                out.ids.len() - 1
            }
        };
        self.push_local(out, local, line_no, treatment, (step, outcome))
    }

    /// [`Self::push_row`] for an id that `own` makes owned only when it starts a new run of rows
    /// (record batches, whose buffers do not outlive the chunk).
    #[cfg(feature = "parquet")]
    pub(crate) fn push_row_with(
        &self,
        out: &mut Chunk<'a>,
        line_no: usize,
        (id, own): (&[u8], impl FnOnce() -> Cow<'a, [u8]>),
        treatment: Option<u64>,
        (step, outcome): (u64, f64),
    ) -> Result<()> {
        let local = match out.ids.last() {
            Some(last) if last.id[..] == *id => out.ids.len() - 1,
            _ => {
                out.ids.push(LocalId { id: own(), first_line: line_no, treatment });
                out.ids.len() - 1
            }
        };
        self.push_local(out, local, line_no, treatment, (step, outcome))
    }

    /// The treatment check, the max-step cut and the row itself, for the local id `local`.
    fn push_local(
        &self,
        out: &mut Chunk<'a>,
        local: usize,
        line_no: usize,
        treatment: Option<u64>,
        (step, outcome): (u64, f64),
    ) -> Result<()> {
        let entry = &out.ids[local];
        if entry.treatment != treatment {
            return Err(self.conflict(line_no, entry.first_line, &entry.id, entry.treatment, treatment));
        }
        if self.options.max_step.is_some_and(|m| step > m) {
            out.rows_after_max_step += 1;
            return Ok(());
        }
        if out.last_step != Some(step) {
            out.steps.insert(step);
            out.last_step = Some(step);
        }
        out.rows.push(RawRow { local: local as u32, line: sat(line_no), step, outcome });
        Ok(())
    }

    fn conflict(
        &self,
        line: usize,
        first_line: usize,
        id: &[u8],
        first: Option<u64>,
        second: Option<u64>,
    ) -> PanelError {
        let fmt = |t: Option<u64>| t.map_or("never".to_string(), |t| t.to_string());
        PanelError::ConflictingTreatment {
            input: self.source.into(),
            line: (self.loc)(sat(line)),
            first_line: (self.loc)(sat(first_line)),
            instance: String::from_utf8_lossy(id).into_owned(),
            first: fmt(first),
            second: fmt(second),
        }
    }

    fn run(self) -> Result<(Panel, ReadReport)> {
        self.check_options()?;

        // Split the body into chunks of whole lines and parse them in parallel; line numbers come from
        // a parallel count of the newlines before each chunk.
        let chunks = split_lines(self.body, 4 * rayon::current_num_threads());
        let newlines: Vec<usize> = chunks.par_iter().map(|c| c.iter().filter(|&&b| b == b'\n').count()).collect();
        let mut first_lines = Vec::with_capacity(chunks.len());
        let mut line = self.first_body_line;
        for n in &newlines {
            first_lines.push(line);
            line += n;
        }
        let parsed: Vec<Chunk<'a>> = chunks
            .par_iter()
            .zip(first_lines.par_iter())
            .map(|(chunk, &first)| self.parse_chunk(chunk, first))
            .collect::<Result<_>>()?;
        self.assemble(parsed)
    }

    /// Interns ids across chunks, builds the grid and the outcome matrix, and applies the policies.
    fn assemble(&self, parsed: Vec<Chunk<'_>>) -> Result<(Panel, ReadReport)> {
        let max_step = self.options.max_step;
        let mut report = ReadReport::default();

        // Intern instance ids across chunks, in file order.
        let mut index: FxHashMap<&[u8], u32> = FxHashMap::default();
        let mut instances: Vec<Instance> = Vec::new();
        let mut ids: Vec<String> = Vec::new();
        let mut global: Vec<Vec<u32>> = Vec::with_capacity(parsed.len());
        let mut steps: FxHashSet<u64> = FxHashSet::default();
        for chunk in &parsed {
            report.rows += chunk.rows_read;
            report.rows_after_max_step += chunk.rows_after_max_step;
            steps.extend(chunk.steps.iter().copied());
            let mut map = Vec::with_capacity(chunk.ids.len());
            for local in &chunk.ids {
                let next = instances.len() as u32;
                let i = *index.entry(&local.id[..]).or_insert(next);
                if i == next {
                    instances.push(Instance { first_line: local.first_line, treatment: local.treatment });
                    // Ids were checked to be UTF-8 when parsed; never merge ids lossily.
                    let id = std::str::from_utf8(&local.id).map_err(|_| {
                        self.field_error(local.first_line, self.cols.instance, &local.id, "an instance id in UTF-8")
                    })?;
                    ids.push(id.to_owned());
                } else {
                    let info = &instances[i as usize];
                    if info.treatment != local.treatment {
                        return Err(self.conflict(
                            local.first_line,
                            info.first_line,
                            &local.id,
                            info.treatment,
                            local.treatment,
                        ));
                    }
                }
                map.push(i);
            }
            global.push(map);
        }
        drop(index);
        report.instances_seen = instances.len();
        let n_rows: usize = parsed.iter().map(|c| c.rows.len()).sum();
        if n_rows == 0 {
            return Err(PanelError::Empty {
                input: self.source.into(),
                what: if report.rows == 0 {
                    "no data rows after the header".into()
                } else {
                    format!("no rows at or before the maximum step {}", max_step.unwrap_or(0))
                },
            });
        }
        let mut steps: Vec<u64> = steps.into_iter().collect();
        steps.sort_unstable();
        let grid = CheckpointGrid::new(steps)?;
        let c = grid.len();
        let n = instances.len();
        let grid_steps = grid.steps();

        // Every allocation below is bounded by the number of rows, never by values read from the file:
        // a complete instance has exactly one row per checkpoint, so only instances with at least `c`
        // rows can be complete, and the dense grid holds those alone (at most `n_rows` cells). Instances
        // with fewer rows are incomplete; a wrong column mapping (a column of huge integers as the
        // checkpoint, an outcome as the instance id) makes nearly every instance so.
        let mut count = vec![0u32; n];
        for (chunk, map) in parsed.iter().zip(&global) {
            for row in &chunk.rows {
                let k = &mut count[map[row.local as usize] as usize];
                *k = k.saturating_add(1);
            }
        }
        let mut slot: Vec<Option<u32>> = Vec::with_capacity(n);
        let mut n_complete = 0u32;
        for &k in &count {
            if k as usize >= c {
                slot.push(Some(n_complete));
                n_complete += 1;
            } else {
                slot.push(None);
            }
        }
        let first_short = slot.iter().position(Option::is_none);
        if first_short.is_some()
            && self.options.incomplete == IncompletePolicy::Error
            && (n as u128) * (c as u128) > 2 * n_rows as u128
        {
            return Err(PanelError::Sparse { input: self.source.into(), instances: n, checkpoints: c, rows: n_rows });
        }
        let dense = n_complete as usize * c; // ≤ n_rows
        let mut outcomes = vec![0.0f64; dense];
        let mut filled = vec![0u32; dense]; // line number of the row that filled a cell, 0 = empty
        // Rows of instances that cannot be complete: only checked for duplicates (bounded by rows).
        let mut short_rows: FxHashMap<(u32, u32), u32> = FxHashMap::default();
        let mut short_seen = vec![false; if first_short.is_some() { c } else { 0 }];
        let mut next_index = 0usize;
        for (chunk, map) in parsed.iter().zip(&global) {
            for row in &chunk.rows {
                // Rows usually walk the grid in order: try the next index before searching.
                let ci = if grid_steps.get(next_index) == Some(&row.step) {
                    next_index
                } else {
                    grid_steps.partition_point(|&s| s < row.step)
                };
                next_index = ci + 1;
                let inst = map[row.local as usize] as usize;
                let first_line = match slot[inst] {
                    Some(d) => {
                        let cell = d as usize * c + ci;
                        let first = std::mem::replace(&mut filled[cell], row.line);
                        outcomes[cell] = row.outcome;
                        first
                    }
                    None => {
                        if Some(inst) == first_short {
                            short_seen[ci] = true;
                        }
                        short_rows.insert((inst as u32, ci as u32), row.line).unwrap_or(0)
                    }
                };
                if first_line != 0 {
                    return Err(PanelError::Duplicate {
                        input: self.source.into(),
                        line: (self.loc)(row.line),
                        first_line: (self.loc)(first_line),
                        instance: ids[inst].clone(),
                        checkpoint: row.step,
                    });
                }
            }
        }
        drop(parsed);
        drop(short_rows);
        drop(filled);

        // Without duplicates an instance with at least `c` rows is complete; the others lack checkpoints.
        if let Some(i) = first_short {
            match self.options.incomplete {
                IncompletePolicy::Error => {
                    let first_missing = short_seen.iter().position(|&seen| !seen).unwrap_or(0);
                    return Err(PanelError::Incomplete {
                        input: self.source.into(),
                        instance: ids[i].clone(),
                        missing: c - count[i] as usize,
                        total: c,
                        example_step: grid.step(first_missing),
                    });
                }
                IncompletePolicy::Drop => {
                    report.dropped_incomplete = n - n_complete as usize;
                }
            }
        }

        // Cohorts and the max-step cut, over the complete instances.
        let mut kept_ids = Vec::with_capacity(n_complete as usize);
        let mut treatment = Vec::with_capacity(n_complete as usize);
        let mut cohorts = Vec::with_capacity(n_complete as usize);
        let mut keep = Vec::with_capacity(n_complete as usize);
        for (i, id) in ids.into_iter().enumerate() {
            if slot[i].is_none() {
                continue;
            }
            let (cohort, kept) = match instances[i].treatment {
                None => (Cohort::Never, true),
                Some(t) => match grid.cohort_of(t) {
                    Some(g) => (Cohort::Treated(g), true),
                    None if max_step.is_some() => {
                        report.dropped_after_max_step += 1;
                        (Cohort::Never, false)
                    }
                    None => {
                        return Err(PanelError::TreatmentAfterLastCheckpoint {
                            input: self.source.into(),
                            instance: id,
                            treatment: t,
                            last_checkpoint: grid.last_step(),
                        });
                    }
                },
            };
            kept_ids.push(id);
            treatment.push(instances[i].treatment);
            cohorts.push(cohort);
            keep.push(kept);
        }
        let mut panel = Panel::from_parts(grid, kept_ids, treatment, cohorts, outcomes);
        if keep.iter().any(|k| !k) {
            panel.retain_instances(|i, _, _| keep[i]);
        }
        if report.dropped_incomplete > 0 {
            report.warnings.push(format!(
                "dropped {} of {} instances that lack outcomes at some checkpoints",
                report.dropped_incomplete, report.instances_seen
            ));
        }
        if report.dropped_after_max_step > 0 {
            report.warnings.push(format!(
                "dropped {} instances trained after the maximum step {}",
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
