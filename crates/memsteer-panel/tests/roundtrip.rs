//! Writing and reading a panel gives it back exactly; arbitrary bytes never panic the reader.

use memsteer_panel::read::{ReadOptions, parse_csv};
use memsteer_panel::synthetic::SyntheticConfig;
use proptest::prelude::*;

#[test]
fn synthetic_panel_roundtrips_through_csv() {
    let panel = SyntheticConfig::pythia_like(5, 7, 11, 8, 3).generate().expect("panel");
    let mut buf = Vec::new();
    panel.write_csv_to(&mut buf).expect("write");
    let (back, report) = parse_csv(&buf, "mem", &ReadOptions::default()).expect("read");
    assert_eq!(back, panel);
    assert_eq!(report.rows, panel.n_instances() * panel.n_checkpoints());
}

#[test]
fn write_csv_is_atomic_and_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.csv");
    let panel = SyntheticConfig::pythia_like(2, 3, 3, 4, 1).generate().expect("panel");
    panel.write_csv(&path).expect("write");
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("p.csv")]);
}

proptest! {
    #![proptest_config(ProptestConfig { rng_seed: proptest::test_runner::RngSeed::Fixed(20261127), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut input = b"instance_id,treatment_step,checkpoint_step,outcome\n".to_vec();
        input.extend_from_slice(&bytes);
        let _ = parse_csv(&input, "fuzz", &ReadOptions::default());
    }

    #[test]
    fn structured_noise_never_panics(rows in proptest::collection::vec(
        ("[a-c]{1,2}", prop_oneof!["never", "", "[0-9]{1,3}", "-1", "x"], "[0-9]{1,2}|-1|z", "-?[0-9]{1,3}(\\.[0-9])?|nan|"),
        0..30)) {
        let mut input = String::from("instance_id,treatment_step,checkpoint_step,outcome\n");
        for (a, b, c, d) in rows {
            input.push_str(&format!("{a},{b},{c},{d}\n"));
        }
        if let Ok((p, _)) = parse_csv(input.as_bytes(), "fuzz", &ReadOptions::default()) {
            prop_assert!(p.outcome_matrix().iter().all(|y| y.is_finite()));
            prop_assert_eq!(p.outcome_matrix().len(), p.n_instances() * p.n_checkpoints());
        }
    }
}

#[cfg(feature = "parquet")]
mod parquet_input {
    use std::path::PathBuf;
    use std::sync::Arc;

    use arrow_array::{ArrayRef, BooleanArray, Float32Array, Int64Array, RecordBatch, StringArray, UInt32Array};
    use memsteer_panel::read::{ReadOptions, read_csv, read_panel};
    use parquet::arrow::ArrowWriter;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
    }

    fn write(path: &std::path::Path, columns: Vec<(&str, ArrayRef)>) {
        let batch = RecordBatch::try_from_iter(columns).expect("batch");
        let file = std::fs::File::create(path).expect("create");
        let mut w = ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
    }

    /// A Parquet file written by pandas/pyarrow (fixtures/csdid/make_parquet.py) reads as the same
    /// panel as its CSV twin.
    #[test]
    fn pyarrow_file_equals_its_csv() {
        let (a, _) = read_panel(&fixture("csdid/panel_a.parquet"), &ReadOptions::default()).expect("parquet");
        let (b, _) = read_csv(&fixture("csdid/panel_a.csv"), &ReadOptions::default()).expect("csv");
        assert_eq!(a, b);
    }

    #[test]
    fn written_parquet_reads_back_identically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let panel = memsteer_panel::synthetic::SyntheticConfig::pythia_like(4, 5, 6, 6, 2).generate().expect("panel");
        let path = dir.path().join("p.parquet");
        panel.write(&path).expect("write");
        let (back, _) = read_panel(&path, &ReadOptions::default()).expect("read");
        assert_eq!(back, panel);
    }

    #[test]
    fn integer_ids_null_treatments_and_float32_outcomes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.parquet");
        write(
            &path,
            vec![
                ("instance_id", Arc::new(UInt32Array::from(vec![7, 7, 8, 8])) as ArrayRef),
                ("treatment_step", Arc::new(Int64Array::from(vec![Some(5), Some(5), None, None])) as ArrayRef),
                ("checkpoint_step", Arc::new(Int64Array::from(vec![0, 10, 0, 10])) as ArrayRef),
                ("outcome", Arc::new(Float32Array::from(vec![-1.5, -1.0, -2.0, -2.25])) as ArrayRef),
            ],
        );
        let (p, report) = read_panel(&path, &ReadOptions::default()).expect("reads");
        assert_eq!(report.rows, 4);
        assert_eq!(p.ids(), &["7", "8"]);
        assert_eq!(p.treatment_step(0), Some(5));
        assert_eq!(p.treatment_step(1), None);
        assert_eq!(p.outcomes(1), &[-2.0, -2.25]);
    }

    /// Record batches (as a DataFrame library sends them) read as the CSV twin does: numbers read as
    /// numbers, float steps, NaN-free nulls for never-trained instances, several batches with rows
    /// counted across them, string-view ids with a null; and the text rules decide every edge.
    #[test]
    fn record_batches_read_as_their_csv_twin() {
        use arrow_array::{Float64Array, StringViewArray};
        use memsteer_panel::read::{parse_csv, read_batches};
        let names: Vec<String> =
            ["instance_id", "treatment_step", "checkpoint_step", "outcome"].iter().map(|s| s.to_string()).collect();
        let batch = |ids: Vec<Option<&str>>, t: Vec<Option<f64>>, c: Vec<f64>, y: Vec<f64>| {
            RecordBatch::try_from_iter(vec![
                ("instance_id", Arc::new(StringViewArray::from(ids)) as ArrayRef),
                ("treatment_step", Arc::new(Float64Array::from(t)) as ArrayRef),
                ("checkpoint_step", Arc::new(Float64Array::from(c)) as ArrayRef),
                ("outcome", Arc::new(Float64Array::from(y)) as ArrayRef),
            ])
            .map_err(|e| e.to_string())
        };
        let opts = ReadOptions::default();
        let csv = "instance_id,treatment_step,checkpoint_step,outcome\n\
                   a,1000,0,-1.5\na,1000,1000,-1.25\nb,,0,-2\nb,,1000,-2.5\n\
                   c,1000,0,-0.5\nc,1000,1000,-0.125\n";
        let (want, _) = parse_csv(csv.as_bytes(), "twin.csv", &opts).expect("csv");
        let batches = vec![
            batch(
                vec![Some("a"), Some("a"), Some("b")],
                vec![Some(1000.0), Some(1000.0), None],
                vec![0.0, 1000.0, 0.0],
                vec![-1.5, -1.25, -2.0],
            ),
            batch(
                vec![Some("b"), Some("c"), Some("c")],
                vec![None, Some(1000.0), Some(1000.0)],
                vec![1000.0, 0.0, 1000.0],
                vec![-2.5, -0.5, -0.125],
            ),
        ];
        let (got, report) = read_batches(&names, batches, "frame", &opts).expect("batches");
        assert_eq!(got, want);
        assert_eq!(report.rows, 6);
        // Errors count rows across batches and name them as the CSV reader does.
        let bad = |t: Option<f64>, c: f64, id: Option<&str>| {
            let batches = vec![
                batch(vec![Some("a")], vec![Some(1000.0)], vec![0.0], vec![-1.0]),
                batch(vec![id], vec![t], vec![c], vec![-1.0]),
            ];
            read_batches(&names, batches, "frame", &opts).expect_err("bad row").to_string()
        };
        let e = bad(Some(1000.0), 1.5, Some("a"));
        assert!(e.contains("frame, row 2") && e.contains("checkpoint_step"), "{e}");
        let e = bad(Some(1000.0), -1000.0, Some("a"));
        assert!(e.contains("row 2") && e.contains("non-negative"), "{e}");
        let e = bad(Some(0.0), 1000.0, Some("a"));
        assert!(e.contains("row 2") && e.contains("1-based optimizer step"), "{e}");
        let e = bad(Some(1000.0), 1000.0, None);
        assert!(e.contains("row 2") && e.contains("instance id"), "{e}");
        // A batch whose columns are not the schema's.
        let other = RecordBatch::try_from_iter(vec![
            ("outcome", Arc::new(Float64Array::from(vec![1.0])) as ArrayRef),
            ("instance_id", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
            ("treatment_step", Arc::new(Float64Array::from(vec![1.0])) as ArrayRef),
            ("checkpoint_step", Arc::new(Float64Array::from(vec![0.0])) as ArrayRef),
        ])
        .map_err(|e| e.to_string());
        let e = read_batches(&names, vec![other], "frame", &opts).expect_err("columns").to_string();
        assert!(e.contains("where the schema names"), "{e}");
    }

    #[test]
    fn errors_name_the_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.parquet");
        write(
            &path,
            vec![
                ("instance_id", Arc::new(StringArray::from(vec!["a", "a", "b"])) as ArrayRef),
                ("treatment_step", Arc::new(StringArray::from(vec!["never", "never", "3"])) as ArrayRef),
                ("checkpoint_step", Arc::new(Int64Array::from(vec![0, 1, 0])) as ArrayRef),
                ("outcome", Arc::new(Float32Array::from(vec![Some(1.0), None, Some(2.0)])) as ArrayRef),
            ],
        );
        let err = read_panel(&path, &ReadOptions::default()).expect_err("null outcome").to_string();
        assert!(err.contains("bad.parquet, row 2") && err.contains("outcome"), "{err}");
        let path = dir.path().join("types.parquet");
        write(
            &path,
            vec![
                ("instance_id", Arc::new(BooleanArray::from(vec![true])) as ArrayRef),
                ("treatment_step", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
                ("checkpoint_step", Arc::new(Int64Array::from(vec![0])) as ArrayRef),
                ("outcome", Arc::new(Float32Array::from(vec![1.0])) as ArrayRef),
            ],
        );
        let err = read_panel(&path, &ReadOptions::default()).expect_err("boolean id").to_string();
        assert!(err.contains("row 1") && err.contains("found type Boolean"), "{err}");
        let path = dir.path().join("cols.parquet");
        write(&path, vec![("x", Arc::new(Int64Array::from(vec![1])) as ArrayRef)]);
        let err = read_panel(&path, &ReadOptions::default()).expect_err("columns").to_string();
        assert!(err.contains("missing column `instance_id`") && err.contains("header has: x"), "{err}");
        let path = dir.path().join("junk.parquet");
        std::fs::write(&path, b"not parquet").expect("write");
        let err = read_panel(&path, &ReadOptions::default()).expect_err("junk").to_string();
        assert!(err.contains("junk.parquet") && err.contains("not a readable Parquet file"), "{err}");
    }
}

/// Unequal cohort sizes and heteroskedastic cohorts: the sizes are as asked, and each cohort's
/// first-difference variance (the instance level cancels) is close to `2σ_g²` after treatment and to
/// `2σ²` (common noise) before it unless the cohort noise applies before treatment too.
#[test]
fn synthetic_cohort_sizes_and_noise() {
    let mut cfg = memsteer_panel::synthetic::SyntheticConfig::pythia_like(3, 0, 400, 6, 11);
    cfg.cohort_sizes = Some(vec![400, 50, 1200]);
    cfg.cohort_noise_sd = Some(vec![0.5, 1.0, 3.0]);
    let p = cfg.generate().expect("panel");
    assert_eq!(p.n_instances(), 400 + 50 + 1200 + 400);
    let variance = |p: &memsteer_panel::Panel, g: usize, c: usize| {
        let diffs: Vec<f64> = (0..p.n_instances())
            .filter(|&i| p.cohort(i) == memsteer_panel::Cohort::Treated(g))
            .map(|i| p.outcomes(i)[c] - p.outcomes(i)[c - 1])
            .collect();
        assert_eq!(diffs.len(), [400, 50, 1200][g - 1]);
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (diffs.len() - 1) as f64
    };
    for (g, sd) in [(1usize, 0.5f64), (3, 3.0)] {
        let var = variance(&p, g, 5);
        assert!((var / (2.0 * sd * sd) - 1.0).abs() < 0.15, "cohort {g}: variance {var}, expected {}", 2.0 * sd * sd);
    }
    // Cohort 3 before treatment (checkpoints 1 → 2): the common noise SD 1.
    let var = variance(&p, 3, 2);
    assert!((var / 2.0 - 1.0).abs() < 0.15, "cohort 3 before treatment: variance {var}");
    cfg.cohort_noise_before_treatment = true;
    let var = variance(&cfg.generate().expect("panel"), 3, 2);
    assert!((var / 18.0 - 1.0).abs() < 0.15, "cohort 3 before treatment, heteroskedastic throughout: {var}");
    cfg.cohort_sizes = Some(vec![1, 2]);
    assert!(cfg.generate().expect_err("wrong length").to_string().contains("cohort_sizes has 2 entries"));
}

/// In-memory panels get typed errors callers can match on.
#[test]
fn panel_new_errors_are_typed() {
    use memsteer_panel::{CheckpointGrid, Panel, PanelError};
    let grid = || CheckpointGrid::new(vec![0, 10]).expect("grid");
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let e = Panel::new(grid(), ids(&["a"]), vec![None, None], vec![0.0; 2]).expect_err("treatment length");
    assert!(matches!(e, PanelError::ShapeMismatch { expected: 1, found: 2, .. }), "{e}");
    let e = Panel::new(grid(), ids(&["a"]), vec![None], vec![0.0; 3]).expect_err("outcome length");
    assert!(matches!(e, PanelError::ShapeMismatch { expected: 2, found: 3, .. }), "{e}");
    let e = Panel::new(grid(), ids(&["a"]), vec![None], vec![0.0, f64::NAN]).expect_err("NaN");
    assert!(matches!(&e, PanelError::NonFiniteOutcome { instance, checkpoint: 10, .. } if instance == "a"), "{e}");
    let e = Panel::new(grid(), ids(&["a", "a"]), vec![None, None], vec![0.0; 4]).expect_err("duplicate");
    assert!(matches!(&e, PanelError::DuplicateId(id) if id == "a"), "{e}");
}
