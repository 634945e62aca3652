//! The GPU runtime against the CPU runtime on random GPT-2, GPT-NeoX and Llama-family models, and
//! against transformers' goldens of the Llama family (f32 to 1e-4 relative; f16 and bf16 within the bounds `memsteer_benches::gpu::parity` justifies), both
//! attention kernels and both logits types; decoding with KV caches on the device and the server on it against the CPU. Runs with `--features cuda` on a machine with a GPU and
//! skips with a message otherwise (fails instead when `MEMSTEER_REQUIRE_GPU` is set); `scripts/gpu-check.sh` runs the same check plus the benchmarks.
#![cfg(feature = "cuda")]

/// CUDA device 0, or `None` after saying why the test skips (a failure with `MEMSTEER_REQUIRE_GPU`).
fn gpu() -> Option<memsteer_kernels::Device> {
    match memsteer_benches::gpu::device() {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(std::env::var_os("MEMSTEER_REQUIRE_GPU").is_none(), "MEMSTEER_REQUIRE_GPU is set: {e}");
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

#[test]
fn gpu_log_probs_equal_the_cpu_runtime() {
    let Some(device) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("memsteer-gpu-parity-{}", std::process::id()));
    let rows = memsteer_benches::gpu::parity(&dir, &device).expect("parity runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(rows.len() >= 10);
    for p in &rows {
        assert!(p.ok(), "{}: max relative difference {:.2e} above {:.0e}", p.case, p.max_rel, p.bound);
    }
}

#[test]
fn gpu_llama_family_equals_transformers_and_the_cpu_runtime() {
    let Some(device) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("memsteer-gpu-family-{}", std::process::id()));
    let rows = memsteer_benches::gpu::family_parity(&dir, &device).expect("family parity runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(rows.len(), 34);
    for p in &rows {
        assert!(p.ok(), "{}: max relative difference {:.2e} above {:.0e}", p.case, p.max_rel, p.bound);
    }
}

#[test]
fn gpu_steer_step_equals_the_cpu_path() {
    let Some(device) = gpu() else { return };
    let memsteer_kernels::Device::Cuda(g) = &device else { unreachable!("device() opens CUDA") };
    let rows = memsteer_benches::gpu::steer_parity(&g.0).expect("steer parity runs");
    assert_eq!(rows.len(), 3);
    for p in &rows {
        assert!(p.ok(), "{}: loss {:?}, gradient differences {:?}", p.case, p.loss, p.grad_rel);
    }
}

#[test]
fn gpu_decoding_with_device_caches_equals_the_cpu_runtime() {
    let Some(device) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("memsteer-gpu-decode-{}", std::process::id()));
    let rows = memsteer_benches::gpu::decode_parity(&dir, &device).expect("decode parity runs");
    memsteer_benches::gpu::decode_errors(&dir, &device).expect("decoding errors are errors");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(rows.len(), 12);
    for p in &rows {
        assert!(
            p.ok(),
            "{}: log-probs {:.2e} (bound {:.0e}), hidden {:.2e}",
            p.case,
            p.max_rel,
            p.bound,
            p.hidden_max_rel
        );
    }
}

#[test]
fn gpu_server_answers_as_the_cpu_server() {
    let Some(device) = gpu() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let (same, all) = memsteer_benches::serve_parity(dir.path(), &device).expect("serve parity runs");
    assert_eq!(same, all, "{same} of {all} completions identical");
}
