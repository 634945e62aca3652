//! The random Llama-family models `memsteer_benches::write_family` writes (the GPU checks' inputs) load
//! in the CPU runtime with the shape asked for, and score finite log-probs.

use memsteer_benches::{Dtype, FamilyShape, write_family};

#[test]
fn every_family_writer_gives_a_model_the_cpu_runtime_scores() {
    let shape =
        FamilyShape { d: 32, layers: 2, heads: 4, kv_heads: 2, head_dim: 16, inner: 48, vocab: 80, context: 40 };
    for family in ["llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma3"] {
        let dir = std::env::temp_dir().join(format!("memsteer-family-{family}-{}", std::process::id()));
        write_family(&dir, family, shape, 8, (Dtype::F32, 0.3, 1)).expect("writes");
        let arch = memsteer_lm::arch::Arch::from_file(&dir.join("config.json")).expect("config");
        assert_eq!((arch.dim, arch.heads, arch.kv_heads, arch.head_dim, arch.inner), (32, 4, 2, 16, 48), "{family}");
        assert_eq!(arch.window.is_some(), matches!(family, "mistral" | "gemma3"), "{family}");
        let model = memsteer_lm::Model::load(&dir).expect("loads");
        let lp = model.token_log_probs(&(0..30).map(|i| (i * 7 % 80) as u32).collect::<Vec<_>>()).expect("scores");
        assert_eq!(lp.len(), 29);
        assert!(lp.iter().all(|v| v.is_finite() && *v < 0.0), "{family}: {lp:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(write_family(std::path::Path::new("/nonexistent"), "gpt5", shape, 8, (Dtype::F32, 0.3, 1)).is_err());
}
