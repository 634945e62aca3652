//! `memsteer-gpu-check`: the GPU runtime against the CPU path (parity) and its speed at Pythia shapes,
//! printed as tables. Run by `scripts/gpu-check.sh` on a machine with a CUDA GPU.
//!
//! Usage: `memsteer-gpu-check [parity] [decode] [serve] [steer] [head] [logprobs] [profile] [families] [--work DIR]`
//! (parity, decode, serve, steer, head, logprobs and families when none is named).

use std::path::PathBuf;
use std::process::ExitCode;

use memsteer_benches::Shape;
use memsteer_benches::gpu::{
    Parity, bench_family_logprobs, bench_logprobs, bench_output_layer, bench_steer_step, decode_errors, decode_parity,
    device, family_parity, family_shapes, parity, profile_logprobs, steer_parity,
};
use memsteer_benches::serve_parity;
use memsteer_kernels::Device;
use memsteer_kernels::cuda::Attention;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut work = std::env::temp_dir().join("memsteer-gpu-check");
    let mut what: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--work" {
            work = PathBuf::from(it.next().expect("--work DIR"));
        } else {
            what.push(a.clone());
        }
    }
    if what.first().map(String::as_str) == Some("write-pythia70m") {
        // A random Pythia-70M-shaped f16 model and 64 random 2048-token instances, for the CLI run.
        let dir = PathBuf::from(what.get(1).expect("write-pythia70m DIR"));
        std::fs::create_dir_all(&dir).expect("create DIR");
        let s = Shape { d: 512, layers: 6, heads: 8, vocab: 50304, context: 2048 };
        memsteer_benches::write_neox(&dir, s, true, memsteer_benches::Dtype::F16, 0.02, 5);
        let mut rng = memsteer_panel::rng::SplitMix64::new(17);
        let lines: Vec<String> = (0..64)
            .map(|i| {
                let toks: Vec<u64> = (0..2048).map(|_| rng.below(50304)).collect();
                serde_json::json!({"id": format!("x{i}"), "treatment_step": null, "tokens": toks}).to_string()
            })
            .collect();
        std::fs::write(dir.join("instances.jsonl"), lines.join("\n") + "\n").expect("instances");
        return ExitCode::SUCCESS;
    }
    if what.is_empty() {
        what = ["parity", "decode", "serve", "steer", "head", "logprobs", "families"].map(String::from).to_vec();
    }
    let dev = match device() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("no usable GPU: {e}");
            return ExitCode::from(2);
        }
    };
    let Device::Cuda(g) = &dev else { unreachable!("device() opens CUDA") };
    println!("device: {:?}", g.0);
    let mut failed = false;
    let table = |rows: Vec<Parity>| -> bool {
        println!(
            "\n| parity case | tokens | max abs | max rel | mean abs | bound | hidden states max rel | bound | ok |\n|---|---|---|---|---|---|---|---|---|"
        );
        let mut ok = true;
        for p in rows {
            println!(
                "| {} | {} | {:.2e} | {:.2e} | {:.2e} | {:.1e} | {:.2e} | {:.1e} | {} |",
                p.case,
                p.tokens,
                p.max_abs,
                p.max_rel,
                p.mean_abs,
                p.bound,
                p.hidden_max_rel,
                p.hidden_bound,
                if p.ok() { "yes" } else { "NO" }
            );
            ok &= p.ok();
        }
        ok
    };
    if what.iter().any(|w| w == "parity") {
        match parity(&work, &dev).and_then(|mut rows| {
            rows.extend(family_parity(&work, &dev)?);
            Ok(rows)
        }) {
            Ok(rows) => failed |= !table(rows),
            Err(e) => {
                println!("parity failed to run: {e}");
                failed = true;
            }
        }
    }
    if what.iter().any(|w| w == "decode") {
        println!(
            "\nDecoding with KV caches on the device against the CPU's cached decoding (tokens: last rows compared):"
        );
        match decode_parity(&work, &dev) {
            Ok(rows) => failed |= !table(rows),
            Err(e) => {
                println!("decode parity failed to run: {e}");
                failed = true;
            }
        }
        match decode_errors(&work, &dev) {
            Ok(()) => println!("decoding errors (capacity, another model's cache, beyond the context): ok"),
            Err(e) => {
                println!("decoding errors: FAILED: {e}");
                failed = true;
            }
        }
    }
    if what.iter().any(|w| w == "serve") {
        match serve_parity(&work, &dev) {
            Ok((same, all)) => {
                println!(
                    "\nmemsteer serve --device cuda against the CPU server: {same} of {all} completions identical"
                );
                failed |= same < all;
            }
            Err(e) => {
                println!("\nserve parity failed to run: {e}");
                failed = true;
            }
        }
    }
    if what.iter().any(|w| w == "steer") {
        println!(
            "\n| steer step parity (f32) | loss CPU | loss GPU | P1 grad max rel | P2 grad max rel | ok |\n|---|---|---|---|---|---|"
        );
        match steer_parity(&g.0) {
            Ok(rows) => {
                for p in rows {
                    println!(
                        "| {} | {:.6} | {:.6} | {:.2e} | {:.2e} | {} |",
                        p.case,
                        p.loss.0,
                        p.loss.1,
                        p.grad_rel.0,
                        p.grad_rel.1,
                        if p.ok() { "yes" } else { "NO" }
                    );
                    failed |= !p.ok();
                }
            }
            Err(e) => {
                println!("steer parity failed to run: {e}");
                failed = true;
            }
        }
        println!(
            "\n| steer training step, d 768, V 50257, rank 768, 2 steers (f32) | rows | GPU ms | CPU ms |\n|---|---|---|---|"
        );
        for (rows, cpu) in [(2048, true), (8192, false)] {
            match bench_steer_step(&g.0, rows, 3, cpu) {
                Ok((gpu_ms, cpu_ms)) => println!(
                    "| memsteer | {rows} | {gpu_ms:.1} | {} |",
                    cpu_ms.map_or("—".to_string(), |c| format!("{c:.0}"))
                ),
                Err(e) => {
                    println!("| memsteer | {rows} | failed: {e} | |");
                    failed = true;
                }
            }
        }
    }
    if what.iter().any(|w| w == "head") {
        let (n, v, d) = (16384, 50304, 768);
        println!(
            "\n| fused output layer n={n} V={v} d={d} | inputs | chunk | logits | ms | products alone ms | peak MiB |\n|---|---|---|---|---|---|---|"
        );
        match bench_output_layer(&g.0, (n, v, d), &[128, 256, 512, 1024, 4096], 5) {
            Ok(rows) => {
                for r in rows {
                    println!(
                        "| memsteer | {:?} | {} | {:?} | {:.3} | {:.3} | {:.0} |",
                        r.inputs,
                        r.chunk,
                        r.logits,
                        r.ms,
                        r.products_ms,
                        r.peak as f64 / 1048576.0
                    );
                }
            }
            Err(e) => {
                println!("output-layer bench failed: {e}");
                failed = true;
            }
        }
    }
    let shapes = [
        ("pythia-70m", Shape { d: 512, layers: 6, heads: 8, vocab: 50304, context: 2048 }),
        ("pythia-160m", Shape { d: 768, layers: 12, heads: 12, vocab: 50304, context: 2048 }),
        ("pythia-410m", Shape { d: 1024, layers: 24, heads: 16, vocab: 50304, context: 2048 }),
        ("pythia-1.4b", Shape { d: 2048, layers: 24, heads: 16, vocab: 50304, context: 2048 }),
    ];
    if what.iter().any(|w| w == "profile") {
        // Per-stage times on stderr (run with MEMSTEER_GPU_PROFILE=1).
        for (name, s) in shapes {
            eprintln!("{name}:");
            let configs = [(Attention::Auto, false), (Attention::Pipelined, true)];
            if let Err(e) = profile_logprobs(&dev, &work.join(name), s, (8, 2048), &configs) {
                println!("{name}: profile failed: {e}");
                failed = true;
            }
        }
    }
    if what.iter().any(|w| w == "logprobs") {
        println!(
            "\n| memsteer GpuModel f16 | attention | B | T | tokens/s | weights GiB | peak GiB |\n|---|---|---|---|---|---|---|"
        );
        for (name, s) in shapes {
            match bench_logprobs(&dev, &work.join(name), s, (8, 2048, 3)) {
                Ok(rows) => {
                    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                    for (how, rate, weights, peak) in rows {
                        println!(
                            "| {name} | {how:?} | 8 | 2048 | {rate:.0} | {:.2} | {:.2} |",
                            gib(weights),
                            gib(peak)
                        );
                    }
                }
                Err(e) => {
                    println!("| {name} | failed: {e} |");
                    failed = true;
                }
            }
        }
    }
    if what.iter().any(|w| w == "families") {
        println!(
            "\n| memsteer GpuModel bf16 (defaults) | B | T | tokens/s | weights GiB | peak GiB |\n|---|---|---|---|---|---|"
        );
        for (name, family, shape) in family_shapes() {
            match bench_family_logprobs(&dev, &work.join(name), (family, shape), (8, 2048, 3)) {
                Ok((rate, weights, peak)) => {
                    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                    println!("| {name} | 8 | 2048 | {rate:.0} | {:.2} | {:.2} |", gib(weights), gib(peak));
                }
                Err(e) => {
                    println!("| {name} | failed: {e} |");
                    failed = true;
                }
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
