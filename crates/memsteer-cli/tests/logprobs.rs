//! `memsteer logprobs` end to end: golden values, resumption, sharding, feeding `memsteer profile`.

use super::*;

/// Two tiny GPT-2 "checkpoints" (different random models standing in for a training run) and 12
/// instances; two instances use the golden sequences of the f32 model.
fn setup(dir: &Path) -> (PathBuf, Vec<String>) {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("lm/tiny-gpt2-f32/golden.json")).expect("golden"))
            .expect("json");
    let seqs: Vec<Vec<u64>> = golden["sequences"]
        .as_array()
        .expect("seqs")
        .iter()
        .map(|s| s["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id")).collect())
        .collect();
    let mut lines = Vec::new();
    for i in 0..12u64 {
        let tokens: Vec<u64> = match i {
            0 => seqs[2].clone(),
            1 => seqs[3].clone(),
            _ => (0..(5 + i % 6)).map(|k| (i * 7 + k * 3) % 50).collect(),
        };
        let treatment = match i % 3 {
            0 => "null".to_string(),
            1 => "500".to_string(),
            _ => "1500".to_string(),
        };
        lines.push(format!(r#"{{"id": "x{i}", "treatment_step": {treatment}, "tokens": {tokens:?}}}"#));
    }
    let instances = dir.join("instances.jsonl");
    std::fs::write(&instances, lines.join("\n") + "\n").expect("write");
    let ckpts = vec![
        format!("0={}", s(&fixture("lm/tiny-gpt2-f32"))),
        format!("1000={}", s(&fixture("lm/tiny-gpt2-f16-prefixed"))),
        format!("2000={}", s(&fixture("lm/tiny-gpt2-f32"))),
    ];
    (instances, ckpts)
}

fn args<'a>(ckpts: &'a [String], instances: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["logprobs", "--instances", s(instances), "--out", s(out), "--quiet"];
    for c in ckpts {
        v.push("--checkpoint");
        v.push(c);
    }
    v.extend_from_slice(extra);
    v
}

#[test]
fn writes_a_panel_with_reference_log_probs_that_profile_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (instances, ckpts) = setup(dir.path());
    let out = dir.path().join("panel.csv");
    ok(&args(&ckpts, &instances, &out, &["--batch-size", "5"]));
    let text = std::fs::read_to_string(&out).expect("panel");
    assert_eq!(text.lines().count(), 1 + 12 * 3);
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("lm/tiny-gpt2-f32/golden.json")).expect("golden"))
            .expect("json");
    for (id, g) in [("x0", 2), ("x1", 3)] {
        let want = golden["sequences"][g]["sequence_log_prob"].as_f64().expect("lp");
        let row = text.lines().find(|l| l.starts_with(&format!("{id},")) && l.contains(",0,")).expect("row");
        let got: f64 = row.rsplit(',').next().expect("outcome").parse().expect("number");
        assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{id}: {got} vs {want}");
    }
    let prof = dir.path().join("profile");
    ok(&[
        "profile",
        "--panel",
        s(&out),
        "--out",
        s(&prof),
        "--bootstrap",
        "0",
        "--min-cohort-size",
        "1",
        "--quiet",
        "--no-figures",
    ]);
    assert!(prof.join("att.csv").exists());
}

#[test]
fn reruns_skip_finished_units_and_recover_from_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (instances, ckpts) = setup(dir.path());
    let out = dir.path().join("panel.csv");
    ok(&args(&ckpts, &instances, &out, &[]));
    let first = std::fs::read(&out).expect("panel");
    let parts = dir.path().join("panel.csv.parts");
    // A crash after the first unit: the others' parts are gone, a temporary file is left over.
    std::fs::remove_file(parts.join("step-2000.shard-0-of-1.csv")).expect("rm");
    std::fs::remove_file(&out).expect("rm");
    std::fs::write(parts.join("step-1000.shard-0-of-1.csv.tmp-99999"), "half a fi").expect("write");
    let loud = |extra: &[&str]| -> String {
        let a: Vec<&str> = args(&ckpts, &instances, &out, extra).into_iter().filter(|a| *a != "--quiet").collect();
        ok(&a)
    };
    let said = loud(&[]);
    assert!(said.contains("1 checkpoint(s) computed") && said.contains("2 already done"), "{said}");
    assert_eq!(std::fs::read(&out).expect("panel"), first);
    let said = loud(&[]);
    assert!(said.contains("0 checkpoint(s) computed") && said.contains("3 already done"), "{said}");
    assert_eq!(std::fs::read(&out).expect("panel"), first);
    // Checkpoints may be left out or added later (revisions downloaded one after another): the panel
    // holds the ones given, and only new ones are computed.
    let mut fewer = ckpts.clone();
    fewer.pop();
    let a: Vec<&str> = args(&fewer, &instances, &out, &[]).into_iter().filter(|a| *a != "--quiet").collect();
    let said = ok(&a);
    assert!(said.contains("0 checkpoint(s) computed") && said.contains("2 already done"), "{said}");
    assert_eq!(std::fs::read_to_string(&out).expect("panel").lines().count(), 1 + 12 * 2);
    let said = loud(&[]);
    assert!(said.contains("0 checkpoint(s) computed") && said.contains("3 already done"), "{said}");
    assert_eq!(std::fs::read(&out).expect("panel"), first);
    // The ledger remembers every checkpoint, so another model under a step left out is still refused.
    let ledger: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(parts.join("ledger.json")).expect("ledger")).expect("json");
    assert_eq!(ledger["checkpoints"], serde_json::json!([0, 1000, 2000]));
    // Other instances with the same parts directory are refused.
    let text = std::fs::read_to_string(&instances).expect("instances");
    let shorter = dir.path().join("shorter.jsonl");
    std::fs::write(&shorter, text.lines().skip(1).collect::<Vec<_>>().join("\n")).expect("write");
    let e = fails(&args(&ckpts, &shorter, &out, &[]));
    assert!(e.contains("made for other inputs"), "{e}");
}

#[test]
fn shards_assemble_the_same_panel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (instances, ckpts) = setup(dir.path());
    let whole = dir.path().join("whole.csv");
    ok(&args(&ckpts, &instances, &whole, &[]));
    let sharded = dir.path().join("sharded.csv");
    ok(&args(&ckpts, &instances, &sharded, &["--shard", "1/2"]));
    assert!(!sharded.exists(), "one shard alone must not assemble the panel");
    ok(&args(&ckpts, &instances, &sharded, &["--shard", "0/2"]));
    let sorted = |p: &Path| {
        let mut l: Vec<String> = std::fs::read_to_string(p).expect("read").lines().map(String::from).collect();
        l.sort();
        l
    };
    assert_eq!(sorted(&whole), sorted(&sharded));
}

#[test]
fn bad_inputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (instances, ckpts) = setup(dir.path());
    let out = dir.path().join("p.csv");
    let e = fails(&["logprobs", "--instances", s(&instances), "--out", s(&out), "--checkpoint", "abc"]);
    assert!(e.contains("expected STEP=DIR"), "{e}");
    let e = fails(&["logprobs", "--instances", s(&instances), "--out", s(&out), "--checkpoint", "5=/no/such/dir"]);
    assert!(e.contains("/no/such/dir") && e.contains("does not exist"), "{e}");
    let e = fails(&args(&ckpts, &instances, &out, &["--shard", "2/2"]));
    assert!(e.contains("0 ≤ I < N"), "{e}");
    let e = fails(&args(&ckpts, &instances, &out, &["--device", "tpu"]));
    assert!(e.contains("unknown device \"tpu\"") && e.contains("cuda:N"), "{e}");
    // Without the `cuda` feature, --device cuda says how to get it; with it and no GPU, what is missing.
    let e = fails(&args(&ckpts, &instances, &out, &["--device", "cuda:999"]));
    assert!(e.contains("--features cuda") || e.contains("is not available"), "{e}");
    for (body, expect) in [
        (
            "{\"id\": \"a\", \"tokens\": [1, 2]}\n{\"id\": \"a\", \"tokens\": [3]}\n",
            "line 2: instance id \"a\" appears twice",
        ),
        ("{\"id\": \"a\", \"text\": \"hello\"}\n", "loading the tokenizer"),
        ("{\"id\": \"a\", \"tokens\": [1, -2]}\n", "line 1: `tokens` must hold non-negative integer ids"),
        ("{\"id\": \"a\", \"treatment_step\": 0, \"tokens\": [1]}\n", "1-based step or null"),
        ("not json\n", "line 1: not a JSON object"),
    ] {
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, body).expect("write");
        let e = fails(&args(&ckpts, &bad, &dir.path().join("q.csv"), &[]));
        assert!(e.contains(expect) && e.contains("bad.jsonl"), "{body}: {e}");
    }
    let bad = dir.path().join("oov.jsonl");
    std::fs::write(&bad, "{\"id\": \"far\", \"tokens\": [1, 99]}\n").expect("write");
    let e = fails(&args(&ckpts, &bad, &dir.path().join("r.csv"), &[]));
    assert!(e.contains("token id 99") && e.contains("instance \"far\""), "{e}");
    // Inside a batch of several, the culprit is still named, with its line.
    std::fs::write(&bad, "{\"id\": \"a\", \"tokens\": [1, 2]}\n{\"id\": \"b\", \"tokens\": [3, 4]}\n{\"id\": \"c\", \"tokens\": [1, 2, 77]}\n")
        .expect("write");
    let e = fails(&args(&ckpts, &bad, &dir.path().join("r2.csv"), &[]));
    assert!(e.contains("instance \"c\"") && e.contains("line 3") && e.contains("token id 77 at position 2"), "{e}");
    // One token has no log-probability: an error naming the instance, never a silent 0.
    std::fs::write(&bad, "{\"id\": \"a\", \"tokens\": [1, 2]}\n{\"id\": \"lonely\", \"tokens\": [3]}\n")
        .expect("write");
    let e = fails(&args(&ckpts, &bad, &dir.path().join("r3.csv"), &[]));
    assert!(e.contains("line 2") && e.contains("\"lonely\" has 1 token(s)") && e.contains("at least two"), "{e}");
}

#[test]
fn a_different_model_under_a_finished_step_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (instances, ckpts) = setup(dir.path());
    let out = dir.path().join("panel.csv");
    ok(&args(&ckpts, &instances, &out, &[]));
    // Same steps, but step 1000 now points at another model: the finished part must not be reused.
    let mut swapped = ckpts.clone();
    swapped[1] = format!("1000={}", s(&fixture("lm/tiny-gpt2-f32")));
    let e = fails(&args(&swapped, &instances, &out, &[]));
    assert!(
        e.contains("checkpoint 1000") && e.contains("other weights") && e.contains("tiny-gpt2-f16-prefixed"),
        "{e}"
    );
    // A copy of the same weights in another directory is the same checkpoint (shards on other machines).
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).expect("mkdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("lm/tiny-gpt2-f16-prefixed").join(f), copy.join(f)).expect("copy");
    }
    let mut moved = ckpts.clone();
    moved[1] = format!("1000={}", s(&copy));
    ok(&args(&moved, &instances, &out, &[]));
    // Same weights, another config.json: another model.
    let cfg = std::fs::read_to_string(copy.join("config.json")).expect("config");
    std::fs::write(
        copy.join("config.json"),
        cfg.replace("\"layer_norm_epsilon\": 1e-05", "\"layer_norm_epsilon\": 0.001"),
    )
    .expect("write");
    assert_ne!(
        std::fs::read_to_string(copy.join("config.json")).expect("config"),
        cfg,
        "the edit must change the file"
    );
    let e = fails(&args(&moved, &instances, &out, &[]));
    assert!(e.contains("checkpoint 1000") && e.contains("another config.json"), "{e}");
    // A finished step whose weights were deleted to free disk does not block the rerun.
    std::fs::write(copy.join("config.json"), &cfg).expect("restore");
    std::fs::remove_file(copy.join("model.safetensors")).expect("rm");
    ok(&args(&moved, &instances, &out, &[]));
}

#[test]
fn pythia_layout_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("lm/tiny-neox-pythia-f16/golden.json")).expect("golden"))
            .expect("json");
    let tokens = golden["sequences"][2]["tokens"].clone();
    let want = golden["sequences"][2]["sequence_log_prob"].as_f64().expect("lp");
    let instances = dir.path().join("i.jsonl");
    std::fs::write(
        &instances,
        format!("{{\"id\": 1, \"treatment_step\": 700, \"tokens\": {tokens}}}\n{{\"id\": 2, \"tokens\": [3, 4, 5]}}\n"),
    )
    .expect("write");
    let out = dir.path().join("p.csv");
    let ckpts = [
        format!("0={}", s(&fixture("lm/tiny-neox-pythia-f16"))),
        format!("1000={}", s(&fixture("lm/tiny-neox-sequential-f32"))),
    ];
    // f32 products equal transformers' f32 forward on the f16 checkpoint.
    ok(&args(&ckpts, &instances, &out, &["--compute", "f32"]));
    let text = std::fs::read_to_string(&out).expect("panel");
    let outcome = |text: &str| -> f64 {
        let row = text.lines().find(|l| l.starts_with("1,700,0,")).expect("row");
        row.rsplit(',').next().expect("outcome").parse().expect("number")
    };
    let got = outcome(&text);
    assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{got} vs {want}");
    assert_eq!(text.lines().count(), 1 + 2 * 2);
    // bf16 products (f16 weights kept exactly) stay within the bound docs/formats.md states, and the
    // command says what it ran.
    let out2 = dir.path().join("p2.csv");
    let mut loud = args(&ckpts, &instances, &out2, &["--compute", "bf16"]);
    loud.retain(|a| *a != "--quiet");
    let run = memsteer(&loud);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success() && stderr.contains("products: bf16 on"), "{stderr}");
    assert!(stderr.contains("f16 weights kept exactly as hi + lo") && stderr.contains("CPU kernels:"), "{stderr}");
    let bf16 = outcome(&std::fs::read_to_string(&out2).expect("panel"));
    assert!((bf16 - want).abs() < 0.1 * want.abs().max(1.0) && bf16 != got, "bf16 {bf16} vs f32 {got}");

    // One panel never mixes precisions: a rerun in bf16 over f32 parts is refused with the way out …
    let parts = dir.path().join("p.csv.parts");
    std::fs::remove_file(parts.join("step-1000.shard-0-of-1.csv")).expect("remove part");
    let mixed = memsteer(&args(&ckpts, &instances, &out, &["--compute", "bf16"]));
    let stderr = String::from_utf8_lossy(&mixed.stderr);
    assert!(!mixed.status.success(), "mixing precisions must fail");
    assert!(
        stderr.contains("bf16 products") && stderr.contains("scored with f32") && stderr.contains("--compute f32"),
        "{stderr}"
    );
    ok(&args(&ckpts, &instances, &out, &["--compute", "f32"]));
    assert_eq!(outcome(&std::fs::read_to_string(&out).expect("panel")), got);
    // … and parts scored elsewhere in another precision (a shard copied in) are refused at assembly.
    std::fs::write(parts.join("step-0.shard-0-of-1.precision"), "bf16\n").expect("write");
    std::fs::remove_file(&out).expect("remove panel");
    let copied = memsteer(&args(&ckpts, &instances, &out, &["--compute", "f32"]));
    let stderr = String::from_utf8_lossy(&copied.stderr);
    assert!(!copied.status.success() && stderr.contains("scored in different precisions"), "{stderr}");
    assert!(!out.exists(), "no panel is assembled from mixed parts");
    // A unit scored before precisions were recorded is not mixed with recorded ones, neither when
    // scoring more nor at assembly; recording its class by hand continues the run.
    std::fs::remove_file(parts.join("step-0.shard-0-of-1.precision")).expect("remove record");
    let legacy = memsteer(&args(&ckpts, &instances, &out, &["--compute", "f32"]));
    let stderr = String::from_utf8_lossy(&legacy.stderr);
    assert!(
        !legacy.status.success()
            && stderr.contains("1 finished unit(s) of 1 shard(s) have no record")
            && stderr.contains("(step 0 shard 0;"),
        "{stderr}"
    );
    assert!(stderr.contains("echo f32 >") && !out.exists(), "{stderr}");
    std::fs::remove_file(parts.join("step-1000.shard-0-of-1.csv")).expect("remove part");
    let scoring = memsteer(&args(&ckpts, &instances, &out, &["--compute", "f32"]));
    let stderr = String::from_utf8_lossy(&scoring.stderr);
    assert!(!scoring.status.success() && stderr.contains("have no record"), "{stderr}");
    assert!(!parts.join("step-1000.shard-0-of-1.csv").exists(), "nothing is scored next to an unrecorded unit");
    std::fs::write(parts.join("step-0.shard-0-of-1.precision"), "f32\n").expect("write");
    ok(&args(&ckpts, &instances, &out, &["--compute", "f32"]));
    assert_eq!(outcome(&std::fs::read_to_string(&out).expect("panel")), got);
    // A panel whose units all predate the records assembles as before.
    for step in [0, 1000] {
        std::fs::remove_file(parts.join(format!("step-{step}.shard-0-of-1.precision"))).expect("remove record");
    }
    std::fs::remove_file(&out).expect("remove panel");
    ok(&args(&ckpts, &instances, &out, &["--compute", "f32"]));
    assert_eq!(outcome(&std::fs::read_to_string(&out).expect("panel")), got);
    // Adding per-token output rescores those (unrecorded) units instead of refusing them, and records them.
    let tokens = dir.path().join("t.jsonl");
    ok(&args(&ckpts, &instances, &out, &["--compute", "f32", "--per-token", s(&tokens)]));
    assert!(parts.join("step-0.shard-0-of-1.precision").exists() && tokens.exists());
    assert_eq!(outcome(&std::fs::read_to_string(&out).expect("panel")), got);
}

#[test]
fn text_instances_are_tokenized_with_the_checkpoints_tokenizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = fixture("lm/tiny-gpt2-tokenizer");
    let instances = dir.path().join("i.jsonl");
    let texts = ["The quick brown fox jumps over the lazy dog.", "Memorisation, measured causally: it's DiD!"];
    std::fs::write(
        &instances,
        format!(
            "{{\"id\": \"a\", \"treatment_step\": 3, \"text\": {:?}}}\n{{\"id\": \"b\", \"text\": {:?}}}\n",
            texts[0], texts[1]
        ),
    )
    .expect("write");
    let out = dir.path().join("p.csv");
    let ckpts = [format!("0={}", s(&model_dir)), format!("10={}", s(&model_dir))];
    ok(&args(&ckpts, &instances, &out, &[]));
    let tok = memsteer_lm::tokenizer::Tokenizer::from_dir(&model_dir).expect("tokenizer");
    let model = memsteer_lm::Model::load(&model_dir).expect("model");
    let text = std::fs::read_to_string(&out).expect("panel");
    for (id, t) in ["a", "b"].iter().zip(texts) {
        let want = model.sequence_log_probs(&[tok.encode(t).expect("ids")]).expect("lp")[0];
        let row = text.lines().find(|l| l.starts_with(&format!("{id},")) && l.contains(",0,")).expect("row");
        let got: f64 = row.rsplit(',').next().expect("outcome").parse().expect("number");
        assert!((got - want).abs() < 1e-9 * want.abs().max(1.0), "{id}: {got} vs {want}");
    }
}

#[test]
fn parquet_output_and_per_token_log_probs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (instances, ckpts) = setup(dir.path());
    let csv = dir.path().join("p.csv");
    ok(&args(&ckpts, &instances, &csv, &[]));
    let pq = dir.path().join("p.parquet");
    let tokens = dir.path().join("tokens.jsonl");
    ok(&args(&ckpts, &instances, &pq, &["--per-token", s(&tokens)]));
    let opts = memsteer_panel::read::ReadOptions::default();
    let (a, _) = memsteer_panel::read::read_panel(&csv, &opts).expect("csv");
    let (b, _) = memsteer_panel::read::read_panel(&pq, &opts).expect("parquet");
    assert_eq!(a.ids(), b.ids());
    for i in 0..a.n_instances() {
        for (x, y) in a.outcomes(i).iter().zip(b.outcomes(i)) {
            assert!((x - y).abs() < 1e-9, "{x} vs {y}");
        }
    }
    // Per-token lines: one per (instance, checkpoint), summing to the panel's outcome.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&tokens)
        .expect("tokens")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 12 * 3);
    let first = lines.iter().find(|l| l["id"] == "x0" && l["checkpoint_step"] == 0).expect("x0 at 0");
    let sum: f64 = first["token_log_probs"].as_array().expect("lps").iter().map(|v| v.as_f64().expect("lp")).sum();
    let i = a.ids().iter().position(|id| id == "x0").expect("x0");
    assert!((sum - a.outcomes(i)[0]).abs() < 1e-4, "{sum} vs {}", a.outcomes(i)[0]);
}

/// `text` instances through a `tokenizer.json` written by Python `tokenizers` with an NFC normalizer, an
/// added special token and a post-processor that prepends `<|endoftext|>`: the panel and the per-token
/// file hold transformers' log-probabilities of `tokenizers`' ids (golden), decomposed input included.
#[test]
fn text_instances_through_an_nfc_tokenizer_give_the_reference_log_probs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = fixture("lm/tiny-neox-tokenizer-nfc");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("golden.json")).expect("golden")).expect("json");
    let seqs = golden["sequences"].as_array().expect("sequences");
    let lines: Vec<String> = seqs
        .iter()
        .enumerate()
        .map(|(i, g)| serde_json::json!({"id": format!("t{i}"), "treatment_step": 5, "text": g["text"]}).to_string())
        .collect();
    let instances = dir.path().join("i.jsonl");
    std::fs::write(&instances, lines.join("\n") + "\n").expect("write");
    let out = dir.path().join("p.csv");
    let tokens = dir.path().join("tokens.jsonl");
    let ckpts = [format!("0={}", s(&model_dir)), format!("10={}", s(&model_dir))];
    ok(&args(&ckpts, &instances, &out, &["--per-token", s(&tokens)]));
    let panel = std::fs::read_to_string(&out).expect("panel");
    let per_token: Vec<serde_json::Value> = std::fs::read_to_string(&tokens)
        .expect("tokens")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    for (i, g) in seqs.iter().enumerate() {
        let id = format!("t{i}");
        let want = g["sequence_log_prob"].as_f64().expect("lp");
        for step in [0, 10] {
            let row = panel.lines().find(|l| l.starts_with(&format!("{id},5,{step},"))).expect("row");
            let got: f64 = row.rsplit(',').next().expect("outcome").parse().expect("number");
            assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{id} at {step}: {got} vs {want}");
        }
        let line = per_token.iter().find(|l| l["id"] == id.as_str() && l["checkpoint_step"] == 0).expect("line");
        let got = line["token_log_probs"].as_array().expect("lps");
        let want = g["token_log_probs"].as_array().expect("lps");
        assert_eq!(got.len(), want.len(), "{id}: number of scored tokens");
        for (a, b) in got.iter().zip(want) {
            let (a, b) = (a.as_f64().expect("lp"), b.as_f64().expect("lp"));
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{id}: token lp {a} vs {b}");
        }
    }
}

/// Checkpoints of the Llama family score to transformers' log-probabilities through `memsteer logprobs`:
/// a Llama with grouped-query attention, a Mistral whose sliding window is shorter than the sequences,
/// a Qwen3 with q/k norms, a Gemma 2 with soft-capped scores and logits (the goldens of
/// `fixtures/lm/make_tiny_llama.py`).
#[test]
fn llama_family_checkpoints_give_the_reference_log_probs() {
    for name in ["tiny-llama-gqa", "tiny-mistral-window", "tiny-qwen3", "tiny-gemma2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let model_dir = fixture(&format!("lm/{name}"));
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model_dir.join("golden.json")).expect("golden"))
                .expect("json");
        let seqs: Vec<&serde_json::Value> = golden["sequences"]
            .as_array()
            .expect("seqs")
            .iter()
            .filter(|g| g["tokens"].as_array().expect("t").len() > 1)
            .collect();
        let lines: Vec<String> = seqs
            .iter()
            .enumerate()
            .map(|(i, g)| {
                serde_json::json!({"id": format!("s{i}"), "treatment_step": 1, "tokens": g["tokens"]}).to_string()
            })
            .collect();
        let instances = dir.path().join("i.jsonl");
        std::fs::write(&instances, lines.join("\n") + "\n").expect("write");
        let out = dir.path().join("p.csv");
        let ckpts = [format!("0={}", s(&model_dir))];
        ok(&args(&ckpts, &instances, &out, &["--batch-size", "2"]));
        let panel = std::fs::read_to_string(&out).expect("panel");
        for (i, g) in seqs.iter().enumerate() {
            let want = g["sequence_log_prob"].as_f64().expect("lp");
            let row = panel.lines().find(|l| l.starts_with(&format!("s{i},1,0,"))).expect("row");
            let got: f64 = row.rsplit(',').next().expect("outcome").parse().expect("number");
            assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{name} s{i}: {got} vs {want}");
        }
    }
}

#[test]
fn checkpoint_directories_as_pythia_and_olmo_revisions_download() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (instances, _) = setup(dir.path());
    let ckpts = dir.path().join("revisions");
    std::fs::create_dir_all(ckpts.join("notes")).expect("mkdir");
    // Other entries are ignored, whatever their names.
    std::fs::create_dir_all(ckpts.join("café-notés")).expect("mkdir");
    std::fs::create_dir_all(ckpts.join("stepping")).expect("mkdir");
    std::fs::write(ckpts.join("step5.txt"), "not a checkpoint").expect("write");
    std::os::unix::fs::symlink(fixture("lm/tiny-gpt2-f32"), ckpts.join("step0")).expect("link");
    std::os::unix::fs::symlink(fixture("lm/tiny-gpt2-f16-prefixed"), ckpts.join("step1000-tokens2B")).expect("link");
    let out = dir.path().join("panel.csv");
    ok(&["logprobs", "--checkpoint-dir", s(&ckpts), "--instances", s(&instances), "--out", s(&out), "--quiet"]);
    // The same panel as naming the checkpoints one by one.
    let by_name = dir.path().join("by-name.csv");
    let (a, b) = (
        format!("0={}", s(&fixture("lm/tiny-gpt2-f32"))),
        format!("1000={}", s(&fixture("lm/tiny-gpt2-f16-prefixed"))),
    );
    ok(&[
        "logprobs",
        "--checkpoint",
        &a,
        "--checkpoint",
        &b,
        "--instances",
        s(&instances),
        "--out",
        s(&by_name),
        "--quiet",
    ]);
    assert_eq!(std::fs::read_to_string(&out).expect("panel"), std::fs::read_to_string(&by_name).expect("panel"));
    // Mixing with --checkpoint, a directory without checkpoints, two directories of one step: errors.
    let e = fails(&[
        "logprobs",
        "--checkpoint-dir",
        s(&ckpts),
        "--checkpoint",
        &a,
        "--instances",
        s(&instances),
        "--out",
        s(&out),
    ]);
    assert!(e.contains("--checkpoint-dir") && e.contains("--checkpoint"), "{e}");
    let e = fails(&[
        "logprobs",
        "--checkpoint-dir",
        s(&ckpts.join("notes")),
        "--instances",
        s(&instances),
        "--out",
        s(&out),
    ]);
    assert!(e.contains("notes") && e.contains("no checkpoint subdirectories"), "{e}");
    std::os::unix::fs::symlink(fixture("lm/tiny-gpt2-f32"), ckpts.join("step1000")).expect("link");
    let e = fails(&["logprobs", "--checkpoint-dir", s(&ckpts), "--instances", s(&instances), "--out", s(&out)]);
    assert!(e.contains("both the checkpoint of step 1000"), "{e}");
}

#[test]
fn instances_from_pythias_data_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("data/pythia/batches.json")).expect("golden"))
            .expect("json");
    let out = dir.path().join("instances.jsonl");
    let data = fixture("data/pythia/document");
    let args = ["instances", "pythia", "--data", s(&data), "--batch-size", "4", "--steps", "1:4:3"];
    let rest = ["--per-step", "3", "--validation", "4", "--truncate", "8", "--seed", "5", "--out", s(&out)];
    let run = memsteer(&[&args[..], &rest[..]].concat());
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{said}");
    assert!(said.contains("6 from steps 1..=4 every 3") && said.contains("from steps 5..=6"), "{said}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .expect("instances")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    for x in &lines {
        let row = x["id"].as_u64().expect("id");
        let tokens: Vec<u64> =
            x["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id")).collect();
        let step = row / 4 + 1;
        let want = &golden["batches"][step.to_string()][(row % 4) as usize];
        let want: Vec<u64> = want.as_array().expect("row").iter().take(8).map(|t| t.as_u64().expect("id")).collect();
        assert_eq!(tokens, want, "row {row}");
        match x["treatment_step"].as_u64() {
            Some(t) => assert!(t == step && (t == 1 || t == 4), "row {row} at step {t}"),
            None => assert!(step >= 5, "validation row {row} from step {step}"),
        }
    }
    // Row 21 (padding only) is never written; when drawn it is counted.
    assert!(lines.iter().all(|x| x["id"] != 21));
    // With this seed the validation draw hits row 21, which holds only padding: left out and said.
    assert!(said.contains("warning: 1 sequence(s) holding only padding"), "{said}");
    assert_eq!(lines.iter().filter(|x| x["treatment_step"].is_null()).count(), 3, "{said}");
    // Bad input names the problem.
    let e = fails(&[&args[..], &["--per-step", "9", "--out", s(&out)]].concat());
    assert!(e.contains("more than a batch of 4"), "{e}");
    let e = fails(&[&args[..], &["--per-step", "1", "--truncate", "1", "--out", s(&out)]].concat());
    assert!(e.contains("truncating to 1 token(s)"), "{e}");
    // Steps at or after a second pass over the data are said; validation there is refused.
    let run = memsteer(&[&args[..], &["--per-step", "1", "--epoch-steps", "4", "--out", s(&out)]].concat());
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success() && said.contains("1 analysed step(s) in the second pass"), "{said}");
    let e = fails(
        &[
            &args[..],
            &[
                "--per-step",
                "1",
                "--epoch-steps",
                "6",
                "--validation",
                "2",
                "--validation-steps",
                "5:6",
                "--out",
                s(&out),
            ],
        ]
        .concat(),
    );
    assert!(e.contains("second pass"), "{e}");
    let e = fails(&[
        "instances",
        "pythia",
        "--data",
        s(&dir.path().join("none")),
        "--steps",
        "1:2",
        "--per-step",
        "1",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("none.idx"), "{e}");
}
