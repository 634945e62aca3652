//! `memsteer steer train | generate | highlight` end to end on the tiny GPT-2 with a tokenizer, on a
//! planted task: the positive corpus is rich in token ids 10 and 11 (`+`, `,`), the negative one
//! in 30 and 31 (`?`, `@`).

use super::*;

const MODEL: &str = "lm/tiny-gpt2-tokenizer";
const POSITIVE: std::ops::Range<u32> = 10..12;
const NEGATIVE: std::ops::Range<u32> = 30..32;

fn corpus(path: &Path, planted: std::ops::Range<u32>, seed: u64) {
    let mut rng = memsteer_panel::rng::SplitMix64::new(seed);
    let mut lines = String::new();
    for _ in 0..24 {
        let tokens: Vec<u32> = (0..16)
            .map(|_| {
                if rng.uniform() < 0.5 {
                    planted.start + rng.below(u64::from(planted.end - planted.start)) as u32
                } else {
                    300 + rng.below(300) as u32
                }
            })
            .collect();
        lines.push_str(&format!("{{\"tokens\": {tokens:?}}}\n"));
    }
    std::fs::write(path, lines).expect("corpus");
}

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    steer: PathBuf,
    prompts: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pos, neg) = (dir.path().join("pos.jsonl"), dir.path().join("neg.jsonl"));
    corpus(&pos, POSITIVE, 1);
    corpus(&neg, NEGATIVE, 2);
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"p0\", \"tokens\": [400, 401, 402]}\n{\"id\": 7, \"text\": \"The cat\"}\n\
         {\"id\": \"p2\", \"tokens\": [350]}\n{\"id\": \"p3\", \"tokens\": [500, 320]}\n",
    )
    .expect("prompts");
    let model = fixture(MODEL);
    let steer = dir.path().join("steer.safetensors");
    let out = memsteer(&[
        "steer",
        "train",
        "--model",
        s(&model),
        "--positive",
        s(&pos),
        "--negative",
        s(&neg),
        "--out",
        s(&steer),
        "--rank",
        "8",
        "--steps",
        "300",
        "--lr",
        "0.1",
        "--epsilon",
        "10",
        "--batch-size",
        "8",
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("48 sequences"), "{err}");
    Setup { dir, model, steer, prompts }
}

fn generations(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("generations")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

fn generate(st: &Setup, steers: &[String], extra: &[&str], name: &str) -> Vec<serde_json::Value> {
    let out = st.dir.path().join(name);
    let mut args = vec![
        "steer".to_string(),
        "generate".into(),
        "--model".into(),
        s(&st.model).into(),
        "--prompts".into(),
        s(&st.prompts).into(),
        "--samples".into(),
        "4".into(),
        "--max-new-tokens".into(),
        "20".into(),
        "--seed".into(),
        "7".into(),
        "--out".into(),
        s(&out).into(),
    ];
    for st in steers {
        args.push("--steer".into());
        args.push(st.clone());
    }
    args.extend(extra.iter().map(|x| x.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    generations(&out)
}

fn share(gens: &[serde_json::Value], set: std::ops::Range<u32>) -> f64 {
    let tokens: Vec<u64> = gens
        .iter()
        .flat_map(|g| g["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id")))
        .collect();
    tokens.iter().filter(|&&t| set.contains(&(t as u32))).count() as f64 / tokens.len() as f64
}

#[test]
fn steer_train_generate_and_highlight_end_to_end() {
    let st = setup();
    let file = s(&st.steer).to_string();

    // The steer file records its training settings.
    let steer = memsteer_steer::Steer::load(&st.steer).expect("steer loads");
    assert_eq!(steer.labels(), ["positive"]);
    assert_eq!(steer.rank(), 8);
    assert_eq!(steer.training()["steps"], 300);

    // The share of the planted tokens moves monotonically with strength.
    let strengths = ["-3", "0", "3"];
    let runs: Vec<Vec<serde_json::Value>> =
        strengths.iter().map(|v| generate(&st, &[format!("{file}:{v}")], &[], &format!("g{v}.jsonl"))).collect();
    let pos: Vec<f64> = runs.iter().map(|g| share(g, POSITIVE)).collect();
    let neg: Vec<f64> = runs.iter().map(|g| share(g, NEGATIVE)).collect();
    assert!(pos[0] <= pos[1] && pos[1] <= pos[2] && pos[2] > pos[0] + 0.05, "positive share {pos:?}");
    // The negative set is the weaker side on this 16-dimensional model (at −3 the steer's shift also lifts
    // unplanted tokens), so the difference of the two shares is what must move monotonically.
    let diff: Vec<f64> = pos.iter().zip(&neg).map(|(p, n)| p - n).collect();
    assert!(diff[0] <= diff[1] && diff[1] <= diff[2], "positive − negative share {diff:?}");
    eprintln!("planted shares at strengths -3, 0, 3: positive {pos:?}, negative {neg:?}");

    // One line per (prompt, sample) in order, the id kept as given, text decoded.
    let g = &runs[2];
    assert_eq!(g.len(), 16);
    assert_eq!(g[0]["prompt_id"], "p0");
    assert_eq!(g[4]["prompt_id"], 7);
    assert_eq!(g[5]["sample"], 1);
    assert_eq!(g[0]["tokens"].as_array().expect("tokens").len(), 20);
    assert!(g[0]["text"].is_string());

    // Deterministic for a seed, and the same with one thread.
    let again = generate(&st, &[format!("{file}:3")], &["--threads", "1"], "again.jsonl");
    assert_eq!(&again, g);
    // FILE alone means +1; two steers at +1.5 each compose to one at +3 (up to rounding in the sum).
    let one = generate(&st, std::slice::from_ref(&file), &[], "one.jsonl");
    let plus1 = generate(&st, &[format!("{file}:1")], &[], "plus1.jsonl");
    assert_eq!(one, plus1);
    // Steers compose by adding their contributions: a zero steer beside the trained one changes nothing,
    // while a second copy of the trained one (its dummy steer included) does.
    let model = memsteer_lm::Model::load(&st.model).expect("model");
    let decoder = model.decoder();
    let spec = memsteer_steer::SteerSpec {
        num_steers: 2,
        hidden_size: decoder.dim(),
        rank: 1,
        vocab_size: decoder.vocab(),
        epsilon: 1.0,
        embedding_fingerprint: memsteer_steer::embedding_fingerprint(decoder.output_embedding()),
        labels: vec!["zero".into()],
    };
    let zeros = vec![0.0f32; 2 * decoder.dim()];
    let zero = st.dir.path().join("zero.safetensors");
    memsteer_steer::Steer::new(spec, zeros.clone(), zeros, serde_json::json!({}))
        .expect("zero")
        .save(&zero)
        .expect("save");
    let with_zero = generate(&st, &[format!("{file}:3"), format!("{}:-2", s(&zero))], &[], "zero.jsonl");
    assert_eq!(&with_zero, g);
    let twice = generate(&st, &[format!("{file}:1.5"), format!("{file}:1.5")], &[], "twice.jsonl");
    assert_ne!(&twice, g);
    assert!(share(&twice, POSITIVE) > pos[1], "two steers at +1.5 still raise the planted share");

    // No --steer is the base model: greedy decoding equals `Model::generate`.
    let base = generate(&st, &[], &["--temperature", "0"], "base.jsonl");
    let cfg = memsteer_lm::sample::SamplingConfig { temperature: 0.0, top_k: None, top_p: None };
    let want = model.generate(&[400, 401, 402], 20, &cfg, &mut || 0.5).expect("generate");
    let got: Vec<u32> =
        base[0]["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id") as u32).collect();
    assert_eq!(got, want);

    // Highlight: evidence on the planted tokens (`,` is id 11), escaped HTML.
    let html = st.dir.path().join("h.html");
    let text = "<b>a, b, c</b> & \"quoted\" words";
    let json = ok(&[
        "steer",
        "highlight",
        "--model",
        s(&st.model),
        "--steer",
        &file,
        "--text",
        text,
        "--spans",
        "2",
        "--span-length",
        "3",
        "--html",
        s(&html),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON");
    let spans = v["spans"].as_array().expect("spans");
    assert!(!spans.is_empty() && spans.len() <= 2, "{v}");
    for sp in spans {
        let (a, b) = (sp["start"].as_u64().expect("start"), sp["end"].as_u64().expect("end"));
        assert!(b > a && b - a <= 3, "{sp}");
        assert!(sp["evidence"].as_f64().expect("evidence") > 0.0);
    }
    let pieces: String =
        v["tokens"].as_array().expect("tokens").iter().map(|t| t["text"].as_str().expect("text")).collect();
    assert_eq!(pieces, text);
    assert!(v["tokens"][0]["evidence"].is_null());
    let page = std::fs::read_to_string(&html).expect("html");
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(page.contains("&lt;") && page.contains("&amp;") && page.contains("&quot;"), "{page}");
    assert!(!page.contains("<b>"), "unescaped text in the page");
    assert_eq!(page.matches("class=\"span\"").count(), spans.len());
    assert!(page.contains("<style>"));
    // Without --json: the text with the spans marked, and a line per span.
    // Multi-byte characters split across byte-level tokens come out whole.
    let unicode = "naïve café ✓ 日本";
    let json = ok(&["steer", "highlight", "--model", s(&st.model), "--steer", &file, "--text", unicode, "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON");
    let pieces: String =
        v["tokens"].as_array().expect("tokens").iter().map(|t| t["text"].as_str().expect("text")).collect();
    assert_eq!(pieces, unicode);
    let plain = ok(&["steer", "highlight", "--model", s(&st.model), "--steer", &file, "--text", text]);
    assert!(plain.contains("[[") && plain.contains("span 1:"), "{plain}");
    // --strength -1 compares the other way round: every token's evidence changes sign.
    let highlight_json = |extra: &[&str]| -> serde_json::Value {
        let args =
            [&["steer", "highlight", "--model", s(&st.model), "--steer", &file, "--text", text, "--json"], extra]
                .concat();
        serde_json::from_str(ok(&args).trim()).expect("JSON")
    };
    let evidence = |extra: &[&str]| -> Vec<f64> {
        let v = highlight_json(extra);
        v["tokens"].as_array().expect("tokens").iter().skip(1).map(|t| t["evidence"].as_f64().expect("e")).collect()
    };
    let (up, down) = (evidence(&[]), evidence(&["--strength", "-1"]));
    assert!(up.iter().any(|e| e.abs() > 1e-3), "{up:?}");
    for (a, b) in up.iter().zip(&down) {
        assert!((a + b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
    }
    // The strength is used as given, not only its sign: evidence at 2 is larger than at 1 on the planted token.
    let twice = evidence(&["--strength", "2"]);
    let (i, a) = up.iter().enumerate().max_by(|x, y| x.1.abs().total_cmp(&y.1.abs())).expect("tokens");
    assert!(twice[i].abs() > 1.5 * a.abs(), "strength 2: {} vs strength 1: {a}", twice[i]);
    let against = st.dir.path().join("against.html");
    let v = highlight_json(&["--strength=-1.5", "--html", s(&against)]);
    assert_eq!(v["strength"], -1.5);
    let page = std::fs::read_to_string(&against).expect("html");
    assert!(page.contains("Evidence against") && page.contains("at -1.5 against 1.5"), "{page}");
    let e =
        fails(&["steer", "highlight", "--model", s(&st.model), "--steer", &file, "--text", text, "--strength", "0"]);
    assert!(e.contains("--strength"), "{e}");
}

#[test]
fn steer_errors_name_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture(MODEL);
    let (pos, neg) = (dir.path().join("pos.jsonl"), dir.path().join("neg.jsonl"));
    corpus(&pos, POSITIVE, 1);
    corpus(&neg, NEGATIVE, 2);
    let steer = dir.path().join("s.safetensors");
    let train = |p: &Path, n: &Path| -> Vec<String> {
        [
            "steer",
            "train",
            "--model",
            s(&model),
            "--positive",
            s(p),
            "--negative",
            s(n),
            "--out",
            s(&steer),
            "--rank",
            "2",
            "--steps",
            "3",
            "--quiet",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let run_fail = |args: Vec<String>| fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").expect("empty");
    let e = run_fail(train(&pos, &empty));
    assert!(e.contains("empty corpus") && e.contains("empty.jsonl"), "{e}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"tokens\": [1, 2]}\n{\"words\": \"x\"}\n").expect("bad");
    let e = run_fail(train(&pos, &bad));
    assert!(e.contains("bad.jsonl, line 2") && e.contains("`text`"), "{e}");
    std::fs::write(&bad, "{\"tokens\": [1, 99999]}\n").expect("bad");
    let e = run_fail(train(&bad, &neg));
    assert!(e.contains("bad.jsonl, line 1") && e.contains("99999") && e.contains("vocabulary"), "{e}");
    let mut on = train(&pos, &neg);
    on.extend(["--device".to_string(), "tpu".to_string()]);
    let e = run_fail(on);
    assert!(e.contains("unknown device \"tpu\""), "{e}");
    let mut on = train(&pos, &neg);
    on.extend(["--device".to_string(), "cuda:999".to_string()]);
    let e = run_fail(on);
    assert!(e.contains("--features cuda") || e.contains("is not available"), "{e}");
    ok(&train(&pos, &neg).iter().map(String::as_str).collect::<Vec<_>>());
    // Spilling the hidden states to disk gives the same steer file, byte for byte.
    let in_memory = std::fs::read(&steer).expect("steer");
    let mut spill: Vec<String> = train(&pos, &neg).into_iter().filter(|a| a != "--quiet").collect();
    spill.extend(["--cache-memory", "0", "--cache-dir", s(dir.path())].map(String::from));
    let run = memsteer(&spill.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stderr).contains("spilled to a temporary file"), "the cache did not spill");
    assert_eq!(std::fs::read(&steer).expect("steer"), in_memory);
    let mut bad = train(&pos, &neg);
    bad.push("--cache-memory=-1".to_string());
    let e = run_fail(bad);
    assert!(e.contains("--cache-memory"), "{e}");

    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"id\": 1, \"tokens\": [5, 6]}\n").expect("prompts");
    let out = dir.path().join("g.jsonl");
    let generate = |m: &Path, spec: &str| -> String {
        fails(&[
            "steer",
            "generate",
            "--model",
            s(m),
            "--steer",
            spec,
            "--prompts",
            s(&prompts),
            "--max-new-tokens",
            "3",
            "--seed",
            "1",
            "--out",
            s(&out),
        ])
    };
    let file = s(&steer).to_string();
    let e = generate(&model, &format!("{file}:nan"));
    assert!(e.contains("finite"), "{e}");
    let e = generate(&model, &format!("{file}:inf"));
    assert!(e.contains("finite"), "{e}");
    let e = generate(&model, &format!("{file}:strong"));
    assert!(e.contains("not a strength"), "{e}");
    let e = generate(&model, s(&dir.path().join("missing.safetensors")));
    assert!(e.contains("missing.safetensors"), "{e}");
    let e = generate(&fixture("lm/tiny-gpt2-f32"), &file);
    assert!(e.contains("another model") && e.contains("transfer"), "{e}");
    let e = fails(&[
        "steer",
        "generate",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--max-new-tokens",
        "3",
        "--seed",
        "1",
        "--out",
        s(&out),
        "--device",
        "cuda:999",
    ]);
    assert!(
        e.contains("--device cuda:999") && (e.contains("--features cuda") || e.contains("is not available")),
        "{e}"
    );
    assert!(!out.exists());
    // An all-zero initialisation never trains; huge step counts and batch sizes are refused up front.
    for (flag, value, want) in [
        ("--init-std", "0", "init_std"),
        ("--steps", "18446744073709551615", "steps"),
        ("--batch-size", "18446744073709551615", "batch_size"),
    ] {
        let mut a = train(&pos, &neg);
        match a.iter().position(|x| x == flag) {
            Some(i) => a[i + 1] = value.to_string(),
            None => a.extend([flag.to_string(), value.to_string()]),
        }
        let e = fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(e.contains(want), "{flag} {value}: {e}");
    }
}

#[test]
fn steer_explain_and_transfer_end_to_end() {
    let st = setup();
    // explain --json: the layout, singular values descending, every direction with both ends.
    let out = ok(&[
        "steer",
        "explain",
        "--model",
        s(&st.model),
        "--steer",
        s(&st.steer),
        "--dims",
        "3",
        "--top",
        "4",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let dims = v["dimensions"].as_array().expect("dimensions");
    assert_eq!(dims.len(), 3);
    let sv: Vec<f64> = dims.iter().map(|d| d["singular_value"].as_f64().expect("σ")).collect();
    assert!(sv.windows(2).all(|w| w[0] >= w[1]) && sv[0] > 0.0, "{sv:?}");
    for d in dims {
        assert_eq!(d["steer"], 0);
        for side in ["positive", "negative"] {
            let toks = d[side].as_array().expect("tokens");
            assert_eq!(toks.len(), 4);
            assert!(toks.iter().all(|t| t["id"].is_u64() && t["token"].is_string() && t["score"].is_f64()));
        }
    }
    // The planted tokens stand at one end of the top direction (the steer was trained to move them).
    let top: Vec<u64> = ["positive", "negative"]
        .iter()
        .flat_map(|side| dims[0][side].as_array().expect("tokens").iter().map(|t| t["id"].as_u64().expect("id")))
        .collect();
    let planted = POSITIVE.chain(NEGATIVE).map(u64::from).collect::<Vec<_>>();
    assert!(top.iter().any(|id| planted.contains(id)), "top direction's tokens {top:?} miss the planted {planted:?}");
    let table = ok(&["steer", "explain", "--model", s(&st.model), "--steer", s(&st.steer), "--dims", "1"]);
    assert!(!table.trim().is_empty());

    // transfer onto a copy of the model: the map is the identity (residual ≈ 0) and the steer is unchanged.
    let copy = st.dir.path().join("copy");
    std::fs::create_dir(&copy).expect("mkdir");
    for entry in std::fs::read_dir(&st.model).expect("model dir") {
        let p = entry.expect("entry").path();
        std::fs::copy(&p, copy.join(p.file_name().expect("name"))).expect("copy");
    }
    let moved = st.dir.path().join("moved.safetensors");
    let args =
        ["steer", "transfer", "--steer", s(&st.steer), "--from", s(&st.model), "--to", s(&copy), "--out", s(&moved)];
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_memsteer")).args(args).output().expect("run");
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{said}");
    assert!(said.contains("matched by string") && said.contains("relative residual"), "{said}");
    let a = memsteer_steer::Steer::load(&st.steer).expect("steer");
    let b = memsteer_steer::Steer::load(&moved).expect("moved");
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-4 * (1.0 + p.abs()));
    assert!(close(a.projector1(), b.projector1()) && close(a.projector2(), b.projector2()));
    assert!(b.training()["transfer"]["relative_residual"].as_f64().expect("residual") < 1e-5);
    assert_eq!(b.training()["transfer"]["map"], "paper");
    // The authors' map on the identity: B = I, its rows already of unit norm.
    let authors = st.dir.path().join("authors.safetensors");
    let mut args3 = args.to_vec();
    args3[9] = s(&authors);
    args3.extend(["--map", "authors"]);
    ok(&args3);
    let d = memsteer_steer::Steer::load(&authors).expect("authors");
    assert!(close(a.projector1(), d.projector1()) && close(a.projector2(), d.projector2()));
    assert_eq!(d.training()["transfer"]["map"], "authors");
    assert_eq!(d.training()["transfer"]["top_k"], 4000);
    // The two-sided map on the identity: the same steer, both fits recorded.
    let two = st.dir.path().join("two.safetensors");
    let mut args2 = args.to_vec();
    args2[9] = s(&two);
    args2.extend(["--map", "two-sided"]);
    let said = String::from_utf8_lossy(
        &std::process::Command::new(env!("CARGO_BIN_EXE_memsteer")).args(&args2).output().expect("run").stderr,
    )
    .to_string();
    assert!(said.contains("HᵀWGᵀ"), "{said}");
    let c = memsteer_steer::Steer::load(&two).expect("two-sided");
    assert!(close(a.projector1(), c.projector1()) && close(a.projector2(), c.projector2()));
    assert_eq!(c.training()["transfer"]["map"], "two-sided");
    assert!(c.training()["transfer"]["inverse"]["relative_residual"].as_f64().expect("inverse residual") < 1e-5);
    let e = fails(&[&args[..], &["--map", "diagonal"]].concat());
    assert!(e.contains("--map") && e.contains("two-sided"), "{e}");

    // A target without token strings cannot be matched by string, and vocabularies differ: a clear error.
    let e = fails(&[
        "steer",
        "transfer",
        "--steer",
        s(&st.steer),
        "--from",
        s(&st.model),
        "--to",
        s(&fixture("lm/tiny-gpt2-f32")),
        "--out",
        s(&moved),
    ]);
    assert!(e.contains("token strings are known for the source model only"), "{e}");
    let e = fails(&[
        "steer",
        "transfer",
        "--steer",
        s(&st.steer),
        "--from",
        s(&st.model),
        "--to",
        s(&copy),
        "--out",
        s(&moved),
        "--ridge=-1",
    ]);
    assert!(e.contains("--ridge"), "{e}");
}

/// `steer detect` on the planted task: texts generated at +3 and at −3 are told apart by the strength
/// that explains them best (well above chance), the distribution over strengths sums to 1, and words
/// carry evidence; the JSON lines keep the input's fields.
#[test]
fn steer_detect_recovers_the_generating_strength() {
    let st = setup();
    let file = s(&st.steer).to_string();
    let input = st.dir.path().join("texts.jsonl");
    let mut body = String::new();
    for (v, name) in [(3.0f32, "gen-plus.jsonl"), (-3.0, "gen-minus.jsonl")] {
        for g in generate(&st, &[format!("{file}:{v}")], &[], name) {
            body.push_str(&format!("{}\n", serde_json::json!({"strength": v, "tokens": g["tokens"]})));
        }
    }
    std::fs::write(&input, body).expect("texts");
    let out = ok(&["steer", "detect", "--model", s(&st.model), "--steer", &file, "--input", s(&input), "--json"]);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(lines.len(), 32);
    let mut right = 0;
    for l in &lines {
        let (v, best) = (l["strength"].as_f64().expect("field kept"), l["best_strength"].as_f64().expect("best"));
        right += usize::from(v.signum() == best.signum());
        let p: Vec<f64> = l["distribution"].as_array().expect("dist").iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(p.len(), 7);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert_eq!(l["strengths"].as_array().expect("grid").len(), 7);
        assert!(l["words"].as_array().expect("words").iter().all(|w| w["evidence"].is_f64()));
    }
    eprintln!("detect: {right} of 32 texts get the sign of their generating strength");
    assert!(right >= 24, "{right} of 32 (chance: 16)");
    // One text as a table.
    let table = ok(&["steer", "detect", "--model", s(&st.model), "--steer", &file, "--text", "The cat sat, +,+,+"]);
    assert!(table.contains("best strength") && table.contains("P(strength)"), "{table}");
    // A bad grid is one clear error.
    let e = fails(&["steer", "detect", "--model", s(&st.model), "--steer", &file, "--text", "x y", "--bins", "1"]);
    assert!(e.contains("bins") && e.contains("expected between 2"), "{e}");
    // Huge sizes are refused before anything is built from them.
    let huge = st.dir.path().join("huge.jsonl");
    let e = fails(&[
        "steer",
        "generate",
        "--model",
        s(&st.model),
        "--prompts",
        s(&st.prompts),
        "--max-new-tokens",
        "18446744073709551615",
        "--seed",
        "1",
        "--out",
        s(&huge),
    ]);
    assert!(e.contains("--max-new-tokens") && e.contains("context"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// The Llama family through every layer of `steer`: on a tiny Llama (grouped-query attention), a
/// tiny Qwen2 (q/k/v biases, tied head) and a tiny Gemma 2 (soft-capped attention scores, and logits
/// capped at Gemma 2's own 30, through which the steer is trained and sampled), a steer trained on the
/// planted task moves the planted share monotonically with strength. (The fixture's own logit cap of
/// 3, chosen to bend its goldens, leaves a steer almost no room: every logit within ±3.)
#[test]
fn steers_move_the_planted_share_on_llama_qwen2_and_gemma2() {
    for model in ["lm/tiny-llama-gqa", "lm/tiny-qwen2", "lm/tiny-gemma2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, planted: std::ops::Range<u32>, seed: u64| {
            let mut rng = memsteer_panel::rng::SplitMix64::new(seed);
            let lines: String = (0..24)
                .map(|_| {
                    let t: Vec<u32> = (0..16)
                        .map(|_| {
                            if rng.uniform() < 0.5 {
                                planted.start + rng.below(u64::from(planted.end - planted.start)) as u32
                            } else {
                                40 + rng.below(56) as u32
                            }
                        })
                        .collect();
                    format!("{{\"tokens\": {t:?}}}\n")
                })
                .collect();
            let p = dir.path().join(name);
            std::fs::write(&p, lines).expect("corpus");
            p
        };
        let (pos, neg) = (write("pos.jsonl", POSITIVE, 1), write("neg.jsonl", NEGATIVE, 2));
        let prompts = dir.path().join("prompts.jsonl");
        std::fs::write(&prompts, "{\"id\": \"a\", \"tokens\": [50, 51, 52]}\n{\"id\": \"b\", \"tokens\": [70]}\n")
            .expect("prompts");
        let steer = dir.path().join("steer.safetensors");
        let mut m = fixture(model);
        if model.ends_with("gemma2") {
            let copy = dir.path().join("gemma2");
            std::fs::create_dir(&copy).expect("dir");
            std::fs::copy(m.join("model.safetensors"), copy.join("model.safetensors")).expect("weights");
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).expect("config")).expect("json");
            cfg["final_logit_softcapping"] = 30.0.into();
            std::fs::write(copy.join("config.json"), cfg.to_string()).expect("config");
            m = copy;
        }
        ok(&[
            "steer",
            "train",
            "--model",
            s(&m),
            "--positive",
            s(&pos),
            "--negative",
            s(&neg),
            "--out",
            s(&steer),
            "--rank",
            "4",
            "--steps",
            "300",
            "--lr",
            "0.1",
            "--epsilon",
            "10",
            "--batch-size",
            "8",
            "--seed",
            "3",
        ]);
        let shares: Vec<f64> = ["-3", "0", "3"]
            .iter()
            .map(|v| {
                let out = dir.path().join(format!("g{v}.jsonl"));
                ok(&[
                    "steer",
                    "generate",
                    "--model",
                    s(&m),
                    "--prompts",
                    s(&prompts),
                    "--samples",
                    "8",
                    "--max-new-tokens",
                    "20",
                    "--seed",
                    "7",
                    "--steer",
                    &format!("{}:{v}", s(&steer)),
                    "--out",
                    s(&out),
                ]);
                share(&generations(&out), POSITIVE) - share(&generations(&out), NEGATIVE)
            })
            .collect();
        eprintln!("{model}: positive − negative share at -3, 0, 3: {shares:?}");
        assert!(shares[0] <= shares[1] && shares[1] <= shares[2] && shares[2] > shares[0] + 0.1, "{model}: {shares:?}");
    }
}

/// `steer generate` computes LM-Steer's formula on the Llama family: greedy continuations equal the
/// steer applied by hand (numpy) to transformers' final hidden states of the tiny Llama
/// (`fixtures/steer/make_steered_golden.py`; every step's best logit leads the second by at least the
/// golden's `smallest_top2_gap`, 0.013, far above rounding).
#[test]
fn steered_greedy_generation_on_llama_equals_the_formula_on_transformers_hidden_states() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("steer/golden-llama-steered.json")).expect("golden"))
            .expect("json");
    let floats = |k: &str| -> Vec<f32> {
        golden[k].as_array().expect(k).iter().map(|x| x.as_f64().expect("number") as f32).collect()
    };
    let model_dir = fixture("lm/tiny-llama-gqa");
    let model = memsteer_lm::Model::load(&model_dir).expect("model");
    let dec = model.decoder();
    let spec = memsteer_steer::SteerSpec {
        num_steers: golden["steers"].as_u64().expect("steers") as usize,
        hidden_size: dec.dim(),
        rank: golden["rank"].as_u64().expect("rank") as usize,
        vocab_size: dec.vocab(),
        epsilon: golden["epsilon"].as_f64().expect("eps") as f32,
        embedding_fingerprint: memsteer_steer::embedding_fingerprint(dec.output_embedding()),
        labels: vec!["golden".into()],
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let steer = dir.path().join("steer.safetensors");
    memsteer_steer::Steer::new(spec, floats("projector1"), floats("projector2"), serde_json::json!({}))
        .expect("steer")
        .save(&steer)
        .expect("save");
    let prompts = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = golden["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"id": i, "tokens": p}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").expect("prompts");
    let run = |steers: &[String], name: &str| -> Vec<serde_json::Value> {
        let out = dir.path().join(name);
        let mut args = vec![
            "steer",
            "generate",
            "--model",
            s(&model_dir),
            "--prompts",
            s(&prompts),
            "--samples",
            "1",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--seed",
            "1",
            "--out",
            s(&out),
        ];
        for st in steers {
            args.extend(["--steer", st.as_str()]);
        }
        ok(&args);
        generations(&out).iter().map(|g| g["tokens"].clone()).collect()
    };
    let strength = golden["strengths"][0].as_f64().expect("strength");
    let steered = run(&[format!("{}:{strength}", s(&steer))], "steered.jsonl");
    let want: Vec<serde_json::Value> = golden["continuations"].as_array().expect("continuations").clone();
    assert_eq!(steered, want);
    // The steer changes the continuations (the comparison is not one the base model passes as well).
    let base = run(&[], "base.jsonl");
    assert_ne!(base, want);
}

#[test]
fn transfer_matches_tokens_by_their_text_across_tokenizer_conventions() {
    // The source speaks byte-level BPE (`Ġthe`), the target SentencePiece (`▁the`): matched by raw token
    // strings they share only tokens without a space; by text they share every word.
    let dir = tempfile::tempdir().expect("tempdir");
    let base = fixture("lm/tiny-gpt2-tokenizer");
    let tok = memsteer_lm::tokenizer::Tokenizer::from_dir(&base).expect("tokenizer");
    let n = tok.vocab_size();
    // The same vocabulary respelled: Ġ → ▁ where it marks a space; other bytes as SentencePiece fallbacks.
    let mut vocab = serde_json::Map::new();
    for i in 0..n {
        let text = tok.token_text(i as u32).expect("text");
        let sp = if text.starts_with('<') && text.ends_with('>') && text.contains("0x") {
            format!("<0x{}>", text.trim_start_matches("<0x").trim_end_matches('>').to_uppercase())
        } else {
            text.replace(' ', "▁")
        };
        vocab.entry(sp).or_insert_with(|| (i as u64).into());
    }
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(base.join(f), target.join(f)).expect("copy");
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "post_processor": null,
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(target.join("tokenizer.json"), json.to_string()).expect("write");
    let sp = memsteer_lm::tokenizer::Tokenizer::from_dir(&target).expect("metaspace tokenizer");
    let shared_by_text =
        (0..n as u32).filter(|&i| sp.token_text(i).is_some_and(|t| t == tok.token_text(i).unwrap_or_default())).count();
    let shared_by_string = (0..n as u32).filter(|&i| sp.id_to_token(i) == tok.id_to_token(i)).count();
    assert!(shared_by_text > shared_by_string + 100, "by text {shared_by_text}, by string {shared_by_string}");
    // End to end: a steer moved between the two matches through every token the text shares.
    let steer = dir.path().join("s.safetensors");
    let corpus = |name: &str, ids: &[u32]| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{{\"tokens\": {ids:?}}}\n{{\"tokens\": {ids:?}}}\n")).expect("corpus");
        p
    };
    let (pos, neg) = (corpus("pos.jsonl", &[5, 9, 5, 9, 5]), corpus("neg.jsonl", &[7, 3, 7, 3, 7]));
    ok(&[
        "steer",
        "train",
        "--model",
        s(&base),
        "--positive",
        s(&pos),
        "--negative",
        s(&neg),
        "--steps",
        "3",
        "--out",
        s(&steer),
        "--quiet",
    ]);
    let moved = dir.path().join("moved.safetensors");
    let run = memsteer(&[
        "steer",
        "transfer",
        "--steer",
        s(&steer),
        "--from",
        s(&base),
        "--to",
        s(&target),
        "--out",
        s(&moved),
    ]);
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{said}");
    // Every token the text shares takes part (the same model on both sides: an exact fit).
    let shared: usize = said
        .split(" shared tokens")
        .next()
        .and_then(|h| h.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no shared-token count in {said}"));
    assert!(
        shared + 5 >= shared_by_text && shared > shared_by_string + 100,
        "{shared} shared, {shared_by_text} by text, {shared_by_string} by string: {said}"
    );
    assert!(said.contains("relative residual") && said.contains("e-1"), "{said}");
}
