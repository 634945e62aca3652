//! `memsteer steer eval`: dist-n in closed form, perplexity against `Model::token_log_probs`, an external
//! scorer and its errors, the built-in sentiment scorer and the continuous-control plot.

use super::*;

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["steer", "eval", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(ok(&all).trim()).expect("one JSON object")
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn steer_eval_dist_n_matches_the_closed_form() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Prompt "a": words a b a | a b c → 6 words, 3 distinct unigrams, 3 bigrams, 2 trigrams.
    // Prompt 7: x x x x → 4 words, 1 unigram, 1 bigram, 1 trigram. Averaged over the two prompts.
    let g = write(
        dir.path(),
        "g.jsonl",
        "{\"prompt_id\": \"a\", \"sample\": 0, \"tokens\": [1], \"text\": \" a b  a\"}\n\
         {\"prompt_id\": 7, \"sample\": 0, \"tokens\": [1], \"text\": \"x x\\nx x\"}\n\
         {\"prompt_id\": \"a\", \"sample\": 1, \"tokens\": [1], \"text\": \"a b c\"}\n",
    );
    let v = eval_json(&["--generations", s(&g), "--scorer", "none"]);
    let f = &v["files"][0];
    let dist: Vec<f64> = f["dist"].as_array().expect("dist").iter().map(|x| x.as_f64().expect("f64")).collect();
    let want = [(0.5 + 0.25) / 2.0, (0.5 + 0.25) / 2.0, (2.0 / 6.0 + 0.25) / 2.0];
    for (d, w) in dist.iter().zip(want) {
        assert!(close(*d, w, 1e-12), "{dist:?} vs {want:?}");
    }
    assert_eq!(f["prompts"], 2);
    assert_eq!(f["samples"], 3);
    assert_eq!(f["dist_on_tokens"], false);
    assert!(f["score_mean"].is_null() && f["perplexity"].is_null(), "{v}");
    assert_eq!(v["scorer"], "none");

    // Without `text`, token ids are the words (and a note says so).
    let t = write(
        dir.path(),
        "t.jsonl",
        "{\"prompt_id\": \"a\", \"sample\": 0, \"tokens\": [5, 6, 5]}\n{\"prompt_id\": \"a\", \"sample\": 1, \"tokens\": [5, 6, 9]}\n",
    );
    let out = memsteer(&["steer", "eval", "--generations", s(&t), "--scorer", "none", "--json"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token ids as words"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["files"][0]["dist_on_tokens"], true);
    let d = &v["files"][0]["dist"];
    assert!(close(d[0].as_f64().unwrap(), 0.5, 1e-12) && close(d[2].as_f64().unwrap(), 1.0 / 3.0, 1e-12), "{v}");

    // The table names the file and its label.
    let table = ok(&["steer", "eval", "--generations", &format!("{}:-2", s(&g)), "--scorer", "none"]);
    assert!(table.contains("g.jsonl") && table.contains("-2") && table.contains("0.3750"), "{table}");

    // Clear errors: the scorer needs text; a missing file; a line without prompt_id.
    let e = fails(&["steer", "eval", "--generations", s(&t)]);
    assert!(e.contains("needs `text`"), "{e}");
    let e = fails(&["steer", "eval", "--generations", "/nonexistent/g.jsonl", "--scorer", "none"]);
    assert!(e.contains("/nonexistent/g.jsonl"), "{e}");
    let bad = write(dir.path(), "bad.jsonl", "{\"sample\": 0, \"text\": \"a\"}\n");
    let e = fails(&["steer", "eval", "--generations", s(&bad), "--scorer", "none"]);
    assert!(e.contains("prompt_id") && e.contains("line 1"), "{e}");
}

#[test]
fn steer_eval_scorer_cmd_reads_one_number_per_sample_and_reports_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let texts = ["short", "a longer text, with \"quotes\"", "mid size"];
    let mut body = String::new();
    for (i, t) in texts.iter().enumerate() {
        body.push_str(&serde_json::json!({"prompt_id": "p", "sample": i, "tokens": [1], "text": t}).to_string());
        body.push('\n');
    }
    let g = write(dir.path(), "g.jsonl", &body);
    // The scorer sees one JSON line {"text": …} per sample; awk prints each line's length.
    let v = eval_json(&["--generations", s(&g), "--scorer-cmd", "awk '{ print length($0) }'"]);
    let lens: Vec<f64> = texts.iter().map(|t| serde_json::json!({"text": t}).to_string().len() as f64).collect();
    let mean = lens.iter().sum::<f64>() / 3.0;
    assert!(close(v["files"][0]["score_mean"].as_f64().expect("mean"), mean, 1e-12), "{v} vs {lens:?}");
    assert_eq!(v["scorer"], "command");
    assert!(v["scorer_held_out_accuracy"].is_null());

    let e = fails(&["steer", "eval", "--generations", s(&g), "--scorer-cmd", "head -n 1 | awk '{ print 1 }'"]);
    assert!(e.contains("expected 3 scores") && e.contains("got 1"), "{e}");
    let e = fails(&["steer", "eval", "--generations", s(&g), "--scorer-cmd", "sed 's/.*/high/'"]);
    assert!(e.contains("not a number") && e.contains("high"), "{e}");
    let e = fails(&["steer", "eval", "--generations", s(&g), "--scorer-cmd", "echo no model here >&2; exit 3"]);
    assert!(e.contains("failed") && e.contains("no model here"), "{e}");
}

#[test]
fn steer_eval_builtin_scorer_and_plot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let neg = write(
        dir.path(),
        "neg.jsonl",
        "{\"prompt_id\": \"p\", \"sample\": 0, \"tokens\": [1], \"text\": \"terrible, awful, I hated it\"}\n",
    );
    let mid = write(
        dir.path(),
        "mid.jsonl",
        "{\"prompt_id\": \"p\", \"sample\": 0, \"tokens\": [1], \"text\": \"It was a film I watched\"}\n",
    );
    let pos = write(
        dir.path(),
        "pos.jsonl",
        "{\"prompt_id\": \"p\", \"sample\": 0, \"tokens\": [1], \"text\": \"I loved it, wonderful\"}\n",
    );
    let plot = dir.path().join("control.svg");
    let v = eval_json(&[
        "--generations",
        &format!("{}:-1", s(&neg)),
        "--generations",
        &format!("{}:0", s(&mid)),
        "--generations",
        &format!("{}:1", s(&pos)),
        "--plot",
        s(&plot),
    ]);
    let acc = v["scorer_held_out_accuracy"].as_f64().expect("accuracy");
    assert!(acc >= 0.7, "held-out accuracy {acc}");
    eprintln!("built-in sentiment scorer: held-out accuracy {acc} on {} sentences", v["scorer_held_out"]);
    assert_eq!(v["scorer"], "builtin-sentiment");
    let score = |i: usize| v["files"][i]["score_mean"].as_f64().expect("score");
    assert!(score(2) > score(0), "{v}");
    assert!(score(2) > 0.5 && score(0) < 0.5, "{v}");
    assert_eq!(v["files"][0]["label"], "-1");
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.contains("strength"), "{}", &svg[..svg.len().min(200)]);

    // The table states the scorer's accuracy; a label that is not a number cannot be plotted.
    let table = ok(&["steer", "eval", "--generations", s(&pos)]);
    assert!(table.contains("held-out accuracy"), "{table}");
    let e = fails(&["steer", "eval", "--generations", &format!("{}:strong", s(&pos)), "--plot", s(&plot)]);
    assert!(e.contains("not a number"), "{e}");
}

#[test]
fn steer_eval_perplexity_equals_exp_of_the_mean_token_log_prob() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("lm/tiny-gpt2-tokenizer");
    let prompts = write(
        dir.path(),
        "prompts.jsonl",
        "{\"id\": \"a\", \"tokens\": [400, 401, 402]}\n{\"id\": 7, \"text\": \"The cat\"}\n",
    );
    let g = dir.path().join("g.jsonl");
    ok(&[
        "steer",
        "generate",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--samples",
        "3",
        "--max-new-tokens",
        "6",
        "--seed",
        "5",
        "--out",
        s(&g),
    ]);
    let v =
        eval_json(&["--generations", s(&g), "--ppl-model", s(&model), "--prompts", s(&prompts), "--scorer", "none"]);

    let m = memsteer_lm::Model::load(&model).expect("model");
    let tok = memsteer_lm::tokenizer::Tokenizer::from_dir(&model).expect("tokenizer");
    let cat = tok.encode("The cat").expect("encode");
    let mut ppls = Vec::new();
    for line in std::fs::read_to_string(&g).expect("generations").lines() {
        let x: serde_json::Value = serde_json::from_str(line).expect("json");
        let prompt: Vec<u32> = if x["prompt_id"] == "a" { vec![400, 401, 402] } else { cat.clone() };
        let cont: Vec<u32> =
            x["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().unwrap() as u32).collect();
        let seq: Vec<u32> = prompt.iter().chain(&cont).copied().collect();
        let lp = m.token_log_probs(&seq).expect("log-probs");
        let tail = &lp[prompt.len() - 1..];
        assert_eq!(tail.len(), cont.len());
        let mean = tail.iter().map(|&l| f64::from(l)).sum::<f64>() / tail.len() as f64;
        ppls.push((-mean).exp());
    }
    let kept: Vec<f64> = ppls.iter().copied().filter(|p| *p < 1e4).collect();
    let want = kept.iter().sum::<f64>() / kept.len() as f64;
    let f = &v["files"][0];
    assert_eq!(f["perplexity_dropped"].as_u64(), Some((ppls.len() - kept.len()) as u64), "{v}");
    let got = f["perplexity"].as_f64().expect("perplexity");
    assert!(close(got, want, 1e-4), "perplexity {got} vs {want} ({ppls:?})");

    // A prompt id missing from --prompts is an error naming it.
    let only_a = write(dir.path(), "only_a.jsonl", "{\"id\": \"a\", \"tokens\": [400, 401, 402]}\n");
    let e = fails(&[
        "steer",
        "eval",
        "--generations",
        s(&g),
        "--ppl-model",
        s(&model),
        "--prompts",
        s(&only_a),
        "--scorer",
        "none",
    ]);
    assert!(e.contains("\"7\"") && e.contains("no prompt"), "{e}");
}

/// A perplexity model with another tokenizer never reads the generator's ids: it tokenizes `text` again
/// (continuations and prompts), and a sample or prompt with ids only is an error that says why.
#[test]
fn steer_eval_never_mixes_tokenizers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("lm/tiny-gpt2-tokenizer");
    // The judge: the same weights, a tokenizer file that differs (one space more: another fingerprint).
    let judge = dir.path().join("judge");
    std::fs::create_dir(&judge).expect("mkdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), judge.join(f)).expect("copy");
    }
    let tj = std::fs::read_to_string(model.join("tokenizer.json")).expect("tokenizer");
    std::fs::write(judge.join("tokenizer.json"), tj.replacen('{', "{ ", 1)).expect("tokenizer");
    let prompts = write(
        dir.path(),
        "prompts.jsonl",
        "{\"id\": \"a\", \"tokens\": [400, 401, 402]}\n{\"id\": 7, \"text\": \"The cat\"}\n",
    );
    let g = dir.path().join("g.jsonl");
    let gen_args = |p: &Path| {
        vec![
            "steer".to_string(),
            "generate".into(),
            "--model".into(),
            s(&model).into(),
            "--prompts".into(),
            s(p).into(),
            "--samples".into(),
            "2".into(),
            "--max-new-tokens".into(),
            "6".into(),
            "--seed".into(),
            "3".into(),
            "--out".into(),
            s(&g).into(),
        ]
    };
    let run = |args: &[String]| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run(&gen_args(&prompts));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&g)
        .expect("generations")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(lines.iter().all(|l| l["tokenizer"].is_string()), "generate records its tokenizer: {lines:?}");
    let eval_args = |gens: &Path, p: &Path| {
        vec!["steer", "eval", "--generations", s(gens), "--ppl-model", s(&judge), "--prompts", s(p), "--scorer", "none"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let fail = |args: Vec<String>| fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Prompt "a" has ids only: the judge cannot read them.
    let e = fail(eval_args(&g, &prompts));
    assert!(e.contains("prompts.jsonl, line 1") && e.contains("token ids only"), "{e}");
    // With text prompts the judge tokenizes everything itself; the perplexity is its own.
    let text_prompts =
        write(dir.path(), "text.jsonl", "{\"id\": \"a\", \"text\": \"Once\"}\n{\"id\": 7, \"text\": \"The cat\"}\n");
    run(&gen_args(&text_prompts));
    let args = eval_args(&g, &text_prompts);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&[&args.iter().map(String::as_str).collect::<Vec<_>>()[..], &["--json"]].concat()))
            .expect("json");
    let m = memsteer_lm::Model::load(&judge).expect("model");
    let tok = memsteer_lm::tokenizer::Tokenizer::from_dir(&judge).expect("tokenizer");
    let mut ppls = Vec::new();
    for line in std::fs::read_to_string(&g).expect("generations").lines() {
        let x: serde_json::Value = serde_json::from_str(line).expect("json");
        let prompt = tok.encode(if x["prompt_id"] == "a" { "Once" } else { "The cat" }).expect("encode");
        let cont = tok.encode(x["text"].as_str().expect("text")).expect("encode");
        let seq: Vec<u32> = prompt.iter().chain(&cont).copied().collect();
        let lp = m.token_log_probs(&seq).expect("log-probs");
        let tail = &lp[prompt.len() - 1..];
        ppls.push((-tail.iter().map(|&l| f64::from(l)).sum::<f64>() / tail.len() as f64).exp());
    }
    let kept: Vec<f64> = ppls.iter().copied().filter(|p| *p < 1e4).collect();
    let want = kept.iter().sum::<f64>() / kept.len() as f64;
    let got = v["files"][0]["perplexity"].as_f64().expect("perplexity");
    assert!(close(got, want, 1e-4), "perplexity {got} vs {want}");
    // Generations with ids only: refused, whether their tokenizer is another or unknown.
    let strip = |name: &str, keep_fingerprint: bool| {
        let body: String = std::fs::read_to_string(&g)
            .expect("generations")
            .lines()
            .map(|l| {
                let mut x: serde_json::Value = serde_json::from_str(l).expect("json");
                let o = x.as_object_mut().expect("object");
                o.remove("text");
                if !keep_fingerprint {
                    o.remove("tokenizer");
                }
                format!("{x}\n")
            })
            .collect();
        write(dir.path(), name, &body)
    };
    let e = fail(eval_args(&strip("ids.jsonl", true), &text_prompts));
    assert!(e.contains("ids.jsonl, sample 1") && e.contains("another tokenizer"), "{e}");
    let e = fail(eval_args(&strip("bare.jsonl", false), &text_prompts));
    assert!(e.contains("do not say which tokenizer"), "{e}");
    // Under the generator's own model the ids are used as they are.
    let own_file = strip("own.jsonl", true);
    ok(&["steer", "eval", "--generations", s(&own_file), "--ppl-model", s(&model), "--scorer", "none"]);
}
