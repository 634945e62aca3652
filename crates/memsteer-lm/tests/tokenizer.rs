use memsteer_lm::tokenizer::Tokenizer;

/// A SentencePiece-style vocabulary (`▁` for a space, byte fallback), written as `tokenizer.json`.
fn metaspace_tokenizer(dir: &std::path::Path) -> Tokenizer {
    let vocab = serde_json::json!({"<unk>": 0, "<s>": 1, "<0xE2>": 2, "<0x41>": 3, "▁the": 4, "the": 5,
        "▁": 6, "t": 7, "h": 8, "e": 9, "▁cat": 10, "▁dog": 11});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
                          "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "post_processor": null,
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).expect("write");
    Tokenizer::from_dir(dir).expect("metaspace tokenizer")
}

#[test]
fn token_text_is_spelled_alike_across_families() {
    let bytes =
        Tokenizer::from_dir(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/corpus"))
            .expect("corpus tokenizer");
    let id = |t: &Tokenizer, s: &str| t.token_to_id(s).unwrap_or_else(|| panic!("{s} in the vocabulary"));
    // Byte-level: Ġ is a space, a lone lead byte of a three-byte character is its byte in hex.
    assert_eq!(bytes.token_text(id(&bytes, "Ġthe")).as_deref(), Some(" the"));
    assert_eq!(bytes.token_text(id(&bytes, "the")).as_deref(), Some("the"));
    assert_eq!(bytes.token_text(id(&bytes, "â")).as_deref(), Some("<0xe2>"));
    let dir = tempfile::tempdir().expect("tempdir");
    let sp = metaspace_tokenizer(dir.path());
    assert_eq!(sp.token_text(4).as_deref(), Some(" the"));
    assert_eq!(sp.token_text(5).as_deref(), Some("the"));
    assert_eq!(sp.token_text(2).as_deref(), Some("<0xe2>"));
    assert_eq!(sp.token_text(3).as_deref(), Some("A"));
    assert_eq!(sp.token_text(1).as_deref(), Some("<s>"), "added tokens keep their text");
    // So the two vocabularies share " the", "the" and the byte 0xE2 when matched by text, and nothing
    // but single letters by raw token string.
    let text = |t: &Tokenizer, id: u32| t.token_text(id);
    let shared: Vec<u32> = (0..12u32)
        .filter(|&i| {
            let s = text(&sp, i);
            s.is_some() && (0..bytes.vocab_size() as u32).any(|j| text(&bytes, j) == s)
        })
        .collect();
    for want in [2, 4, 5] {
        assert!(shared.contains(&want), "{want} should be shared: {shared:?}");
    }
    assert!(bytes.token_to_id("▁the").is_none());
}

fn tok_fixture(rel: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizer").join(rel)
}

fn cases() -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tok_fixture("golden.json")).expect("golden")).expect("json");
    v["cases"].as_array().expect("cases").clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// GPT-2's vocabulary from encoder.json + vocab.bpe against Hugging Face `tokenizers` on unicode,
/// whitespace runs, contractions, numbers, emoji and special tokens.
#[test]
fn gpt2_ids_equal_the_reference() {
    let t = Tokenizer::from_files(&tok_fixture("gpt2/encoder.json"), &tok_fixture("gpt2/vocab.bpe")).expect("load");
    assert_eq!(t.vocab_size(), 50257);
    for c in cases() {
        let text = c["text"].as_str().expect("text");
        assert_eq!(t.encode(text).expect("encode"), ids(&c["gpt2"]), "{text:?}");
        assert_eq!(t.decode(&ids(&c["gpt2"])).expect("decode"), text);
    }
}

/// A tokenizer.json written by `tokenizers` (byte-level BPE with 1,000 merges).
#[test]
fn tokenizer_json_ids_equal_the_reference() {
    let dir = tok_fixture("small");
    let t = Tokenizer::from_dir(&dir).expect("load");
    for c in cases() {
        let text = c["text"].as_str().expect("text");
        assert_eq!(t.encode(text).expect("encode"), ids(&c["small"]), "{text:?}");
    }
}

#[test]
fn accessors_agree_with_the_vocabulary_files() {
    let t = Tokenizer::from_files(&tok_fixture("gpt2/encoder.json"), &tok_fixture("gpt2/vocab.bpe")).expect("load");
    // encoder.json: "Hello" 15496, "\u0120world" 995, "<|endoftext|>" 50256.
    assert_eq!(t.token_to_id("Hello"), Some(15496));
    assert_eq!(t.id_to_token(995).as_deref(), Some("\u{120}world"));
    assert_eq!(t.token_to_id("<|endoftext|>"), Some(50256));
    assert_eq!(t.id_to_token(50256).as_deref(), Some("<|endoftext|>"));
    assert_eq!(t.id_to_token(50257), None);
    assert_eq!(t.token_to_id("not a token"), None);
    let small = Tokenizer::from_dir(&tok_fixture("small")).expect("load");
    assert_eq!(small.vocab_size(), 1257); // 1,256 BPE tokens + <|endoftext|>
    assert_eq!(small.token_to_id("<|endoftext|>"), Some(1256));
    assert_eq!(small.decode(&[39, 695, 78, 995]).expect("decode"), "Hello world");
}

/// The `vocab.json` + `merges.txt` names load the same tokenizer as `encoder.json` + `vocab.bpe`.
#[test]
fn hugging_face_file_names_load_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(tok_fixture("gpt2/encoder.json"), dir.path().join("vocab.json")).expect("copy");
    std::fs::copy(tok_fixture("gpt2/vocab.bpe"), dir.path().join("merges.txt")).expect("copy");
    let t = Tokenizer::from_dir(dir.path()).expect("load");
    for c in cases() {
        let text = c["text"].as_str().expect("text");
        assert_eq!(t.encode(text).expect("encode"), ids(&c["gpt2"]), "{text:?}");
    }
}

#[test]
fn tokenizer_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    assert!(Tokenizer::from_dir(p).expect_err("none").to_string().contains("no tokenizer.json"));
    let tj = p.join("tokenizer.json");
    let small = std::fs::read_to_string(tok_fixture("small/tokenizer.json")).expect("read");
    let mut json: serde_json::Value = serde_json::from_str(&small).expect("json");
    let err = |text: &str| {
        std::fs::write(&tj, text).expect("write");
        let e = Tokenizer::from_dir(p).expect_err("bad tokenizer.json").to_string();
        assert!(e.contains(&tj.display().to_string()), "{e}");
        e
    };
    let e = err(&small[..small.len() / 2]);
    assert!(e.contains("not valid JSON"), "{e}");
    let e = err("[1, 2]");
    assert!(e.contains("expected a JSON object"), "{e}");
    // An empty added token (which `tokenizers` would drop silently).
    json["added_tokens"][0]["content"] = "".into();
    let e = err(&json.to_string());
    assert!(e.contains("added_tokens[0] has empty `content`"), "{e}");
    json["added_tokens"][0]["content"] = "<|endoftext|>".into();
    // An unknown model type.
    let mut unknown = json.clone();
    unknown["model"]["type"] = "Llama".into();
    let e = err(&unknown.to_string());
    assert!(e.contains("model type \"Llama\" is not one of BPE, WordPiece, WordLevel, Unigram"), "{e}");
    // A BPE model without merges.
    let mut no_merges = json.clone();
    no_merges["model"].as_object_mut().expect("model").remove("merges");
    let e = err(&no_merges.to_string());
    assert!(e.contains("the BPE model has no `model.merges`"), "{e}");
    // A merge of symbols that are not in the vocabulary (caught by `tokenizers`).
    let mut bad_merge = json.clone();
    bad_merge["model"]["merges"][0] = serde_json::json!(["\u{2603}", "\u{2603}"]);
    let e = err(&bad_merge.to_string());
    assert!(e.contains("not a tokenizer that `tokenizers` 0.22 can load"), "{e}");
    // An unknown pre-tokenizer.
    let mut bad_pre = json.clone();
    bad_pre["pre_tokenizer"] = serde_json::json!({"type": "NoSuchPreTokenizer"});
    let e = err(&bad_pre.to_string());
    assert!(e.contains("can load"), "{e}");
    // A template post-processor using a special token it does not define (`tokenizers` would panic
    // on the first text).
    let mut template = json.clone();
    template["post_processor"] = serde_json::json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [], "special_tokens": {}});
    let e = err(&template.to_string());
    assert!(e.contains("post_processor.single uses the special token \"<s>\""), "{e}");
    // A panic inside `tokenizers` (its Strip decoder indexes past a short token) becomes an error.
    let mut strip = json.clone();
    strip["decoder"] = serde_json::json!({"type": "Strip", "content": "H", "start": 0, "stop": 5});
    std::fs::write(&tj, strip.to_string()).expect("write");
    let t = Tokenizer::from_dir(p).expect("loads");
    let h = t.token_to_id("H").expect("H");
    let e = t.decode(&[h]).expect_err("panics inside tokenizers").to_string();
    assert!(e.contains("tokenizer.json") && e.contains("decoding: `tokenizers` failed on this file"), "{e}");
    // GPT-2 layout: malformed merges and merges outside the vocabulary name the merges file.
    std::fs::remove_file(&tj).expect("rm");
    std::fs::write(p.join("vocab.json"), r#"{"a": 0, "b": 1, "ab": 2}"#).expect("write");
    std::fs::write(p.join("merges.txt"), "#version: 0.2\na b\nab\n").expect("write");
    let e = Tokenizer::from_dir(p).expect_err("merges").to_string();
    assert!(e.contains("merges.txt") && e.contains("line 3: expected two symbols"), "{e}");
    std::fs::write(p.join("merges.txt"), "a c\n").expect("write");
    let e = Tokenizer::from_dir(p).expect_err("oov merge").to_string();
    assert!(e.contains("merges.txt") && e.contains("vocab.json"), "{e}");
    std::fs::write(p.join("vocab.json"), r#"{"a": -1}"#).expect("write");
    let e = Tokenizer::from_dir(p).expect_err("vocab").to_string();
    assert!(e.contains("vocab.json") && e.contains("non-negative integer"), "{e}");
    let t = Tokenizer::from_files(&tok_fixture("gpt2/encoder.json"), &tok_fixture("gpt2/vocab.bpe")).expect("load");
    let e = t.decode(&[15496, 60000]).expect_err("unknown id").to_string();
    assert!(e.contains("token id 60000") && e.contains("encoder.json"), "{e}");
}
