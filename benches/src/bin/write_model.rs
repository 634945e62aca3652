//! `memsteer-write-model SHAPE DIR [f32|bf16|f16]`: a random model of a real shape, full depth, in
//! Hugging Face layout (`config.json`, `model.safetensors`), for measurements outside the benches: the
//! CPU load peak in docs/performance.md ("CPU memory") was measured on
//! `memsteer-write-model llama-3.2-1b DIR bf16`. SHAPE: qwen2.5-0.5b or llama-3.2-1b.

use std::path::PathBuf;
use std::process::ExitCode;

use memsteer_benches::{Dtype, family_shapes, write_family};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: memsteer-write-model qwen2.5-0.5b|llama-3.2-1b DIR [f32|bf16|f16]";
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
    let Some((_, family, s)) = family_shapes().into_iter().find(|(name, _, _)| name == shape) else {
        eprintln!("shape {shape:?}: expected qwen2.5-0.5b or llama-3.2-1b\n{usage}");
        return ExitCode::from(2);
    };
    match write_family(&PathBuf::from(dir), family, s, s.context, (dtype, 0.02, 5)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{dir}: {e}");
            ExitCode::FAILURE
        }
    }
}
