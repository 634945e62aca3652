//! `memsteer train` end to end: logs consistent with each other, checkpoints `memsteer logprobs`
//! reads, identical output for any thread count, clear errors.

use super::*;

/// A tiny GPT-NeoX config, 12 training instances following a learnable pattern and 3 validation ones.
fn setup(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 32,
            "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
            "max_position_embeddings": 32, "rotary_pct": 0.25, "use_parallel_residual": true,
            "tie_word_embeddings": false, "hidden_act": "gelu", "layer_norm_eps": 1e-5}"#,
    )
    .expect("config");
    let line = |id: String, start: u64, len: u64| {
        let tokens: Vec<u64> = (0..len).map(|k| (start + 3 * k) % 32).collect();
        format!(r#"{{"id": "{id}", "tokens": {tokens:?}}}"#)
    };
    let train: Vec<String> = (0..12).map(|i| line(format!("t{i}"), i * 5, 8 + i % 4)).collect();
    let val: Vec<String> = (0..3).map(|i| line(format!("v{i}"), 7 + i, 10)).collect();
    let (ti, vi) = (dir.join("train.jsonl"), dir.join("val.jsonl"));
    std::fs::write(&ti, train.join("\n") + "\n").expect("train");
    std::fs::write(&vi, val.join("\n") + "\n").expect("val");
    (config, ti, vi)
}

fn train_args<'a>(c: &'a Path, t: &'a Path, v: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        "--model-config",
        s(c),
        "--instances",
        s(t),
        "--validation",
        s(v),
        "--batch-size",
        "3",
        "--steps",
        "10",
        "--lr",
        "0.01",
        "--warmup",
        "2",
        "--seed",
        "5",
        "--checkpoint-steps",
        "0,1,2,4:8:4",
        "--out",
        s(out),
        "--quiet",
    ]
}

#[test]
fn trains_logs_every_batch_and_logprobs_reads_the_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, t, v) = setup(dir.path());
    let out = dir.path().join("run");
    ok(&train_args(&c, &t, &v, &out));
    for k in [0, 1, 2, 4, 8, 10] {
        assert!(out.join(format!("step{k}/model.safetensors")).is_file(), "step{k}");
    }
    assert!(!out.join("step3").exists());
    // batches.jsonl: 10 steps of 3 ids; the first 4 steps are one permutation of the 12 instances.
    let batches: Vec<serde_json::Value> = std::fs::read_to_string(out.join("batches.jsonl"))
        .expect("batches")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(batches.len(), 10);
    let mut first_step = std::collections::HashMap::new();
    for (k, b) in batches.iter().enumerate() {
        assert_eq!(b["step"], k + 1);
        let ids = b["ids"].as_array().expect("ids");
        assert_eq!(ids.len(), 3);
        for id in ids {
            first_step.entry(id.as_str().expect("id").to_string()).or_insert(k + 1);
        }
    }
    let epoch1: std::collections::HashSet<String> =
        batches[..4].iter().flat_map(|b| b["ids"].as_array().unwrap().iter().map(|x| x.to_string())).collect();
    assert_eq!(epoch1.len(), 12);
    // The library's readers of the run's files (what xtask's retraining uses) give back the same.
    let read = memsteer_lm::train::run::read_batches(&out.join("batches.jsonl")).expect("batches");
    assert_eq!(read.len(), 10);
    assert_eq!(serde_json::json!(read[3]), batches[3]["ids"]);
    let cfg = memsteer_lm::train::run::train_config_from_run(&out.join("run.json")).expect("run.json");
    assert_eq!((cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps, cfg.grad_clip), (0.01, 0.1 * 0.01, 2, 10, Some(1.0)));
    let bad_run = dir.path().join("run-bad.json");
    std::fs::write(
        &bad_run,
        r#"{"min_lr": 0.001, "warmup": 2, "steps": 10, "schedule": "cosine", "weight_decay": 0.1, "grad_clip": 1.0}"#,
    )
    .expect("write");
    let e = memsteer_lm::train::run::train_config_from_run(&bad_run).expect_err("no lr").to_string();
    assert!(e.contains("run-bad.json") && e.contains("missing number `lr`"), "{e}");
    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"step\": 1, \"ids\": [\"a\"]}\n{\"step\": 3, \"ids\": [\"b\"]}\n").expect("write");
    let e = memsteer_lm::train::run::read_batches(&broken).expect_err("gap").to_string();
    assert!(e.contains("broken.jsonl") && e.contains("line 2") && e.contains("`step` must be 2"), "{e}");
    // instances.jsonl: treatment_step = the first batch holding the instance; validation null.
    let inst = std::fs::read_to_string(out.join("instances.jsonl")).expect("instances");
    assert_eq!(inst.lines().count(), 15);
    for l in inst.lines() {
        let x: serde_json::Value = serde_json::from_str(l).expect("json");
        let id = x["id"].as_str().expect("id");
        if id.starts_with('v') {
            assert!(x["treatment_step"].is_null(), "{l}");
        } else {
            assert_eq!(x["treatment_step"], first_step[id], "{l}");
        }
    }
    // loss.csv: warm-up lr·k/W, then cosine to 0.1·lr.
    let loss = std::fs::read_to_string(out.join("loss.csv")).expect("loss");
    let rows: Vec<Vec<f64>> =
        loss.lines().skip(1).map(|l| l.split(',').map(|f| f.parse().expect("number")).collect()).collect();
    assert_eq!(rows.len(), 10);
    assert!((rows[0][2] - 0.005).abs() < 1e-15 && (rows[1][2] - 0.01).abs() < 1e-15);
    assert!((rows[9][2] - 0.001).abs() < 1e-12);
    // Training on a pattern lowers the loss.
    assert!(rows[9][1] < rows[0][1] - 0.1, "{loss}");
    // The checkpoints feed `memsteer logprobs` directly.
    let panel = dir.path().join("panel.csv");
    ok(&[
        "logprobs",
        "--checkpoints",
        s(&out.join("checkpoints.json")),
        "--instances",
        s(&out.join("instances.jsonl")),
        "--out",
        s(&panel),
        "--quiet",
    ]);
    let text = std::fs::read_to_string(&panel).expect("panel");
    assert_eq!(text.lines().count(), 1 + 15 * 6);
    // Trained instances gain log-probability between step 0 and step 10.
    let mut gain = 0.0;
    for l in text.lines().skip(1) {
        let f: Vec<&str> = l.split(',').collect();
        if f[0].starts_with('t') {
            let y: f64 = f[3].parse().expect("outcome");
            match f[2] {
                "0" => gain -= y,
                "10" => gain += y,
                _ => {}
            }
        }
    }
    assert!(gain > 0.0, "{text}");
    // Same run on one thread: byte-identical logs and checkpoints.
    let out1 = dir.path().join("run1");
    let mut args = vec!["--threads", "1"];
    args.extend(train_args(&c, &t, &v, &out1));
    ok(&args);
    for f in ["loss.csv", "batches.jsonl", "instances.jsonl", "step10/model.safetensors"] {
        let (a, b) = (std::fs::read(out.join(f)).expect("a"), std::fs::read(out1.join(f)).expect("b"));
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(a == b, "{f}: lengths {} vs {}, first difference at byte {first:?}", a.len(), b.len());
    }
    // A rerun of a finished run changes nothing; other settings in the same directory are refused.
    let before = std::fs::read(out.join("step10/model.safetensors")).expect("weights");
    ok(&train_args(&c, &t, &v, &out));
    assert_eq!(std::fs::read(out.join("step10/model.safetensors")).expect("weights"), before);
    let mut other = train_args(&c, &t, &v, &out);
    let i = other.iter().position(|x| *x == "0.01").expect("lr");
    other[i] = "0.02";
    let e = fails(&other);
    assert!(e.contains("different training run"), "{e}");
    // An interrupted run (here: its last checkpoints lost) resumes from the last complete checkpoint
    // and ends with the same bytes as the uninterrupted one.
    for k in [8, 10] {
        std::fs::remove_dir_all(out1.join(format!("step{k}"))).expect("remove");
    }
    std::fs::write(out1.join("checkpoints.json"), r#"{"0": "step0", "1": "step1", "2": "step2", "4": "step4"}"#)
        .expect("manifest");
    // Step 4's weights are empty (the manifest was durable, the weights were not: a power loss), so
    // the run says so and falls back to step 2.
    std::fs::write(out1.join("step4/model.safetensors"), b"").expect("truncate");
    let out = memsteer(&train_args(&c, &t, &v, &out1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("step4") && err.contains("trying the one before it"), "{err}");
    let out = dir.path().join("run");
    for f in [
        "loss.csv",
        "batches.jsonl",
        "instances.jsonl",
        "checkpoints.json",
        "step10/model.safetensors",
        "step8/optimizer.safetensors",
    ] {
        let (a, b) = (std::fs::read(out.join(f)).expect("a"), std::fs::read(out1.join(f)).expect("b"));
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(a == b, "{f}: lengths {} vs {}, first difference at byte {first:?}", a.len(), b.len());
    }
}

/// An unreadable initialisation (step 0 cut short by a power loss) is written again, and the run ends as
/// an uninterrupted one.
#[test]
fn an_unreadable_step0_is_written_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, t, v) = setup(dir.path());
    let out = dir.path().join("run");
    ok(&train_args(&c, &t, &v, &out));
    let (step0, last) = (
        std::fs::read(out.join("step0/model.safetensors")).expect("step0"),
        std::fs::read(out.join("step10/model.safetensors")).expect("step10"),
    );
    for k in [1, 2, 4, 8, 10] {
        std::fs::remove_dir_all(out.join(format!("step{k}"))).expect("remove");
    }
    std::fs::write(out.join("checkpoints.json"), r#"{"0": "step0"}"#).expect("manifest");
    std::fs::write(out.join("step0/model.safetensors"), b"").expect("truncate");
    let run = memsteer(&train_args(&c, &t, &v, &out));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("step0") && err.contains("writing it again"), "{err}");
    assert_eq!(std::fs::read(out.join("step0/model.safetensors")).expect("step0"), step0);
    assert_eq!(std::fs::read(out.join("step10/model.safetensors")).expect("step10"), last);
}

/// The run's fingerprint covers the tokenizer: resuming with other tokenizer files is refused (text
/// instances would otherwise mix two tokenizations).
#[test]
fn resuming_with_another_tokenizer_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, t, v) = setup(dir.path());
    let tok = dir.path().join("tok");
    std::fs::create_dir_all(&tok).expect("mkdir");
    let original = std::fs::read_to_string(fixture("lm/tiny-gpt2-tokenizer/tokenizer.json")).expect("tokenizer");
    std::fs::write(tok.join("tokenizer.json"), &original).expect("copy");
    let out = dir.path().join("run");
    let mut a = train_args(&c, &t, &v, &out);
    a.extend(["--tokenizer", s(&tok)]);
    ok(&a);
    assert!(ok(&a).is_empty(), "a finished run reruns quietly");
    std::fs::write(tok.join("tokenizer.json"), original.replacen('{', "{ ", 1)).expect("edit");
    let e = fails(&a);
    assert!(e.contains("different training run"), "{e}");
}

/// Sizes are checked before anything is built from them: no overflow, no huge allocation, one line.
#[test]
fn huge_sizes_are_refused_up_front() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, t, v) = setup(dir.path());
    let out = dir.path().join("run");
    let with = |flag: &'static str, value: &'static str| {
        let mut a = train_args(&c, &t, &v, &out);
        match a.iter().position(|x| *x == flag) {
            Some(i) => a[i + 1] = value,
            None => a.extend([flag, value]),
        }
        a
    };
    for (flag, value, want) in [
        ("--checkpoint-steps", "0:10000000000:1", "beyond the run's 10 steps"),
        ("--checkpoint-steps", "0:18446744073709551615:1", "beyond the run's 10 steps"),
        ("--steps", "18446744073709551615", "--steps"),
        ("--batch-size", "18446744073709551615", "--batch-size"),
    ] {
        let e = fails(&with(flag, value));
        assert!(e.contains(want), "{flag} {value}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{flag} {value}: one line expected, got {e}");
    }
    let mut a = train_args(&c, &t, &v, &out);
    let i = a.iter().position(|x| *x == "--steps").expect("steps");
    a.drain(i..i + 2);
    a.extend(["--epochs", "18446744073709551615"]);
    let e = fails(&a);
    assert!(e.contains("epochs") && e.contains("more than 100000000 steps"), "{e}");
    assert!(!out.exists(), "nothing was written");
    // More than one epoch re-treats instances: said, not silent.
    let mut a = train_args(&c, &t, &v, &out);
    let i = a.iter().position(|x| *x == "--steps").expect("steps");
    a.drain(i..i + 2);
    a.retain(|x| *x != "--quiet");
    let i = a.iter().position(|x| *x == "0,1,2,4:8:4").expect("list");
    a[i] = "0,4";
    a.extend(["--epochs", "2"]);
    let run = memsteer(&a);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("re-treat every instance"), "{err}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, t, v) = setup(dir.path());
    let out = dir.path().join("run");
    let e = fails(&["train", "--instances", s(&t), "--out", s(&out)]);
    assert!(e.contains("--model-config") || e.contains("--init"), "{e}");
    let mut a = train_args(&c, &t, &v, &out);
    a.extend(["--schedule", "linear"]);
    let e = fails(&a);
    assert!(e.contains("linear"), "{e}");
    let mut a = train_args(&c, &t, &v, &out);
    let i = a.iter().position(|x| *x == "0,1,2,4:8:4").expect("list");
    a[i] = "0,20";
    let e = fails(&a);
    assert!(e.contains("beyond the run's 10 steps"), "{e}");
    let big = dir.path().join("big.jsonl");
    std::fs::write(&big, "{\"id\": \"a\", \"tokens\": [1, 40]}\n").expect("write");
    let e = fails(&train_args(&c, &big, &v, &out));
    assert!(e.contains("outside the model's vocabulary of 32"), "{e}");
    let e = fails(&train_args(&c, &t, &t, &out));
    assert!(e.contains("also a training instance"), "{e}");
}

#[test]
fn a_toml_config_holds_the_flags_and_the_command_line_overrides_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, t, v) = setup(dir.path());
    let cfg = dir.path().join("train.toml");
    std::fs::write(
        &cfg,
        format!(
            "model_config = {:?}\ninstances = {:?}\nvalidation = {:?}\nbatch-size = 3\nepochs = 2\nlr = 0.01\n\
             warmup = 2\nseed = 5\ncheckpoint_steps = [0, 1, 2, 4]\nquiet = true\n",
            s(&c),
            s(&t),
            s(&v)
        ),
    )
    .expect("toml");
    // The command line's --steps 4 overrides the file's `epochs` (the two exclude each other), and a
    // global --threads before the subcommand is no obstacle.
    let out = dir.path().join("run");
    ok(&["--threads", "2", "train", "--config", s(&cfg), "--steps", "4", "--out", s(&out)]);
    let losses = std::fs::read_to_string(out.join("loss.csv")).expect("loss.csv");
    assert_eq!(losses.lines().count(), 1 + 4, "{losses}");
    let batches = std::fs::read_to_string(out.join("batches.jsonl")).expect("batches");
    let first: serde_json::Value = serde_json::from_str(batches.lines().next().expect("a batch")).expect("json");
    assert_eq!(first["ids"].as_array().expect("ids").len(), 3, "batch size from the file");
    // The same run from flags alone gives the same losses.
    let flags = dir.path().join("flags");
    let mut args = train_args(&c, &t, &v, &flags);
    let at = args.iter().position(|a| *a == "--steps").expect("--steps");
    args[at + 1] = "4";
    let cp = args.iter().position(|a| *a == "--checkpoint-steps").expect("--checkpoint-steps");
    args[cp + 1] = "0,1,2,4";
    ok(&args);
    assert_eq!(std::fs::read_to_string(flags.join("loss.csv")).expect("loss.csv"), losses);
    // Unknown keys and unreadable files are errors naming the file.
    std::fs::write(&cfg, "stpes = 3\n").expect("toml");
    let e = fails(&["train", "--config", s(&cfg), "--out", s(&out)]);
    assert!(e.contains("train.toml") && e.contains("unknown key `stpes`"), "{e}");
    std::fs::write(&cfg, "steps = [\n").expect("toml");
    let e = fails(&["train", "--config", s(&cfg), "--out", s(&out)]);
    assert!(e.contains("train.toml") && e.contains("TOML"), "{e}");
    std::fs::write(&cfg, "quiet = \"yes\"\n").expect("toml");
    let e = fails(&["train", "--config", s(&cfg), "--out", s(&out)]);
    assert!(e.contains("train.toml") && e.contains("`quiet` is a switch"), "{e}");
    std::fs::write(&cfg, "steps = true\n").expect("toml");
    let e = fails(&["train", "--config", s(&cfg), "--out", s(&out)]);
    assert!(e.contains("train.toml") && e.contains("takes a value"), "{e}");
}

#[test]
fn trains_a_gpt2_model_whose_checkpoints_logprobs_reads() {
    trains_and_scores(
        r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 32, "n_positions": 32,
            "n_embd": 16, "n_layer": 2, "n_head": 2, "activation_function": "gelu_new"}"#,
        "gpt2",
    );
}

/// A Llama config (grouped-query attention, RMSNorm, SwiGLU) in the layout Hub checkpoints carry.
#[test]
fn trains_a_llama_model_whose_checkpoints_logprobs_reads() {
    trains_and_scores(
        r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 32,
            "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
            "hidden_act": "silu"}"#,
        "llama",
    );
}

/// Gemma 3 (sandwich norms with `1 + w`, GeGLU, a sliding layer with its local rotary base), Gemma 2
/// (soft-capped attention scores and logits, its default caps) and OLMo 2 (norms after the branches) in
/// the Hub layout.
#[test]
fn trains_gemma3_gemma2_and_olmo2_models_whose_checkpoints_logprobs_reads() {
    trains_and_scores(
        r#"{"model_type": "gemma3_text", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32,
            "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "sliding_window": 4, "sliding_window_pattern": 2,
            "query_pre_attn_scalar": 8, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "hidden_activation": "gelu_pytorch_tanh"}"#,
        "gemma3_text",
    );
    trains_and_scores(
        r#"{"model_type": "gemma2", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32,
            "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "sliding_window": 4, "query_pre_attn_scalar": 8,
            "rope_theta": 10000.0, "hidden_activation": "gelu_pytorch_tanh"}"#,
        "gemma2",
    );
    trains_and_scores(
        r#"{"model_type": "olmo2", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "hidden_act": "silu"}"#,
        "olmo2",
    );
}

fn trains_and_scores(config: &str, model_type: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, t, v) = setup(dir.path());
    std::fs::write(&c, config).expect("config");
    let out = dir.path().join("run");
    ok(&train_args(&c, &t, &v, &out));
    let loss = std::fs::read_to_string(out.join("loss.csv")).expect("loss");
    let rows: Vec<Vec<f64>> =
        loss.lines().skip(1).map(|l| l.split(',').map(|f| f.parse().expect("number")).collect()).collect();
    assert_eq!(rows.len(), 10);
    assert!(rows[9][1] < rows[0][1] - 0.1, "{model_type}: {loss}");
    // The checkpoint keeps the config's family.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("step10/config.json")).expect("config")).expect("json");
    assert_eq!(config["model_type"], model_type);
    if model_type == "gemma2" {
        // The config file is kept as given (without the caps), which reads back with transformers'
        // default caps: the function that was trained.
        let arch = memsteer_lm::arch::Arch::from_file(&out.join("step10/config.json")).expect("config");
        assert_eq!((arch.attn_softcap, arch.logit_softcap), (Some(50.0), Some(30.0)));
    }
    let panel = dir.path().join("panel.csv");
    ok(&[
        "logprobs",
        "--checkpoints",
        s(&out.join("checkpoints.json")),
        "--instances",
        s(&out.join("instances.jsonl")),
        "--out",
        s(&panel),
        "--quiet",
    ]);
    let text = std::fs::read_to_string(&panel).expect("panel");
    assert_eq!(text.lines().count(), 1 + 15 * 6);
    // The trained instances gain log-probability from step 0 to step 10 on average.
    let mean_at = |step: &str| {
        let vals: Vec<f64> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f[0].starts_with('t') && f[2] == step)
            .map(|f| f[3].parse().expect("outcome"))
            .collect();
        vals.iter().sum::<f64>() / vals.len() as f64
    };
    assert!(mean_at("10") > mean_at("0") + 1.0, "{model_type}: {} vs {}", mean_at("10"), mean_at("0"));
}

#[test]
fn file_order_trains_on_the_instances_as_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, t, v) = setup(dir.path());
    let out = dir.path().join("run");
    let mut a = train_args(&c, &t, &v, &out);
    a.extend(["--order", "file"]);
    ok(&a);
    // 10 steps of 3 over 12 instances: t0 t1 t2 | … | t9 t10 t11 | t0 t1 t2 (the second epoch, in order).
    let batches: Vec<Vec<String>> = std::fs::read_to_string(out.join("batches.jsonl"))
        .expect("batches")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_str().expect("id").to_string())
                .collect()
        })
        .collect();
    let want: Vec<Vec<String>> = (0..10).map(|k| (0..3).map(|j| format!("t{}", (3 * k + j) % 12)).collect()).collect();
    assert_eq!(batches, want);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(run["order"], "file");
    // A shuffled run into the same directory is another run.
    let e = fails(&train_args(&c, &t, &v, &out));
    assert!(e.contains("different training run"), "{e}");
}
