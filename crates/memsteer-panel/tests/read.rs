//! Every malformed input gets an error naming the input, the line or instance, and what was expected.

use memsteer_panel::read::{ColumnMap, IncompletePolicy, ReadOptions, TreatmentEncoding, parse_csv};
use memsteer_panel::{Cohort, PanelError};

const HEADER: &str = "instance_id,treatment_step,checkpoint_step,outcome\n";

fn parse(body: &str) -> Result<memsteer_panel::Panel, PanelError> {
    parse_with(body, &ReadOptions::default())
}

fn parse_with(body: &str, opts: &ReadOptions) -> Result<memsteer_panel::Panel, PanelError> {
    parse_csv(body.as_bytes(), "panel.csv", opts).map(|(p, _)| p)
}

fn error(body: &str) -> String {
    match parse(body) {
        Ok(_) => panic!("expected an error for:\n{body}"),
        Err(e) => e.to_string(),
    }
}

fn check(body: &str, expect: &[&str]) {
    let msg = error(body);
    for e in expect {
        assert!(msg.contains(e), "error {msg:?} should contain {e:?}");
    }
}

#[test]
fn reads_a_well_formed_panel_in_any_row_order() {
    let body = format!("{HEADER}b,never,2000,-3\na,1500,2000,-1.5\na,1500,1000,-2\nb,never,1000,-3.5\n");
    let p = parse(&body).expect("parses");
    assert_eq!(p.grid().steps(), &[1000, 2000]);
    assert_eq!(p.ids(), &["b", "a"]);
    assert_eq!(p.outcomes(0), &[-3.5, -3.0]);
    assert_eq!(p.outcomes(1), &[-2.0, -1.5]);
    assert_eq!(p.cohort(1), Cohort::Treated(1));
    assert_eq!(p.cohort(0), Cohort::Never);
}

#[test]
fn empty_treatment_quotes_crlf_bom_and_extra_columns_are_accepted() {
    let body = "\u{feff}extra,instance_id,treatment_step,checkpoint_step,outcome\r\n\
                x,\"id,1\",,0,-1\r\nx,\"id,1\",,10,-2\r\ny,\"say \"\"hi\"\"\",5,0,-1\r\ny,\"say \"\"hi\"\"\",5,10,-1\r\n";
    let p = parse(body).expect("parses");
    assert_eq!(p.ids(), &["id,1", "say \"hi\""]);
    assert_eq!(p.treatment_step(0), None);
    assert_eq!(p.treatment_step(1), Some(5));
    assert_eq!(p.cohort(1), Cohort::Treated(1));
}

#[test]
fn empty_file() {
    check("", &["panel.csv", "empty"]);
    check(HEADER, &["panel.csv", "no data rows"]);
}

#[test]
fn missing_column_lists_the_header() {
    check(
        "instance_id,checkpoint_step,outcome\na,0,1\n",
        &["panel.csv", "missing column `treatment_step`", "instance_id,checkpoint_step,outcome"],
    );
}

#[test]
fn non_numeric_and_non_finite_outcomes() {
    check(
        &format!("{HEADER}a,never,0,-1\na,never,1,abc\n"),
        &["panel.csv, line 3", "column `outcome`", "a number", "\"abc\""],
    );
    check(&format!("{HEADER}a,never,0,NaN\n"), &["line 2", "a finite number"]);
    check(&format!("{HEADER}a,never,0,inf\n"), &["line 2", "a finite number"]);
}

#[test]
fn negative_or_fractional_steps() {
    check(&format!("{HEADER}a,never,-5,1\n"), &["line 2", "column `checkpoint_step`", "non-negative integer"]);
    check(&format!("{HEADER}a,-3,0,1\n"), &["line 2", "column `treatment_step`", "non-negative integer"]);
    check(&format!("{HEADER}a,2.5,0,1\n"), &["line 2", "treatment_step"]);
    check(&format!("{HEADER}a,0,0,1\n"), &["line 2", "1-based optimizer step"]);
}

#[test]
fn duplicate_rows_name_both_lines() {
    check(
        &format!("{HEADER}a,never,0,1\na,never,1,1\na,never,0,2\n"),
        &["line 4", "duplicate", "\"a\"", "checkpoint 0", "line 2"],
    );
}

#[test]
fn conflicting_treatment_steps() {
    check(&format!("{HEADER}a,5,0,1\na,6,10,1\n"), &["line 3", "\"a\"", "treatment step 6", "5 on line 2"]);
    check(&format!("{HEADER}a,5,0,1\na,never,10,1\n"), &["line 3", "never"]);
}

#[test]
fn incomplete_instances_error_or_drop() {
    let body = format!("{HEADER}a,never,0,1\na,never,10,1\nb,5,0,1\nc,5,0,1\nc,5,10,2\n");
    let msg = error(&body);
    assert!(
        msg.contains("\"b\"") && msg.contains("1 of 2 checkpoints") && msg.contains("step 10") && !msg.contains("--"),
        "{msg}"
    );
    let opts = ReadOptions::default().with_incomplete(IncompletePolicy::Drop);
    let (p, report) = parse_csv(body.as_bytes(), "panel.csv", &opts).expect("drops");
    assert_eq!(p.ids(), &["a", "c"]);
    assert_eq!(report.dropped_incomplete, 1);
    assert!(report.warnings[0].contains("dropped 1 of 3 instances"));
}

#[test]
fn treatment_after_last_checkpoint() {
    check(
        &format!("{HEADER}a,11,0,1\na,11,10,1\n"),
        &["\"a\"", "step 11", "after the last checkpoint (10)", "maximum step"],
    );
}

#[test]
fn wrong_field_count() {
    check(&format!("{HEADER}a,never,0\n"), &["line 2", "expected 4 fields", "found 3"]);
}

#[test]
fn seq_idx_layout_negate_and_column_mapping() {
    // The layout of the memorisation-profile paper's released Pythia statistics.
    let body = "seq_idx,step,sup_seq\n1024,0,5.0\n1024,1000,4.0\n1025,0,5.0\n1025,1000,4.5\n0,0,6\n0,1000,6\n-3,0,6\n-3,1000,6\n";
    let opts = ReadOptions::default()
        .with_columns(ColumnMap::new("seq_idx", "seq_idx", "step", "sup_seq"))
        .with_treatment(TreatmentEncoding::FromSeqIdx { batch_size: 1024 })
        .with_negate(true);
    let p = parse_with(body, &opts).expect("parses");
    assert_eq!(p.treatment_step(0), Some(1)); // ceil(1024 / 1024)
    assert_eq!(p.treatment_step(1), Some(2)); // ceil(1025 / 1024)
    assert_eq!(p.treatment_step(2), None);
    assert_eq!(p.treatment_step(3), None);
    assert_eq!(p.outcomes(0), &[-5.0, -4.0]);
    let bad = opts.clone().with_treatment(TreatmentEncoding::FromSeqIdx { batch_size: 0 });
    let err = parse_with(body, &bad).expect_err("batch size 0");
    assert!(
        matches!(err, PanelError::InvalidOption { option: "batch_size", .. }) && !err.to_string().contains("--"),
        "{err}"
    );
    // A sequence index that is not an integer names the line and column.
    let err = parse_with(&body.replace("\n1025,0,", "\n10.5,0,"), &opts).expect_err("fractional seq_idx");
    let msg = err.to_string();
    assert!(msg.contains("line 4") && msg.contains("`seq_idx`") && msg.contains("integer sequence index"), "{msg}");
}

#[test]
fn max_step_cuts_checkpoints_and_drops_later_cohorts() {
    let body = format!(
        "{HEADER}a,5,0,1\na,5,10,2\na,5,20,3\nb,15,0,1\nb,15,10,1\nb,15,20,2\nv,never,0,1\nv,never,10,1\nv,never,20,1\n"
    );
    let opts = ReadOptions::default().with_max_step(Some(10));
    let (p, report) = parse_csv(body.as_bytes(), "panel.csv", &opts).expect("parses");
    assert_eq!(p.grid().steps(), &[0, 10]);
    assert_eq!(p.ids(), &["a", "v"]);
    assert_eq!(report.dropped_after_max_step, 1);
    assert_eq!(report.rows_after_max_step, 3);
}

#[test]
fn missing_file_names_the_path() {
    let err = memsteer_panel::read::read_csv(std::path::Path::new("/nonexistent/panel.csv"), &ReadOptions::default())
        .expect_err("no file");
    assert!(err.to_string().contains("/nonexistent/panel.csv"), "{err}");
}

#[test]
fn invalid_utf8_never_panics() {
    let mut body = HEADER.as_bytes().to_vec();
    body.extend_from_slice(b"a\xff,never,0,1\na\xff,never,1,\xfe\n");
    let err = parse_csv(&body, "panel.csv", &ReadOptions::default()).expect_err("bad id");
    assert!(err.to_string().contains("line 2"), "{err}");
}

/// Ids that are not valid UTF-8 are an error naming the file, line and column, never replaced by
/// U+FFFD (which would merge two different ids into one instance).
#[test]
fn non_utf8_instance_ids_are_errors_not_merged() {
    let mut body = HEADER.as_bytes().to_vec();
    body.extend_from_slice(
        b"a,never,0,1
a,never,1,1
b\xff,never,0,1
b\xff,never,1,1
b\xfe,never,0,1
b\xfe,never,1,1
",
    );
    let err = parse_csv(&body, "panel.csv", &ReadOptions::default()).expect_err("invalid UTF-8 id");
    assert!(matches!(&err, PanelError::Field { column, .. } if column == "instance_id"), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("panel.csv") && msg.contains("line 4") && msg.contains("UTF-8"), "{msg}");
}

/// A wrong column mapping (a column of large distinct integers read as checkpoint steps, an outcome
/// read as the instance id) is an error found before the dense grid is allocated: 60,000 rows would
/// otherwise ask for 60,000 × 60,000 cells (29 GB).
#[test]
fn wrong_column_mapping_is_an_error_not_an_allocation() {
    let mut body = String::from("instance_id,treatment_step,checkpoint_step,outcome,hash\n");
    for i in 0..60_000u64 {
        body.push_str(&format!("i{},never,{},{}.5,{}\n", i / 3, i % 3, i, i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 8));
    }
    // The right mapping reads fine: 20,000 instances × 3 checkpoints.
    let p = parse(&body).expect("parses");
    assert_eq!((p.n_instances(), p.n_checkpoints()), (20_000, 3));
    let start = std::time::Instant::now();
    for (columns, what) in [
        (ColumnMap::new("instance_id", "treatment_step", "hash", "outcome"), "huge integers as checkpoints"),
        (ColumnMap::new("outcome", "treatment_step", "hash", "outcome"), "outcome as instance, hash as checkpoint"),
        (ColumnMap::new("outcome", "treatment_step", "checkpoint_step", "outcome"), "outcome as instance"),
    ] {
        for policy in [IncompletePolicy::Error, IncompletePolicy::Drop] {
            let opts = ReadOptions::default().with_columns(columns.clone()).with_incomplete(policy);
            let err = parse_with(&body, &opts).expect_err(what);
            let msg = err.to_string();
            match policy {
                IncompletePolicy::Error => {
                    assert!(matches!(err, PanelError::Sparse { rows: 60_000, .. }), "{what}: {msg}");
                    assert!(msg.contains("panel.csv") && msg.contains("60000 rows"), "{msg}");
                }
                _ => assert!(msg.contains("no instances left"), "{what}: {msg}"),
            }
        }
    }
    assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
}

/// A body large enough to be parsed in several chunks in parallel.
fn big_body(instances: usize, checkpoints: usize) -> String {
    let mut s = String::from(HEADER);
    for i in 0..instances {
        let t = if i % 5 == 0 { "never".to_string() } else { (1 + i % (checkpoints - 1)).to_string() };
        for c in 0..checkpoints {
            s.push_str(&format!("inst-{i},{t},{c},{}\n", -(i as f64) - 0.25 * c as f64));
        }
    }
    s
}

#[test]
fn multi_chunk_input_parses_identically_and_numbers_lines_across_chunks() {
    let body = big_body(3000, 20); // ~1.2 MB, many chunks
    let p = parse(&body).expect("parses");
    assert_eq!(p.n_instances(), 3000);
    assert_eq!(p.outcomes(2999)[19], -2999.0 - 0.25 * 19.0);
    assert_eq!(p.id(1234), "inst-1234");
    // An error far into the file names its true line.
    let mut lines: Vec<String> = body.lines().map(String::from).collect();
    lines[50_001] = "inst-2500,1,1,oops".into();
    let err = error(&(lines.join("\n") + "\n"));
    assert!(err.contains("line 50002") && err.contains("oops"), "{err}");
}

#[test]
fn duplicates_and_conflicts_across_chunks_are_found() {
    let body = big_body(3000, 20);
    let dup = format!("{body}inst-7,8,3,1.0\n");
    let err = error(&dup);
    assert!(err.contains("line 60002") && err.contains("duplicate") && err.contains("line 145"), "{err}");
    let conflict = format!("{body}inst-7,9,3,1.0\n");
    let err = error(&conflict);
    assert!(err.contains("inst-7") && err.contains("treatment step 9"), "{err}");
}
