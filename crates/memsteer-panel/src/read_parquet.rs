//! Parquet and Arrow input and Parquet output (feature `parquet`): the same columns as the long CSV
//! format, any integer, float or string types on input; positions in errors are 1-based data rows.

use std::borrow::Cow;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{Chunk, Columns, FxHashSet, Parser, ReadOptions, ReadReport, TreatmentEncoding};
use crate::{Location, Panel, PanelError, Result};

/// A cell as text (`None` for null), so the CSV field rules apply unchanged.
fn text(col: &ArrayRef, row: usize) -> std::result::Result<Option<Cow<'_, [u8]>>, String> {
    if col.is_null(row) {
        return Ok(None);
    }
    let t = |s: String| Ok(Some(Cow::Owned(s.into_bytes())));
    match col.data_type() {
        DataType::Utf8 => Ok(Some(Cow::Borrowed(col.as_string::<i32>().value(row).as_bytes()))),
        DataType::LargeUtf8 => Ok(Some(Cow::Borrowed(col.as_string::<i64>().value(row).as_bytes()))),
        DataType::Utf8View => Ok(Some(Cow::Borrowed(col.as_string_view().value(row).as_bytes()))),
        DataType::Int8 => t(col.as_primitive::<Int8Type>().value(row).to_string()),
        DataType::Int16 => t(col.as_primitive::<Int16Type>().value(row).to_string()),
        DataType::Int32 => t(col.as_primitive::<Int32Type>().value(row).to_string()),
        DataType::Int64 => t(col.as_primitive::<Int64Type>().value(row).to_string()),
        DataType::UInt8 => t(col.as_primitive::<UInt8Type>().value(row).to_string()),
        DataType::UInt16 => t(col.as_primitive::<UInt16Type>().value(row).to_string()),
        DataType::UInt32 => t(col.as_primitive::<UInt32Type>().value(row).to_string()),
        DataType::UInt64 => t(col.as_primitive::<UInt64Type>().value(row).to_string()),
        DataType::Float32 => t(format!("{:?}", col.as_primitive::<Float32Type>().value(row))),
        DataType::Float64 => t(format!("{:?}", col.as_primitive::<Float64Type>().value(row))),
        other => Err(format!("a string, integer or float column, found type {other}")),
    }
}

/// A cell as text, with type errors reported at `row_no`.
fn cell<'c>(
    parser: &Parser<'_>,
    col: &'c ArrayRef,
    r: usize,
    row_no: usize,
    c: usize,
) -> Result<Option<Cow<'c, [u8]>>> {
    text(col, r).map_err(|e| parser.field_error(row_no, c, b"", &e))
}

/// A numeric cell as `f64` without a round trip through text.
fn number(col: &ArrayRef, row: usize) -> Option<f64> {
    if col.is_null(row) {
        return None;
    }
    Some(match col.data_type() {
        DataType::Float64 => col.as_primitive::<Float64Type>().value(row),
        DataType::Float32 => f64::from(col.as_primitive::<Float32Type>().value(row)),
        DataType::Int64 => col.as_primitive::<Int64Type>().value(row) as f64,
        DataType::Int32 => f64::from(col.as_primitive::<Int32Type>().value(row)),
        _ => return None,
    })
}

/// A numeric cell that may hold a step, read as a number; `f32` cells go through their text (the
/// shortest decimal, as pandas writes them) as before.
fn step_number(col: &ArrayRef, row: usize) -> Option<f64> {
    if *col.data_type() == DataType::Float32 { None } else { number(col, row) }
}

/// A whole non-negative number as a step (`None` otherwise: the text rules then decide).
fn whole(x: f64) -> Option<u64> {
    (x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 9.0e15).then_some(x as u64)
}

/// Reads a Parquet panel.
pub(super) fn read(path: &Path, options: &ReadOptions) -> Result<(Panel, ReadReport)> {
    let source = path.display().to_string();
    let io = |e: std::io::Error| PanelError::Io { action: "reading", path: path.to_path_buf(), source: e };
    let invalid = |e: String| PanelError::Invalid(format!("{source}: {e}"));
    let file = std::fs::File::open(path).map_err(io)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| invalid(format!("not a readable Parquet file ({e})")))?;
    let names: Vec<String> = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
    let reader = builder.with_batch_size(1 << 16).build().map_err(|e| invalid(e.to_string()))?;
    read_batches(&names, reader.map(|b| b.map_err(|e| e.to_string())), &source, options)
}

/// Reads a panel from Arrow record batches whose columns are named `names` (an Arrow stream from
/// another library, a Parquet file's row groups); `source` names the input in error messages, rows are
/// counted from 1 across batches. The columns take any integer, float or string type, as in Parquet.
pub fn read_batches(
    names: &[String],
    batches: impl IntoIterator<Item = std::result::Result<RecordBatch, String>>,
    source: &str,
    options: &ReadOptions,
) -> Result<(Panel, ReadReport)> {
    let invalid = |e: String| PanelError::Invalid(format!("{source}: {e}"));
    let cols = Columns::find(names, &options.columns, source)?;
    let parser = Parser { source, options, body: &[], first_body_line: 1, cols, loc: Location::Row };
    parser.check_options()?;

    let mut chunks: Vec<Chunk<'_>> = Vec::new();
    let mut row_no = 0usize;
    for batch in batches {
        let batch = batch.map_err(|e| invalid(format!("reading record batch: {e}")))?;
        let schema = batch.schema();
        let batch_names = schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>();
        if batch_names != names.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(invalid(format!(
                "a record batch has the columns {batch_names:?} where the schema names {names:?}"
            )));
        }
        let (ci, ct, cc, co) =
            (parser.cols.instance, parser.cols.treatment, parser.cols.checkpoint, parser.cols.outcome);
        let (id_col, t_col, c_col, o_col) = (batch.column(ci), batch.column(ct), batch.column(cc), batch.column(co));
        let mut out = Chunk {
            ids: Vec::new(),
            rows: Vec::with_capacity(batch.num_rows()),
            steps: FxHashSet::default(),
            last_step: None,
            rows_read: 0,
            rows_after_max_step: 0,
        };
        for r in 0..batch.num_rows() {
            row_no += 1;
            out.rows_read += 1;
            let field = |col, c| cell(&parser, col, r, row_no, c);
            // Numbers are read as numbers; anything unusual goes through the text rules, whose
            // errors are the CSV reader's.
            let step = match step_number(c_col, r).and_then(whole) {
                Some(step) => step,
                None => match field(c_col, cc)? {
                    Some(v) => parser.parse_step(row_no, cc, &v)?,
                    None => return Err(parser.field_error(row_no, cc, b"null", "an integer step")),
                },
            };
            let outcome = match number(o_col, r) {
                Some(y) if y.is_finite() => {
                    if options.negate {
                        -y
                    } else {
                        y
                    }
                }
                Some(y) => return Err(parser.field_error(row_no, co, y.to_string().as_bytes(), "a finite number")),
                None => match field(o_col, co)? {
                    Some(v) => parser.parse_outcome(row_no, &v)?,
                    None => return Err(parser.field_error(row_no, co, b"null", "a number")),
                },
            };
            let by_step = matches!(options.treatment, TreatmentEncoding::Step);
            let treatment = if t_col.is_null(r) {
                None
            } else {
                match step_number(t_col, r).and_then(whole).filter(|&t| by_step && t >= 1) {
                    Some(t) => Some(t),
                    None => match field(t_col, ct)? {
                        Some(v) => parser.parse_treatment(row_no, &v)?,
                        None => None,
                    },
                }
            };
            let id: &[u8] = match id_col.data_type() {
                _ if id_col.is_null(r) => &[],
                DataType::Utf8 => id_col.as_string::<i32>().value(r).as_bytes(),
                DataType::LargeUtf8 => id_col.as_string::<i64>().value(r).as_bytes(),
                DataType::Utf8View => id_col.as_string_view().value(r).as_bytes(),
                _ => &[],
            };
            if !id.is_empty() {
                let own = || Cow::Owned(id.to_vec());
                parser.push_row_with(&mut out, row_no, (id, own), treatment, (step, outcome))?;
            } else {
                let id = match field(id_col, ci)? {
                    Some(id) if !id.is_empty() => Cow::Owned(id.into_owned()),
                    _ => return Err(parser.field_error(row_no, ci, b"", "a non-empty instance id")),
                };
                parser.push_row(&mut out, row_no, id, treatment, step, outcome)?;
            }
        }
        chunks.push(out);
    }
    parser.assemble(chunks)
}

/// Writes the panel as Parquet with the long format's four columns (`treatment_step` null for
/// never-trained instances), atomically.
pub(crate) fn write(panel: &Panel, path: &Path) -> Result<()> {
    use std::sync::Arc;

    use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;

    let c = panel.n_checkpoints();
    let n = panel.n_instances() * c;
    let mut ids = Vec::with_capacity(n);
    let mut treat = Vec::with_capacity(n);
    let mut steps = Vec::with_capacity(n);
    for i in 0..panel.n_instances() {
        for k in 0..c {
            ids.push(panel.id(i));
            treat.push(panel.treatment_step(i).map(|t| t as i64));
            steps.push(panel.grid().step(k) as i64);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("instance_id", DataType::Utf8, false),
        Field::new("treatment_step", DataType::Int64, true),
        Field::new("checkpoint_step", DataType::Int64, false),
        Field::new("outcome", DataType::Float64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(Int64Array::from(treat)),
            Arc::new(Int64Array::from(steps)),
            Arc::new(Float64Array::from(panel.outcome_matrix().to_vec())),
        ],
    )
    .map_err(|e| PanelError::Invalid(format!("building the Parquet batch: {e}")))?;
    let encode = |e: parquet::errors::ParquetError| PanelError::Invalid(format!("encoding {}: {e}", path.display()));
    let mut bytes = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut bytes, schema, None).map_err(encode)?;
    writer.write(&batch).map_err(encode)?;
    writer.close().map_err(encode)?;
    crate::write_atomic(path, |w| w.write_all(&bytes))
}
