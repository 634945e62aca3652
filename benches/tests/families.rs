//! The random Llama-family models `memsteer_benches::write_family` writes (the GPU checks' inputs) load
//! in the CPU runtime with the shape asked for, and score finite log-probs.

use memsteer_benches::{Dtype, FamilyShape, write_family};

/// A small grouped-query shape (4 query heads, 2 KV heads of 16) for the writers' tests.
fn small() -> FamilyShape {
    FamilyShape {
        d: 32,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        inner: 48,
        vocab: 80,
        context: 40,
        tied: false,
    }
}

#[test]
fn every_family_writer_gives_a_model_the_cpu_runtime_scores() {
    let shape = small();
    for family in ["llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma3", "gemma2"] {
        let dir = std::env::temp_dir().join(format!("memsteer-family-{family}-{}", std::process::id()));
        write_family(&dir, family, shape, 8, (Dtype::F32, 0.3, 1)).expect("writes");
        let arch = memsteer_lm::arch::Arch::from_file(&dir.join("config.json")).expect("config");
        assert_eq!((arch.dim, arch.heads, arch.kv_heads, arch.head_dim, arch.inner), (32, 4, 2, 16, 48), "{family}");
        assert_eq!(arch.window.is_some(), matches!(family, "mistral" | "gemma3" | "gemma2"), "{family}");
        assert_eq!(
            (arch.logit_softcap.is_some(), arch.attn_softcap.is_some()),
            (family == "gemma2", family == "gemma2")
        );
        let model = memsteer_lm::Model::load(&dir).expect("loads");
        let lp = model.token_log_probs(&(0..30).map(|i| (i * 7 % 80) as u32).collect::<Vec<_>>()).expect("scores");
        assert_eq!(lp.len(), 29);
        assert!(lp.iter().all(|v| v.is_finite() && *v < 0.0), "{family}: {lp:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(write_family(std::path::Path::new("/nonexistent"), "gpt5", shape, 8, (Dtype::F32, 0.3, 1)).is_err());
}

/// The ungrouped twin of a grouped-query model (every key/value head copied to the query heads that
/// shared it) computes the same function: the CPU runtime scores both alike.
#[test]
fn the_ungrouped_twin_scores_as_the_grouped_model() {
    let shape = small();
    let base = std::env::temp_dir().join(format!("memsteer-twin-{}", std::process::id()));
    let (grouped, twin) = (base.join("grouped"), base.join("twin"));
    write_family(&grouped, "llama", shape, 8, (Dtype::F32, 0.3, 4)).expect("writes");
    memsteer_benches::write_ungrouped_twin(&grouped, &twin).expect("twin");
    let arch = memsteer_lm::arch::Arch::from_file(&twin.join("config.json")).expect("config");
    assert_eq!((arch.heads, arch.kv_heads), (4, 4));
    let tokens: Vec<u32> = (0..30).map(|i| (i * 11 % 80) as u32).collect();
    let a = memsteer_lm::Model::load(&grouped).expect("grouped").token_log_probs(&tokens).expect("scores");
    let b = memsteer_lm::Model::load(&twin).expect("twin").token_log_probs(&tokens).expect("scores");
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "grouped and ungrouped differ by {worst}");
    // A different model is not its twin: the check can fail.
    write_family(&grouped, "llama", shape, 8, (Dtype::F32, 0.3, 5)).expect("writes");
    let c = memsteer_lm::Model::load(&grouped).expect("other").token_log_probs(&tokens).expect("scores");
    assert!(c.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3));
    let _ = std::fs::remove_dir_all(&base);
}

/// The harness of `memsteer-gpu-check serve` (two servers in this process, 32 concurrent requests
/// with steers at three strengths, greedy and seeded) on the CPU against itself: every completion
/// identical, as a request's text does not depend on what else the server is doing.
#[test]
fn two_cpu_servers_give_the_same_completions() {
    let dir = tempfile::tempdir().unwrap();
    let (same, all) = memsteer_benches::serve_parity(dir.path(), &memsteer_kernels::Device::Cpu).unwrap();
    assert_eq!((same, all), (32, 32));
}
