//! Shared inputs of memsteer's criterion benches (`benches/`): random models of real shapes written in
//! Hugging Face layout outside the timed loops. Peer comparisons (csdid) live in `peers/`, driven by
//! `cargo xtask bench-peers`.

use std::path::Path;

use memsteer_panel::rng::SplitMix64;
pub use safetensors::tensor::Dtype;
use safetensors::tensor::TensorView;

#[cfg(feature = "cuda")]
pub mod gpu;

/// Writes `config` and random tensors of `dtype` to `dir`: matrices normal with std `std`, norm weights
/// `1 + std·N(0, 1)`, other vectors `std·N(0, 1)`, from `seed`.
fn write_model_as(
    dir: &Path,
    config: serde_json::Value,
    tensors: Vec<(String, Vec<usize>)>,
    dtype: Dtype,
    std: f64,
    seed: u64,
) {
    use rayon::prelude::*;
    // Blocks of 2^20 values, each from its own seeded generator: parallel, and the same bytes
    // whatever the thread count.
    const BLOCK: usize = 1 << 20;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .enumerate()
        .map(|(ti, (name, shape))| {
            let n: usize = shape.iter().product();
            let norm = name.contains("ln_")
                || name.contains("layernorm")
                || name.starts_with("model.") && name.contains("norm");
            let unit = shape.len() == 1 && norm && name.ends_with("weight");
            let width = if dtype == Dtype::F32 { 4 } else { 2 };
            let mut bytes = vec![0u8; n * width];
            bytes.par_chunks_mut(BLOCK * width).enumerate().for_each(|(bi, out)| {
                let mut rng =
                    SplitMix64::new(seed ^ ((ti as u64) << 32) ^ (bi as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for o in out.chunks_exact_mut(width) {
                    let v = (if unit { 1.0 } else { 0.0 } + std * rng.normal()) as f32;
                    match dtype {
                        Dtype::F32 => o.copy_from_slice(&v.to_le_bytes()),
                        Dtype::BF16 => o.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                        _ => o.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                    }
                }
            });
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        data.iter().map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).expect("view"))).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write");
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
}

/// A model shape for the random-model writers.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Hidden size.
    pub d: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Context length.
    pub context: usize,
}

/// A GPT-NeoX model of `shape` (MLP 4·d, rotary 25 %, untied output layer, `parallel` residual or not)
/// with random `dtype` weights (see `write_model_as`) in `dir`.
pub fn write_neox(dir: &Path, shape: Shape, parallel: bool, dtype: Dtype, std: f64, seed: u64) {
    let Shape { d, layers: l, heads, vocab: v, context: p } = shape;
    let inter = 4 * d;
    let mut t =
        vec![("gpt_neox.embed_in.weight".to_string(), vec![v, d]), ("embed_out.weight".to_string(), vec![v, d])];
    for i in 0..l {
        for (n, s) in [
            ("input_layernorm.weight", vec![d]),
            ("input_layernorm.bias", vec![d]),
            ("post_attention_layernorm.weight", vec![d]),
            ("post_attention_layernorm.bias", vec![d]),
            ("attention.query_key_value.weight", vec![3 * d, d]),
            ("attention.query_key_value.bias", vec![3 * d]),
            ("attention.dense.weight", vec![d, d]),
            ("attention.dense.bias", vec![d]),
            ("mlp.dense_h_to_4h.weight", vec![inter, d]),
            ("mlp.dense_h_to_4h.bias", vec![inter]),
            ("mlp.dense_4h_to_h.weight", vec![d, inter]),
            ("mlp.dense_4h_to_h.bias", vec![d]),
        ] {
            t.push((format!("gpt_neox.layers.{i}.{n}"), s));
        }
    }
    t.push(("gpt_neox.final_layer_norm.weight".into(), vec![d]));
    t.push(("gpt_neox.final_layer_norm.bias".into(), vec![d]));
    let cfg = serde_json::json!({"model_type": "gpt_neox", "vocab_size": v, "max_position_embeddings": p, "hidden_size": d,
        "num_hidden_layers": l, "num_attention_heads": heads, "intermediate_size": inter, "rotary_pct": 0.25,
        "rotary_emb_base": 10000, "use_parallel_residual": parallel, "hidden_act": "gelu"});
    write_model_as(dir, cfg, t, dtype, std, seed);
}

/// A GPT-2 model of `shape` (MLP 4·d; output layer tied to the input embedding, or a separate
/// `lm_head` when `untied`) with random `dtype` weights in `dir`.
pub fn write_gpt2(dir: &Path, shape: Shape, untied: bool, dtype: Dtype, std: f64, seed: u64) {
    let Shape { d, layers: l, heads, vocab: v, context: p } = shape;
    let mut t = vec![("wte.weight".to_string(), vec![v, d]), ("wpe.weight".to_string(), vec![p, d])];
    if untied {
        t.push(("lm_head.weight".to_string(), vec![v, d]));
    }
    for i in 0..l {
        for (n, s) in [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![d, 3 * d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![d, 4 * d]),
            ("mlp.c_fc.bias", vec![4 * d]),
            ("mlp.c_proj.weight", vec![4 * d, d]),
            ("mlp.c_proj.bias", vec![d]),
        ] {
            t.push((format!("h.{i}.{n}"), s));
        }
    }
    t.push(("ln_f.weight".into(), vec![d]));
    t.push(("ln_f.bias".into(), vec![d]));
    let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": v, "n_positions": p, "n_embd": d, "n_layer": l,
        "n_head": heads, "tie_word_embeddings": !untied});
    write_model_as(dir, cfg, t, dtype, std, seed);
}

/// The shape of a Llama-family model for [`write_family`].
#[derive(Debug, Clone, Copy)]
pub struct FamilyShape {
    /// Hidden size.
    pub d: usize,
    /// Layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// MLP width.
    pub inner: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Context length.
    pub context: usize,
    /// Output layer tied to the input embedding (otherwise as the family's tiny fixture has it: tied
    /// for Qwen 2 and Gemma 3, separate for the others).
    pub tied: bool,
}

impl FamilyShape {
    /// The GPU checks' small shape: 2 layers of 256, 4 query heads of 64 on 2 key/value heads (attention
    /// width 256), MLP 512, vocabulary 1,000, context 600, untied.
    pub const SMALL: FamilyShape = FamilyShape {
        d: 256,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        inner: 512,
        vocab: 1000,
        context: 600,
        tied: false,
    };
}

/// A model of the Llama family (`family`: llama, mistral, qwen2, qwen3, olmo2, gemma2, gemma3, or `gemma3@S` with
/// `query_pre_attn_scalar` S instead of the head size) of `shape` with
/// random `dtype` weights in `dir`. The configuration is the family's tiny transformers fixture
/// (`fixtures/lm/tiny-*`, what the goldens test) with the sizes replaced; a sliding window, where the
/// family has one, covers `window` tokens (Gemma: every other layer slides). The tensors are the
/// ones memsteer's table names for that configuration.
pub fn write_family(
    dir: &Path,
    family: &str,
    shape: FamilyShape,
    window: usize,
    (dtype, std, seed): (Dtype, f64, u64),
) -> Result<(), String> {
    // `gemma3@S`: Gemma 3 with `query_pre_attn_scalar` S (otherwise head_dim, as its checkpoints set it).
    let (family, scalar) = match family.split_once('@') {
        Some((f, s)) => (f, Some(s.parse::<usize>().map_err(|e| format!("{family}: {e}"))?)),
        None => (family, None),
    };
    let template = match family {
        "llama" => include_str!("../../fixtures/lm/tiny-llama-gqa/config.json"),
        "mistral" => include_str!("../../fixtures/lm/tiny-mistral-window/config.json"),
        "qwen2" => include_str!("../../fixtures/lm/tiny-qwen2/config.json"),
        "qwen3" => include_str!("../../fixtures/lm/tiny-qwen3/config.json"),
        "olmo2" => include_str!("../../fixtures/lm/tiny-olmo2/config.json"),
        "gemma3" => include_str!("../../fixtures/lm/tiny-gemma3/config.json"),
        "gemma2" => include_str!("../../fixtures/lm/tiny-gemma2/config.json"),
        other => return Err(format!("no template for the family {other}")),
    };
    let mut cfg: serde_json::Value = serde_json::from_str(template).map_err(|e| e.to_string())?;
    let FamilyShape { d, layers, heads, kv_heads, head_dim, inner, vocab, context, tied } = shape;
    for (key, value) in [
        ("hidden_size", d),
        ("num_hidden_layers", layers),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
        ("head_dim", head_dim),
        ("intermediate_size", inner),
        ("vocab_size", vocab),
        ("max_position_embeddings", context),
    ] {
        cfg[key] = serde_json::json!(value);
    }
    if tied {
        cfg["tie_word_embeddings"] = serde_json::json!(true);
    }
    if cfg.get("layer_types").is_some() {
        let types: Vec<&str> = (0..layers)
            .map(|i| if family.starts_with("gemma") && i % 2 == 0 { "sliding_attention" } else { "full_attention" })
            .collect();
        cfg["layer_types"] = serde_json::json!(types);
    }
    if cfg.get("query_pre_attn_scalar").is_some() {
        // Gemma's checkpoints mostly scale scores by head_dim^-1/2 this way (Gemma 3 27B: 168 at heads of 128).
        cfg["query_pre_attn_scalar"] = serde_json::json!(scalar.unwrap_or(head_dim));
    }
    if cfg.get("sliding_window").is_some_and(|w| !w.is_null()) {
        cfg["sliding_window"] = serde_json::json!(window);
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("config.json"), cfg.to_string()).map_err(|e| e.to_string())?;
    let arch = memsteer_lm::arch::Arch::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
    let tensors = arch.tensors().into_iter().map(|t| (t.names[0].clone(), t.shape)).collect();
    write_model_as(dir, cfg, tensors, dtype, std, seed);
    Ok(())
}

/// Qwen2.5-0.5B's and Llama-3.2-1B's shapes (tied output layers, as theirs are).
pub fn family_shapes() -> [(&'static str, &'static str, FamilyShape); 2] {
    [
        (
            "qwen2.5-0.5b",
            "qwen2",
            FamilyShape {
                d: 896,
                layers: 24,
                heads: 14,
                kv_heads: 2,
                head_dim: 64,
                inner: 4864,
                vocab: 151_936,
                context: 2048,
                tied: true,
            },
        ),
        (
            "llama-3.2-1b",
            "llama",
            FamilyShape {
                d: 2048,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                head_dim: 64,
                inner: 8192,
                vocab: 128_256,
                context: 2048,
                tied: true,
            },
        ),
    ]
}

/// The model in `src` (written by [`write_family`], grouped-query attention) rewritten into `dst` with
/// one key/value head per query head, each a copy of the head its group shared: the same function
/// without grouping, for checking a grouped kernel against the ungrouped one.
pub fn write_ungrouped_twin(src: &Path, dst: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", src.display());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).map_err(|e| err(&e))?)
            .map_err(|e| err(&e))?;
    let heads = cfg["num_attention_heads"].as_u64().ok_or("num_attention_heads")? as usize;
    let kv = cfg["num_key_value_heads"].as_u64().ok_or("num_key_value_heads")? as usize;
    let hd = cfg["head_dim"].as_u64().ok_or("head_dim")? as usize;
    if kv == 0 || !heads.is_multiple_of(kv) {
        return Err(format!("{heads} heads do not share {kv} key/value heads evenly"));
    }
    cfg["num_key_value_heads"] = serde_json::json!(heads);
    let bytes = std::fs::read(src.join("model.safetensors")).map_err(|e| err(&e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(&e))?;
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let (dtype, mut shape, data) = (view.dtype(), view.shape().to_vec(), view.data().to_vec());
        let kv_proj = [".k_proj.", ".v_proj."].iter().any(|p| name.contains(p));
        if !kv_proj {
            out.push((name, dtype, shape, data));
            continue;
        }
        // Rows of head h' of the twin are rows of head h' / group of the original.
        let row_bytes = data.len() / shape[0];
        let head_bytes = hd * row_bytes;
        let mut grown = Vec::with_capacity(data.len() * heads / kv);
        for h in 0..heads {
            let from = h / (heads / kv) * head_bytes;
            grown.extend_from_slice(&data[from..from + head_bytes]);
        }
        shape[0] = heads * hd;
        out.push((name, dtype, shape, grown));
    }
    std::fs::create_dir_all(dst).map_err(|e| err(&e))?;
    let views: Vec<(String, TensorView<'_>)> = out
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b).map_err(|e| err(&e))?)))
        .collect::<Result<_, String>>()?;
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).map_err(|e| err(&e))?;
    std::fs::write(dst.join("config.json"), cfg.to_string()).map_err(|e| err(&e))
}

/// GPT-2 small's shape (124M: 12 × 768, vocabulary 50,257) with random f16 weights, in `dir`.
pub fn write_gpt2_small(dir: &Path) {
    write_gpt2(dir, Shape { d: 768, layers: 12, heads: 12, vocab: 50257, context: 1024 }, false, Dtype::F16, 0.02, 1);
}

/// Pythia-70M's shape (6 × 512, vocabulary 50,304, untied) with random f16 weights, in `dir`.
pub fn write_pythia_70m(dir: &Path) {
    write_neox(dir, Shape { d: 512, layers: 6, heads: 8, vocab: 50304, context: 2048 }, true, Dtype::F16, 0.02, 1);
}

/// A word-level tokenizer of `vocab` words `w0` … (split on whitespace) in `dir/tokenizer.json`, so
/// that a random model in `dir` can be served (the text of a completion names its token ids).
pub fn write_word_tokenizer(dir: &Path, vocab: usize) -> Result<(), String> {
    let words: serde_json::Map<String, serde_json::Value> =
        (0..vocab).map(|i| (format!("w{i}"), serde_json::json!(i))).collect();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"}});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).map_err(|e| format!("{}: {e}", dir.display()))
}

/// A random low-rank steer (one labelled steer, `style`, and the dummy; rank `rank`, entries
/// `scale`·N(0, 1), ε 1e-3) for the model in `model`, saved to `path`.
pub fn write_random_steer(model: &Path, path: &Path, rank: usize, scale: f64, seed: u64) -> Result<(), String> {
    let m = memsteer_lm::Model::load(model).map_err(|e| e.to_string())?;
    let dec = m.decoder();
    let d = dec.dim();
    let mut rng = SplitMix64::new(seed);
    let p: Vec<f32> = (0..2 * 2 * d * rank).map(|_| (scale * rng.normal()) as f32).collect();
    let spec = memsteer_steer::SteerSpec {
        num_steers: 2,
        hidden_size: d,
        rank,
        vocab_size: dec.vocab(),
        epsilon: 1e-3,
        embedding_fingerprint: memsteer_steer::embedding_fingerprint(dec.output_embedding()),
        labels: vec!["style".into()],
    };
    memsteer_steer::Steer::new(spec, p[..2 * d * rank].to_vec(), p[2 * d * rank..].to_vec(), serde_json::json!({}))
        .and_then(|s| s.save(path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `memsteer serve` on `device` against `memsteer serve` on the CPU (`memsteer-gpu-check serve` with a
/// CUDA device; the CPU against itself in the tests): the same requests (prompts of 3
/// to 40 words, 6 to 24 new tokens, the steer at −4, 0, 4 or absent, greedy and seeded sampling, sent
/// 16 at a time so that rows join and leave running batches) to two servers in this process on one f32
/// Qwen 2-shaped model with a word-level tokenizer. Returns the requests whose texts are identical and
/// all of them; an f32 model gives the same tokens unless two logits tie within the rounding.
pub fn serve_parity(dir: &Path, device: &memsteer_kernels::Device) -> Result<(usize, usize), String> {
    let m = dir.join("serve-model");
    let shape = crate::FamilyShape::SMALL;
    crate::write_family(&m, "qwen2", shape, 8, (crate::Dtype::F32, 2.4 / 16.0, 77))?;
    crate::write_word_tokenizer(&m, shape.vocab)?;
    let steer = m.join("style.safetensors");
    crate::write_random_steer(&m, &steer, 64, 0.05, 5)?;
    let start = |device: &memsteer_kernels::Device| {
        let mut cfg = memsteer_serve::Config::new(m.clone());
        cfg.port = 0;
        cfg.threads = Some(2);
        cfg.max_batch = 8;
        cfg.device = device.clone();
        cfg.steers = vec![("style".into(), steer.clone())];
        memsteer_serve::Server::start(cfg).map_err(|e| e.to_string())
    };
    let (cpu, gpu) = (start(&memsteer_kernels::Device::Cpu)?, start(device)?);
    let bodies: Vec<serde_json::Value> = (0..32)
        .map(|i| {
            let words = 3 + (i * 7) % 38;
            let prompt: Vec<String> = (0..words).map(|j| format!("w{}", (i * 131 + j * 17) % 1000)).collect();
            let mut b = serde_json::json!({"prompt": prompt.join(" "), "max_tokens": 6 + (i * 5) % 19,
                "temperature": if i % 2 == 0 { 0.0 } else { 1.0 }, "seed": i});
            if i % 4 != 3 {
                let strength = [-4.0, 0.0, 4.0][i % 3];
                b["steer"] = serde_json::json!([{"name": "style", "strength": strength}]);
            }
            b
        })
        .collect();
    let texts = |addr: String| -> Result<Vec<String>, String> {
        let url = format!("http://{addr}/v1/completions");
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|c| {
                    let (url, bodies) = (&url, &bodies);
                    s.spawn(move || -> Result<Vec<(usize, String)>, String> {
                        let agent = ureq::Agent::new_with_defaults();
                        (c..bodies.len())
                            .step_by(16)
                            .map(|i| {
                                let mut r = agent
                                    .post(url)
                                    .header("Content-Type", "application/json")
                                    .send(bodies[i].to_string())
                                    .map_err(|e| format!("request {i}: {e}"))?;
                                let v: serde_json::Value = serde_json::from_str(
                                    &r.body_mut().read_to_string().map_err(|e| format!("request {i}: {e}"))?,
                                )
                                .map_err(|e| format!("request {i}: {e}"))?;
                                let text = v["choices"][0]["text"].as_str().ok_or(format!("request {i}: {v}"))?;
                                Ok((i, text.to_string()))
                            })
                            .collect()
                    })
                })
                .collect();
            let mut all: Vec<(usize, String)> = Vec::new();
            for h in handles {
                all.extend(h.join().map_err(|_| "a client panicked".to_string())??);
            }
            all.sort();
            Ok(all.into_iter().map(|(_, t)| t).collect())
        })
    };
    let (a, b) = (texts(cpu.addr().to_string())?, texts(gpu.addr().to_string())?);
    cpu.shutdown().map_err(|e| e.to_string())?;
    gpu.shutdown().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&m);
    if a.iter().any(String::is_empty) {
        return Err("a completion came back empty".into());
    }
    Ok((a.iter().zip(&b).filter(|(x, y)| x == y).count(), a.len()))
}
