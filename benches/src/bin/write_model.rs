//! `memsteer-write-model SHAPE DIR [f32|bf16|f16] [LAYERS]`: a random model of a real shape (full depth
//! unless LAYERS is given) in Hugging Face layout (`config.json`, `model.safetensors`), for measurements
//! outside the benches: the CPU load peak in docs/performance.md ("CPU memory") was measured on
//! `memsteer-write-model llama-3.2-1b DIR bf16`. SHAPE: qwen2.5-0.5b, llama-3.2-1b or gemma-2-2b (Gemma 2
//! 2B's sizes, window 4,096 on every other layer, its soft-caps 50 and 30).

use std::path::PathBuf;
use std::process::ExitCode;

use memsteer_benches::{Dtype, FamilyShape, family_shapes, write_family};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: memsteer-write-model qwen2.5-0.5b|llama-3.2-1b|gemma-2-2b DIR [f32|bf16|f16] [LAYERS]";
    let (Some(shape), Some(dir)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let dtype = match args.get(2).map(String::as_str) {
        None | Some("bf16") => Dtype::BF16,
        Some("f32") => Dtype::F32,
        Some("f16") => Dtype::F16,
        Some(other) => {
            eprintln!("element type {other:?}: expected f32, bf16 or f16\n{usage}");
            return ExitCode::from(2);
        }
    };
    let gemma2 = (
        "gemma-2-2b",
        "gemma2",
        FamilyShape {
            d: 2304,
            layers: 26,
            heads: 8,
            kv_heads: 4,
            head_dim: 256,
            inner: 9216,
            vocab: 256_000,
            context: 8192,
            tied: true,
        },
    );
    let Some((_, family, mut s)) = family_shapes().into_iter().chain([gemma2]).find(|(name, _, _)| name == shape)
    else {
        eprintln!("shape {shape:?}: expected qwen2.5-0.5b, llama-3.2-1b or gemma-2-2b\n{usage}");
        return ExitCode::from(2);
    };
    if let Some(layers) = args.get(3) {
        match layers.parse::<usize>() {
            Ok(n) if n > 0 => s.layers = n,
            _ => {
                eprintln!("layers {layers:?}: expected a positive integer\n{usage}");
                return ExitCode::from(2);
            }
        }
    }
    let dir = PathBuf::from(dir);
    let window = if family == "gemma2" { 4096 } else { s.context };
    let written = write_family(&dir, family, s, window, (dtype, 0.02, 5)).and_then(|()| {
        if family != "gemma2" {
            return Ok(());
        }
        // The fixture's template caps at 1.5 and 3 (to bend a tiny model); Gemma 2's own are 50 and 30.
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let mut cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        cfg["attn_logit_softcapping"] = 50.0.into();
        cfg["final_logit_softcapping"] = 30.0.into();
        std::fs::write(&path, cfg.to_string()).map_err(|e| e.to_string())
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
