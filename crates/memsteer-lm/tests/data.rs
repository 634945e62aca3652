//! The data-order readers against the reference implementations' reading of the same files
//! (`fixtures/data/make_data_fixtures.py`: Pythia's `MMapIndexedDataset`, OLMo's memmap layout), and
//! every malformed-file case.

use std::path::{Path, PathBuf};

use memsteer_lm::data::{DataOrder, IndexedDataset, OlmoOrder, Sampled, Sampling, Steps, TokenType, sample};

type Drawn = Vec<(u64, Option<u64>, Vec<u32>)>;

/// [`sample`] with the instances collected.
fn draw(order: &dyn DataOrder, s: &Sampling) -> memsteer_lm::Result<(Drawn, Sampled)> {
    let mut all = Vec::new();
    let report = sample(order, s, &mut |id, step, tokens| {
        all.push((id, step, tokens.to_vec()));
        Ok(())
    })?;
    Ok((all, report))
}

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data").join(name)
}

fn golden(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(name).join("batches.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn pythia_rows_equal_the_reference_readers_batches() {
    let g = golden("pythia");
    let b = g["batch_size"].as_u64().unwrap();
    let d = IndexedDataset::open(&dir("pythia").join("document")).unwrap().with_seq_len(2049);
    assert_eq!((d.len(), d.dtype()), (24, TokenType::U16));
    for (s, rows) in g["batches"].as_object().unwrap() {
        let s: u64 = s.parse().unwrap();
        for (k, want) in rows.as_array().unwrap().iter().enumerate() {
            let p = (s - 1) * b + k as u64;
            let (id, tokens) = d.instance(p, None).unwrap();
            assert_eq!((id, tokens), (p, ids(want)), "step {s}, row {k}");
        }
    }
    // A prefix given with its extension opens the same dataset; truncation keeps the first tokens.
    let again = IndexedDataset::open(&dir("pythia").join("document.idx")).unwrap();
    assert_eq!(again.row(5, Some(7)).unwrap(), d.row(5, None).unwrap()[..7].to_vec());
}

#[test]
fn pythia_sampling_draws_from_each_steps_batch_and_validation_after_it() {
    let g = golden("pythia");
    let d = IndexedDataset::open(&dir("pythia").join("document")).unwrap().with_seq_len(2049);
    let sampling = Sampling {
        steps: Steps::parse("1:4").unwrap(),
        per_step: 2,
        validation: 3,
        validation_steps: None,
        batch_size: 4,
        epoch_steps: None,
        truncate: Some(16),
        seed: 7,
    };
    let (drawn, out) = draw(&d, &sampling).unwrap();
    assert_eq!(out.validation_steps, Some(Steps { first: 5, last: 6, stride: 1 }));
    let treated: Vec<_> = drawn.iter().filter(|x| x.1.is_some()).collect();
    assert_eq!((out.treated, out.validation + out.padding_only), (8, 3));
    assert_eq!(treated.len(), 8);
    for (id, step, tokens) in &treated {
        let s = step.unwrap();
        assert!((s - 1) * 4 <= *id && *id < s * 4, "row {id} is not in step {s}'s batch");
        let row = &g["batches"][s.to_string()][(*id - (s - 1) * 4) as usize];
        assert_eq!(*tokens, ids(row)[..16].to_vec());
    }
    // Validation rows come from steps 5 and 6; row 21 is padding only and is left out, counted.
    let val: Vec<u64> = drawn.iter().filter(|x| x.1.is_none()).map(|x| x.0).collect();
    assert!(val.iter().all(|&r| (16..24).contains(&r) && r != 21), "{val:?}");
    assert_eq!(val.len() + out.padding_only, 3);
    // Seeded: the same draw again, another with another seed.
    assert_eq!(draw(&d, &sampling).unwrap(), (drawn.clone(), out));
    let other = Sampling { seed: 8, ..sampling.clone() };
    assert_ne!(draw(&d, &other).unwrap().0, drawn);
    // Steps beyond the data, validation inside the analysed range or in a second pass: errors.
    let e = |s: Sampling| draw(&d, &s).unwrap_err().to_string();
    let beyond = e(Sampling { steps: Steps::parse("1:7").unwrap(), ..sampling.clone() });
    assert!(beyond.contains("step 7 is beyond the data") && beyond.contains("24 sequences make 6 steps"), "{beyond}");
    let inside = e(Sampling { validation_steps: Some(Steps::parse("4:6").unwrap()), ..sampling.clone() });
    assert!(inside.contains("must come after the last analysed step 4"), "{inside}");
    let second =
        e(Sampling { epoch_steps: Some(6), validation_steps: Some(Steps::parse("5:6").unwrap()), ..sampling.clone() });
    assert!(second.contains("second pass"), "{second}");
    let over = e(Sampling { per_step: 5, ..sampling.clone() });
    assert!(over.contains("more than a batch of 4"), "{over}");
    // Steps past the second-pass boundary are counted.
    let (_, counted) = draw(&d, &Sampling { epoch_steps: Some(4), validation: 0, ..sampling }).unwrap();
    assert_eq!(counted.second_pass_steps, 1);
}

#[test]
fn olmo_instances_equal_numpys_reading() {
    let g = golden("olmo");
    let files: Vec<PathBuf> =
        g["files"].as_array().unwrap().iter().map(|f| dir("olmo").join(f.as_str().unwrap())).collect();
    let o = OlmoOrder::open(&dir("olmo").join("global_indices.npy"), &files, TokenType::U16, 8).unwrap();
    assert_eq!((o.instances(), o.positions()), (9, 18));
    for (s, batch) in g["batches"].as_object().unwrap() {
        let s: u64 = s.parse().unwrap();
        for (k, pair) in batch.as_array().unwrap().iter().enumerate() {
            let (id, tokens) = o.instance((s - 1) * 3 + k as u64, None).unwrap();
            assert_eq!(id, pair[0].as_u64().unwrap(), "step {s}, entry {k}");
            assert_eq!(tokens, ids(&pair[1]), "step {s}, entry {k}");
        }
    }
    // The order is two passes over nine instances: drawing every position of steps 1..6 keeps each
    // instance once and counts the repeats.
    let all = Sampling {
        steps: Steps::parse("1:6").unwrap(),
        per_step: 3,
        validation: 0,
        validation_steps: None,
        batch_size: 3,
        epoch_steps: Some(4),
        truncate: None,
        seed: 0,
    };
    let (drawn, out) = draw(&o, &all).unwrap();
    assert_eq!((drawn.len(), out.treated, out.repeats, out.second_pass_steps), (9, 9, 9, 3));
}

/// Writes a Megatron index by hand, to break it in each way a user's copy may be broken.
fn write_index(path: &Path, version: u64, code: u8, sizes: &[i32], pointers: &[i64]) {
    let mut b = b"MMIDIDX\x00\x00".to_vec();
    b.extend(version.to_le_bytes());
    b.push(code);
    b.extend((sizes.len() as u64).to_le_bytes());
    b.extend((sizes.len() as u64 + 1).to_le_bytes());
    sizes.iter().for_each(|s| b.extend(s.to_le_bytes()));
    pointers.iter().for_each(|p| b.extend(p.to_le_bytes()));
    (0..=sizes.len() as i64).for_each(|d| b.extend(d.to_le_bytes()));
    std::fs::write(path, b).unwrap();
}

#[test]
fn malformed_datasets_are_named_errors() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("d");
    let open = |p: &Path| IndexedDataset::open(p).unwrap_err().to_string();
    std::fs::write(t.path().join("d.bin"), vec![1u8; 40]).unwrap();
    // Wrong magic.
    std::fs::write(t.path().join("d.idx"), b"NOTANINDEX-and-then-some-more-bytes-here").unwrap();
    assert!(open(&p).contains("MMIDIDX"), "{}", open(&p));
    // Wrong version.
    write_index(&t.path().join("d.idx"), 2, 8, &[4, 4], &[0, 8]);
    assert!(open(&p).contains("index version 2, expected 1"), "{}", open(&p));
    // A float dtype.
    write_index(&t.path().join("d.idx"), 1, 6, &[4, 4], &[0, 8]);
    assert!(open(&p).contains("dtype code 6"), "{}", open(&p));
    // An index cut short.
    write_index(&t.path().join("d.idx"), 1, 8, &[4, 4], &[0, 8]);
    let full = std::fs::read(t.path().join("d.idx")).unwrap();
    std::fs::write(t.path().join("d.idx"), &full[..full.len() - 10]).unwrap();
    assert!(open(&p).contains("fewer than the header's 2 rows"), "{}", open(&p));
    // A .bin shorter than the index says.
    write_index(&t.path().join("d.idx"), 1, 8, &[4, 40], &[0, 8]);
    let e = open(&p);
    assert!(e.contains("d.bin") && e.contains("shorter than the index says") && e.contains("row 1"), "{e}");
    // Rows of another length than the sequence length.
    write_index(&t.path().join("d.idx"), 1, 8, &[4, 4], &[0, 8]);
    let d = IndexedDataset::open(&p).unwrap().with_seq_len(2049);
    let e = d.row(1, None).unwrap_err().to_string();
    assert!(e.contains("row 1 holds 4 tokens, expected 2049"), "{e}");
    // Missing files name themselves.
    let e = open(&t.path().join("nothing"));
    assert!(e.contains("nothing.idx"), "{e}");
    // OLMo: indices that are not whole uint32 values, a token file of a partial token, an instance
    // beyond the token files.
    std::fs::write(t.path().join("gi"), [0u8; 6]).unwrap();
    std::fs::write(t.path().join("tok"), [0u8; 32]).unwrap();
    let e = OlmoOrder::open(&t.path().join("gi"), &[t.path().join("tok")], TokenType::U16, 8).unwrap_err().to_string();
    assert!(e.contains("whole number of uint32"), "{e}");
    std::fs::write(t.path().join("gi"), [5u8, 0, 0, 0]).unwrap();
    std::fs::write(t.path().join("odd"), [0u8; 33]).unwrap();
    let e = OlmoOrder::open(&t.path().join("gi"), &[t.path().join("odd")], TokenType::U16, 8).unwrap_err().to_string();
    assert!(e.contains("whole number of 2-byte tokens"), "{e}");
    let o = OlmoOrder::open(&t.path().join("gi"), &[t.path().join("tok")], TokenType::U16, 8).unwrap();
    let e = o.instance(0, None).unwrap_err().to_string();
    assert!(e.contains("instance 5 is beyond the 2 instances"), "{e}");
}
