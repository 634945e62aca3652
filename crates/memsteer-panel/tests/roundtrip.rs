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
