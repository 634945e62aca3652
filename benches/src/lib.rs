//! Shared inputs of memsteer's criterion benches (`benches/`): random models of real shapes written in
//! Hugging Face layout outside the timed loops. Peer comparisons (csdid) live in `peers/`, driven by
//! `cargo xtask bench-peers`.

use std::path::Path;

use memsteer_panel::rng::SplitMix64;
use safetensors::tensor::{Dtype, TensorView};

/// Writes `config` and random f16 tensors (normal, std 0.02, seed 1) of the given shapes to `dir`.
fn write_model(dir: &Path, config: serde_json::Value, tensors: Vec<(String, Vec<usize>)>) {
    let mut rng = SplitMix64::new(1);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let bytes = (0..n).flat_map(|_| half::f16::from_f32((0.02 * rng.normal()) as f32).to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        data.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F16, s.clone(), b).expect("view"))).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write");
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
}

/// GPT-2 small's shape (124M: 12 × 768, vocabulary 50,257) with random f16 weights, in `dir`.
pub fn write_gpt2_small(dir: &Path) {
    let (d, l, v, p) = (768, 12, 50257, 1024);
    let mut t = vec![("wte.weight".to_string(), vec![v, d]), ("wpe.weight".to_string(), vec![p, d])];
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
    let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": v, "n_positions": p, "n_embd": d, "n_layer": l, "n_head": 12});
    write_model(dir, cfg, t);
}

/// Pythia-70M's shape (6 × 512, vocabulary 50,304, untied) with random f16 weights, in `dir`.
pub fn write_pythia_70m(dir: &Path) {
    let (d, l, v, p, inter) = (512, 6, 50304, 2048, 2048);
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
        "num_hidden_layers": l, "num_attention_heads": 8, "intermediate_size": inter, "rotary_pct": 0.25,
        "rotary_emb_base": 10000, "use_parallel_residual": true, "hidden_act": "gelu"});
    write_model(dir, cfg, t);
}
