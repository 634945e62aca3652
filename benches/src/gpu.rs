//! GPU checks (feature `cuda`): the runtime on a CUDA device against the CPU path on random models
//! (parity), and its speed and memory at the paper's scale (Pythia shapes, T = 2048). Used by the
//! `memsteer-gpu-check` binary (`scripts/gpu-check.sh`) and by `tests/cuda.rs`.

use std::path::Path;
use std::time::Instant;

use memsteer_kernels::Device;
use memsteer_kernels::cuda::{Attention, DType, Gpu, Linear};
use memsteer_lm::Model;
use memsteer_lm::gpu::GpuModel;
use memsteer_panel::rng::SplitMix64;
use memsteer_steer::cuda::{SteerStepInputs, SteerTrainer};

pub use crate::family_shapes;
use crate::{Dtype, FamilyShape, Shape, write_family, write_gpt2, write_neox};

/// One parity measurement: per-token log-probs of the GPU path against the CPU path.
#[derive(Debug, Clone)]
pub struct Parity {
    /// Which model.
    pub case: String,
    /// Tokens compared.
    pub tokens: usize,
    /// Largest absolute difference (nats).
    pub max_abs: f64,
    /// Largest difference relative to `max(1, |cpu|)`.
    pub max_rel: f64,
    /// Mean absolute difference.
    pub mean_abs: f64,
    /// The bound on `max_rel` this case must meet.
    pub bound: f64,
    /// The bound on `hidden_max_rel`.
    pub hidden_bound: f64,
    /// Largest difference of the final hidden states ([`GpuModel::hidden_states`], what the LM-Steer
    /// commands use) relative to `max(1, |cpu|)`.
    pub hidden_max_rel: f64,
}

impl Parity {
    /// Whether the case meets its bound.
    pub fn ok(&self) -> bool {
        self.max_rel <= self.bound && self.hidden_max_rel <= self.hidden_bound
    }
}

/// Held by the checks that switch the device's process-wide settings (`Gpu::set_vectorised`), so that
/// two of them running at once (the test harness's threads) do not switch them under each other.
static SETTINGS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Opens CUDA device 0, or says why not.
pub fn device() -> Result<Device, String> {
    Device::cuda(0).map_err(|e| e.to_string())
}

fn random_seqs(lens: &[usize], vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(seed);
    lens.iter().map(|&n| (0..n).map(|_| rng.below(vocab as u64) as u32).collect()).collect()
}

/// Small random GPT-2 and GPT-NeoX models in f32, f16 and bf16, scored by the CPU runtime and on
/// `device`, with both attention implementations and both logits types. Bounds: 1e-4 relative for f32 weights (the bar); for f16/bf16 weights the
/// products take half-precision inputs (the CPU path widens the same stored weights to f32 and keeps
/// activations in f32), so each product's inputs carry 2⁻¹¹ (f16) or 2⁻⁸ (bf16) relative rounding;
/// through 2 layers and the output layer that is a few 1e-3 (f16) or a few 1e-2 (bf16) nats on
/// logits of spread ~3, bounded here at 2e-2 and 1.5e-1 relative to max(1, |log p|).
pub fn parity(dir: &Path, device: &Device) -> Result<Vec<Parity>, String> {
    let _settings = SETTINGS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // Heads of 64 (d 128, 2 heads) and 128 (d 256, 2 heads): the fused attention kernel's sizes.
    let hd64 = Shape { d: 128, layers: 2, heads: 2, vocab: 1000, context: 600 };
    let hd128 = Shape { d: 256, layers: 2, heads: 2, vocab: 1000, context: 600 };
    // A vocabulary that is not a multiple of 8: the scalar log-sum-exp kernel.
    let odd = Shape { vocab: 1001, ..hd64 };
    // Lengths cross the attention tiles (64 fused, 256 tiled) and include the shortest sequence;
    // 4,748 rows in all cross the MLP's 4,096-row blocks.
    let seqs = random_seqs(&[600, 600, 600, 600, 600, 600, 600, 257, 2, 31, 129, 64, 65], 1000, 7);
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (f, t, a, tv) = (Attention::Fused, Attention::Tiled, Attention::Auto, Attention::FusedTransposedV);
    let pl = Attention::Pipelined;
    let cases: [(&str, Shape, Dtype, Attention, bool, f64); 29] = [
        ("gpt2", hd64, Dtype::F32, a, false, 1e-4),
        ("neox-parallel", hd64, Dtype::F32, a, false, 1e-4),
        ("neox-sequential", hd128, Dtype::F32, a, false, 1e-4),
        ("gpt2", hd64, Dtype::F16, t, false, 2e-2),
        ("gpt2", hd64, Dtype::F16, f, false, 2e-2),
        ("neox-parallel", hd64, Dtype::F16, t, false, 2e-2),
        ("neox-parallel", hd64, Dtype::F16, f, false, 2e-2),
        ("neox-parallel", hd64, Dtype::F16, f, true, 2e-2),
        ("neox-parallel", hd64, Dtype::F16, tv, false, 2e-2),
        ("neox-parallel", hd128, Dtype::F16, tv, false, 2e-2),
        ("gpt2", hd128, Dtype::BF16, tv, false, 1.5e-1),
        ("neox-parallel", hd128, Dtype::F16, f, false, 2e-2),
        ("neox-parallel", hd64, Dtype::BF16, t, false, 1.5e-1),
        ("neox-parallel", hd64, Dtype::BF16, f, false, 1.5e-1),
        ("gpt2", hd128, Dtype::BF16, t, false, 1.5e-1),
        ("gpt2", hd128, Dtype::BF16, f, false, 1.5e-1),
        ("gpt2-untied", hd64, Dtype::F32, a, false, 1e-4),
        ("gpt2-untied", hd64, Dtype::BF16, a, true, 1.5e-1),
        ("neox-parallel", odd, Dtype::F16, a, true, 2e-2),
        ("neox-parallel", odd, Dtype::F32, a, false, 1e-4),
        // The pipelined kernel: 128-query blocks of 64-key tiles at heads of 64, 64-query blocks of
        // 32-key tiles at 128 (lengths 2, 31, 64, 65, 129, 257 and 600 cross both).
        ("neox-parallel", hd64, Dtype::F16, pl, false, 2e-2),
        ("neox-parallel", hd128, Dtype::F16, pl, false, 2e-2),
        ("gpt2", hd64, Dtype::BF16, pl, false, 1.5e-1),
        ("gpt2", hd128, Dtype::BF16, pl, true, 1.5e-1),
        ("neox-sequential", hd64, Dtype::F16, pl, true, 2e-2),
        // The vectorised layer norm and bias + GELU (`Gpu::set_vectorised`), alone and with the
        // pipelined attention: f32 (layer norm only), f16 and bf16, both GELUs.
        ("gpt2+vec", hd64, Dtype::F32, a, false, 1e-4),
        ("gpt2+vec", hd64, Dtype::F16, a, false, 2e-2),
        ("neox-parallel+vec", hd128, Dtype::BF16, a, false, 1.5e-1),
        ("neox-sequential+vec", hd64, Dtype::F16, pl, false, 2e-2),
    ];
    let mut out = Vec::new();
    for (i, (case_name, shape, dtype, attention, f16_logits, bound)) in cases.into_iter().enumerate() {
        let (arch, vectorised) = match case_name.strip_suffix("+vec") {
            Some(a) => (a, true),
            None => (case_name, false),
        };
        let m = dir.join(format!("parity-{i}"));
        std::fs::create_dir_all(&m).map_err(|e| e.to_string())?;
        // Weights of std 2.4/√d: unit-scale activations, logits spread over a few nats.
        let std = 2.4 / (shape.d as f64).sqrt();
        if arch.starts_with("gpt2") {
            write_gpt2(&m, shape, arch == "gpt2-untied", dtype, std, 11 + i as u64);
        } else {
            write_neox(&m, shape, arch == "neox-parallel", dtype, std, 11 + i as u64);
        }
        let cpu_model = Model::load(&m).map_err(|e| e.to_string())?;
        let cpu = cpu_model.token_log_probs_batch(&refs).map_err(|e| e.to_string())?;
        let cpu_hidden = cpu_model.decoder().forward_packed(&refs, None).map_err(|e| e.to_string())?;
        let mut gpu_model = GpuModel::load(&m, device).map_err(|e| e.to_string())?;
        gpu_model.set_attention(attention);
        if f16_logits {
            gpu_model.set_output_chunk(100, DType::F16);
        }
        gpu_model.gpu().set_vectorised(vectorised);
        let scored = gpu_model.token_log_probs_batch(&refs).and_then(|lp| Ok((lp, gpu_model.hidden_states(&refs)?)));
        gpu_model.gpu().set_vectorised(true);
        let (gpu, gpu_hidden) = scored.map_err(|e| e.to_string())?;
        let case = format!(
            "{arch} {dtype:?} hd {} vocab {} attention {attention:?}{}{}",
            shape.d / shape.heads,
            shape.vocab,
            if f16_logits { ", f16 logits" } else { "" },
            if vectorised { ", vectorised" } else { "" }
        );
        let p = measure(case, (&cpu, &cpu_hidden), (&gpu, &gpu_hidden), (bound, hidden_bound(dtype)))?;
        out.push(p);
    }
    Ok(out)
}

/// Hidden states carry the rounding undamped by the softmax: for f32 the same 1e-4 as log-probs; for
/// half precision a regression bound about twice the largest value measured on an H200 (2.5e-2 f16,
/// 0.23 bf16, both GPT-2 with tanh GELU), not a derived one.
fn hidden_bound(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 1e-4,
        Dtype::F16 => 5e-2,
        _ => 0.5,
    }
}

/// The differences of GPU log-probs and hidden states from reference ones (the CPU runtime's, or
/// transformers' log-probs), as a [`Parity`] row.
fn measure(
    case: String,
    (cpu, cpu_hidden): (&[Vec<f32>], &[f32]),
    (gpu, gpu_hidden): (&[Vec<f32>], &[f32]),
    (bound, hidden_bound): (f64, f64),
) -> Result<Parity, String> {
    if gpu_hidden.len() != cpu_hidden.len() {
        return Err(format!(
            "{case}: hidden states: {} values on the GPU, {} on the CPU",
            gpu_hidden.len(),
            cpu_hidden.len()
        ));
    }
    let hidden_max_rel = cpu_hidden
        .iter()
        .zip(gpu_hidden)
        .map(|(a, b)| {
            let d = f64::from(a - b).abs() / f64::from(a.abs()).max(1.0);
            if d.is_nan() { f64::INFINITY } else { d }
        })
        .fold(0.0, f64::max);
    let mut p =
        Parity { case, tokens: 0, max_abs: 0.0, max_rel: 0.0, mean_abs: 0.0, bound, hidden_bound, hidden_max_rel };
    for (a, b) in cpu.iter().flatten().zip(gpu.iter().flatten()) {
        let diff = f64::from(a - b).abs();
        p.tokens += 1;
        p.max_abs = if diff.is_nan() { f64::INFINITY } else { p.max_abs.max(diff) };
        p.max_rel = if diff.is_nan() { f64::INFINITY } else { p.max_rel.max(diff / f64::from(a.abs()).max(1.0)) };
        p.mean_abs += diff;
    }
    let lens_differ = cpu.len() != gpu.len() || cpu.iter().zip(gpu).any(|(a, b)| a.len() != b.len());
    if lens_differ {
        return Err(format!("{}: token counts differ", p.case));
    }
    p.mean_abs /= p.tokens.max(1) as f64;
    Ok(p)
}

/// The transformers fixtures of the Llama family (`fixtures/lm/tiny-*`), relative to the working
/// directory (a checkout's root, where `scripts/gpu-check.sh` runs) or to this crate's sources.
fn fixture(name: &str) -> std::path::PathBuf {
    let here = Path::new("fixtures/lm").join(name);
    if here.join("golden.json").exists() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/lm").join(name)
}

/// The Llama family on the GPU: (1) each tiny transformers fixture (f32, heads of 8 or 16, GQA,
/// `llama3` and linear rope scaling up to position 8,299, Mistral's window, Qwen 2's biases, Qwen 3's
/// and OLMo 2's q/k norms, OLMo 2's post-norms, Gemma 3's sandwich norms, local rotary and scale)
/// scored by [`GpuModel`] against transformers' float64 log-probs (bound 1e-4 relative, as on the CPU);
/// (2) random models of each family at the fused kernels' head sizes (64 and 128, grouped 2 and 4 to
/// 1), f32 / f16 / bf16, against the CPU runtime, with the bounds of [`parity`] (f16: 4e-2 and 0.1 for
/// hidden states, twice what an H200 measured); (3) each attention kernel on a grouped model against
/// the same model ungrouped ([`crate::write_ungrouped_twin`]), bounds 5e-3 and 2e-2.
pub fn family_parity(dir: &Path, device: &Device) -> Result<Vec<Parity>, String> {
    let _settings = SETTINGS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = Vec::new();
    for name in [
        "tiny-llama-gqa",
        "tiny-llama-linear",
        "tiny-llama3-long",
        "tiny-llama3-16k",
        "tiny-mistral-window",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-olmo2",
        "tiny-gemma3",
        "tiny-gemma2",
        "tiny-gemma2-hub",
    ] {
        let path = fixture(name);
        let read = std::fs::read_to_string(path.join("golden.json")).map_err(|e| format!("{}: {e}", path.display()))?;
        let golden: serde_json::Value = serde_json::from_str(&read).map_err(|e| e.to_string())?;
        let seqs = golden["sequences"].as_array().ok_or("golden: no sequences")?;
        let mut tokens: Vec<Vec<u32>> = Vec::new();
        let mut want: Vec<Vec<f32>> = Vec::new();
        for s in seqs {
            let t: Vec<u32> = s["tokens"]
                .as_array()
                .ok_or("golden: tokens")?
                .iter()
                .filter_map(|t| t.as_u64())
                .map(|t| t as u32)
                .collect();
            if t.len() < 2 {
                continue;
            }
            let lp = s["token_log_probs"].as_array().ok_or("golden: token_log_probs")?;
            want.push(lp.iter().filter_map(|v| v.as_f64()).map(|v| v as f32).collect());
            tokens.push(t);
        }
        let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
        let cpu_hidden = Model::load(&path)
            .and_then(|m| m.decoder().forward_packed(&refs, None))
            .map_err(|e| format!("{name}: {e}"))?;
        let gpu_model = GpuModel::load(&path, device).map_err(|e| format!("{name}: {e}"))?;
        let gpu = gpu_model.token_log_probs_batch(&refs).map_err(|e| format!("{name}: {e}"))?;
        let gpu_hidden = gpu_model.hidden_states(&refs).map_err(|e| format!("{name}: {e}"))?;
        let longest = tokens.iter().map(Vec::len).max().unwrap_or(0);
        let case = format!("{name} F32 (longest {longest}) vs transformers; hidden states vs CPU");
        out.push(measure(case, (&want, &cpu_hidden), (&gpu, &gpu_hidden), (1e-4, 1e-4))?);
    }
    let hd64 = FamilyShape::SMALL;
    // Heads wider than d / heads (attention width 512 on a residual of 256), four query heads per KV head.
    let hd128 = FamilyShape { kv_heads: 1, head_dim: 128, ..hd64 };
    let seqs = random_seqs(&[600, 600, 600, 600, 257, 2, 31, 129, 64, 65], 1000, 7);
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (f, t, a, tv, pl) =
        (Attention::Fused, Attention::Tiled, Attention::Auto, Attention::FusedTransposedV, Attention::Pipelined);
    let cases: [(&str, FamilyShape, Dtype, Attention, f64); 22] = [
        ("llama", hd64, Dtype::F32, a, 1e-4),
        ("llama", hd64, Dtype::F16, a, 4e-2),
        ("llama", hd64, Dtype::BF16, f, 1.5e-1),
        ("llama", hd128, Dtype::F16, tv, 2e-2),
        ("llama", hd128, Dtype::BF16, t, 1.5e-1),
        ("llama", hd128, Dtype::F16, pl, 2e-2),
        ("qwen2", hd64, Dtype::F32, a, 1e-4),
        ("qwen2", hd64, Dtype::BF16, a, 1.5e-1),
        ("qwen3", hd128, Dtype::F32, a, 1e-4),
        ("qwen3", hd128, Dtype::BF16, a, 1.5e-1),
        ("mistral", hd64, Dtype::F32, a, 1e-4),
        ("mistral", hd64, Dtype::F16, a, 2e-2),
        ("olmo2", hd64, Dtype::F32, a, 1e-4),
        ("olmo2", hd64, Dtype::BF16, a, 1.5e-1),
        ("gemma3", hd64, Dtype::F32, a, 1e-4),
        ("gemma3", hd128, Dtype::BF16, a, 1.5e-1),
        // The same half-precision models (the seed follows family, shape and type, not the attention)
        // on the tiled path: rounding, not a fused kernel, where they agree.
        ("llama", hd64, Dtype::F16, t, 4e-2),
        ("gemma3", hd128, Dtype::BF16, t, 1.5e-1),
        // Gemma 3 27B's score scale (query_pre_attn_scalar 168 at heads of 128) through the fused
        // kernels, and the same model tiled.
        ("gemma3@168", hd128, Dtype::F16, a, 4e-2),
        ("gemma3@168", hd128, Dtype::F16, t, 4e-2),
        // Gemma 2: soft-capped scores (the tiled path, which Auto takes for them) and logits.
        ("gemma2", hd64, Dtype::F32, a, 1e-4),
        ("gemma2", hd128, Dtype::BF16, a, 1.5e-1),
    ];
    for (i, (family, shape, dtype, attention, bound)) in cases.into_iter().enumerate() {
        let m = dir.join(format!("family-{i}"));
        let std = 2.4 / (shape.d as f64).sqrt();
        let seed = memsteer_panel::rng::hash_key(101, format!("{family} {shape:?} {dtype:?}").as_bytes());
        write_family(&m, family, shape, 100, (dtype, std, seed))?;
        let cpu_model = Model::load(&m).map_err(|e| format!("{family}: {e}"))?;
        let cpu = cpu_model.token_log_probs_batch(&refs).map_err(|e| e.to_string())?;
        let cpu_hidden = cpu_model.decoder().forward_packed(&refs, None).map_err(|e| e.to_string())?;
        let mut gpu_model = GpuModel::load(&m, device).map_err(|e| format!("{family}: {e}"))?;
        gpu_model.set_attention(attention);
        let gpu = gpu_model.token_log_probs_batch(&refs).map_err(|e| format!("{family}: {e}"))?;
        let gpu_hidden = gpu_model.hidden_states(&refs).map_err(|e| format!("{family}: {e}"))?;
        let case = format!(
            "{family} {dtype:?} heads {}/{} of {} attention {attention:?}",
            shape.heads, shape.kv_heads, shape.head_dim
        );
        // f16 hidden states of the Llama family measured up to 5.05e-2 (SwiGLU multiplies two rounded
        // projections): a regression bound of twice that, as for the others.
        let hidden = if dtype == Dtype::F16 { 0.1 } else { hidden_bound(dtype) };
        out.push(measure(case, (&cpu, &cpu_hidden), (&gpu, &gpu_hidden), (bound, hidden))?);
        let _ = std::fs::remove_dir_all(&m);
    }
    // Grouped-query attention inside each kernel against the same model without grouping (every
    // key/value head copied to the query heads that shared it): the same function, so only rounding
    // (one product of another width) separates them; a wrong head mapping would be off by nats.
    for (i, (shape, dtype, attention)) in [
        (hd64, Dtype::F16, f),
        (hd64, Dtype::F16, pl),
        (hd128, Dtype::F16, tv),
        (hd128, Dtype::F16, pl),
        (hd64, Dtype::F16, t),
    ]
    .into_iter()
    .enumerate()
    {
        let (grouped, ungrouped) = (dir.join(format!("gqa-{i}")), dir.join(format!("gqa-{i}-twin")));
        let std = 2.4 / (shape.d as f64).sqrt();
        write_family(&grouped, "llama", shape, 100, (dtype, std, 300 + i as u64))?;
        crate::write_ungrouped_twin(&grouped, &ungrouped)?;
        let score = |m: &Path| -> Result<(Vec<Vec<f32>>, Vec<f32>), String> {
            let mut model = GpuModel::load(m, device).map_err(|e| e.to_string())?;
            model.set_attention(attention);
            Ok((
                model.token_log_probs_batch(&refs).map_err(|e| e.to_string())?,
                model.hidden_states(&refs).map_err(|e| e.to_string())?,
            ))
        };
        let (a, b) = (score(&grouped)?, score(&ungrouped)?);
        let case = format!(
            "llama {dtype:?} heads {}/{} of {} attention {attention:?} vs its ungrouped twin",
            shape.heads, shape.kv_heads, shape.head_dim
        );
        out.push(measure(case, (&b.0, &b.1), (&a.0, &a.1), (5e-3, 2e-2))?);
        for m in [grouped, ungrouped] {
            let _ = std::fs::remove_dir_all(m);
        }
    }
    Ok(out)
}

/// Scoring speed of a random bf16 model of the Llama `family` at `shape` (the defaults: pipelined
/// attention, f32 logits, vectorised kernels): tokens/s of the best of `batches` batches of `batch`
/// sequences of `t` tokens after a warm-up, bytes of the weights, peak bytes of weights plus forward.
pub fn bench_family_logprobs(
    device: &Device,
    dir: &Path,
    (family, shape): (&str, FamilyShape),
    (batch, t, batches): (usize, usize, usize),
) -> Result<(f64, usize, usize), String> {
    write_family(dir, family, shape, t, (Dtype::BF16, 0.02, 5))?;
    let model = GpuModel::load(dir, device).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(dir);
    let seqs = random_seqs(&vec![t; batch], shape.vocab, 9);
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (best, base, peak) = time_scoring(&model, &refs, batches)?;
    Ok(((batch * t) as f64 / best, base, peak))
}

/// Scores `refs` once (warm-up), then `batches` times: the best time in seconds, the device memory in
/// use before and its peak during the timed batches.
fn time_scoring(model: &GpuModel, refs: &[&[u32]], batches: usize) -> Result<(f64, usize, usize), String> {
    let gpu = model.gpu();
    model.token_log_probs_batch(refs).map_err(|e| e.to_string())?;
    let base = gpu.memory().0;
    gpu.reset_peak();
    let mut best = f64::INFINITY;
    for _ in 0..batches {
        let t0 = Instant::now();
        let lp = model.token_log_probs_batch(refs).map_err(|e| e.to_string())?;
        best = best.min(t0.elapsed().as_secs_f64());
        if lp.iter().flatten().any(|v| !v.is_finite()) {
            return Err("non-finite log-prob".into());
        }
    }
    Ok((best, base, gpu.memory().1))
}

/// One timing of the fused output layer.
#[derive(Debug, Clone)]
pub struct HeadTiming {
    /// Input type.
    pub inputs: DType,
    /// Rows per chunk.
    pub chunk: usize,
    /// Logits type of the chunk.
    pub logits: DType,
    /// Best of the repetitions, milliseconds.
    pub ms: f64,
    /// Best of the repetitions of the chunks' products alone (cuBLAS into one logits buffer, no
    /// reduction), milliseconds: what the row reductions and their overlap add is `ms` minus this.
    pub products_ms: f64,
    /// Peak memory above the inputs, bytes.
    pub peak: usize,
}

/// The fused output layer at `n` rows, vocabulary `vocab`, hidden `d`, for bf16 and f16 inputs with
/// f32 and f16 logits, for each chunk size: best of `reps` after a warm-up. Peak memory is above the
/// inputs (and the f16 copy of a bf16 output embedding).
pub fn bench_output_layer(
    gpu: &Gpu,
    (n, vocab, d): (usize, usize, usize),
    chunks: &[usize],
    reps: usize,
) -> Result<Vec<HeadTiming>, String> {
    let e = |x: memsteer_kernels::KernelError| x.to_string();
    let mut rng = SplitMix64::new(3);
    let h: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let w: Vec<f32> = (0..vocab * d).map(|_| (0.02 * rng.normal()) as f32).collect();
    let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
    let tb = gpu.upload_u32(&targets).map_err(e)?;
    let out = gpu.alloc(DType::F32, n).map_err(e)?;
    let mut res = Vec::new();
    for inputs in [DType::Bf16, DType::F16] {
        let bytes = |x: &[f32]| -> Vec<u8> {
            if inputs == DType::Bf16 {
                x.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()
            } else {
                x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()
            }
        };
        let (hb, wb) =
            (gpu.upload_bytes(inputs, &bytes(&h)).map_err(e)?, gpu.upload_bytes(inputs, &bytes(&w)).map_err(e)?);
        let lin = Linear { w: wb.view(), outputs: vocab, inputs: d, inputs_major: false };
        // bf16 with f16 logits is the bf16 model's path: E converted to f16 once (at model load, not
        // timed), the hidden states converted in each call (timed).
        let e16 = gpu.alloc(DType::F16, vocab * d).map_err(e)?;
        gpu.convert(wb.view(), e16.view(), vocab * d).map_err(e)?;
        let lin16 = Linear { w: e16.view(), ..lin };
        let h16 = gpu.alloc(DType::F16, n * d).map_err(e)?;
        for &chunk in chunks {
            for logits in [DType::F32, DType::F16] {
                gpu.synchronize().map_err(e)?;
                let base = gpu.memory().0;
                gpu.reset_peak();
                let run = || {
                    if logits == DType::F16 && inputs == DType::Bf16 {
                        gpu.convert(hb.view(), h16.view(), n * d)?;
                        gpu.log_prob_targets(
                            h16.view(),
                            &lin16,
                            tb.view(),
                            out.view(),
                            None,
                            n,
                            (chunk, logits),
                            None,
                        )?;
                    } else {
                        gpu.log_prob_targets(hb.view(), &lin, tb.view(), out.view(), None, n, (chunk, logits), None)?;
                    }
                    gpu.synchronize()
                };
                run().map_err(e)?;
                let mut best = f64::INFINITY;
                for _ in 0..reps {
                    let t = Instant::now();
                    run().map_err(e)?;
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let peak = gpu.memory().1 - base;
                let lg = gpu.alloc(logits, chunk.min(n) * vocab).map_err(e)?;
                let (x, l) = if logits == DType::F16 && inputs == DType::Bf16 { (&h16, &lin16) } else { (&hb, &lin) };
                let products = || {
                    for r0 in (0..n).step_by(chunk) {
                        let rows = chunk.min(n - r0);
                        let (h, o) = (x.view().slice(r0 * d, rows * d)?, lg.view().slice(0, rows * vocab)?);
                        gpu.matmul((rows, d, vocab), h, false, l.w, true, o, 1.0, 0.0)?;
                    }
                    gpu.synchronize()
                };
                products().map_err(e)?;
                let mut products_best = f64::INFINITY;
                for _ in 0..reps {
                    let t = Instant::now();
                    products().map_err(e)?;
                    products_best = products_best.min(t.elapsed().as_secs_f64());
                }
                res.push(HeadTiming { inputs, chunk, logits, ms: best * 1e3, products_ms: products_best * 1e3, peak });
            }
        }
    }
    Ok(res)
}

/// Sequence scoring at a Pythia shape: `batches` batches of `batch` random sequences of `t` tokens on
/// a random f16 model written to `dir`, with each attention implementation. Returns, per
/// implementation, (tokens/s of the best batch, bytes of the weights, peak bytes of weights plus the
/// forward pass).
#[allow(clippy::type_complexity)]
pub fn bench_logprobs(
    device: &Device,
    dir: &Path,
    shape: Shape,
    (batch, t, batches): (usize, usize, usize),
) -> Result<Vec<(String, f64, usize, usize)>, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    write_neox(dir, shape, true, Dtype::F16, 0.02, 5);
    let mut model = GpuModel::load(dir, device).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(dir);
    let gpu = model.gpu().clone();
    let seqs = random_seqs(&vec![t; batch], shape.vocab, 9);
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let mut out = Vec::new();
    let configs = [
        (Attention::Fused, DType::F32, false),
        (Attention::Pipelined, DType::F32, false),
        (Attention::Pipelined, DType::F32, true),
        (Attention::Pipelined, DType::F16, true),
        (Attention::Tiled, DType::F32, false),
    ];
    for (how, logits, vectorised) in configs {
        model.set_attention(how);
        model.set_output_chunk(memsteer_kernels::cuda::OUTPUT_CHUNK, logits);
        gpu.set_vectorised(vectorised);
        let (best, base, peak) = time_scoring(&model, &refs, batches)?;
        let label = format!("{how:?}, {logits:?} logits{}", if vectorised { ", vectorised" } else { "" });
        out.push((label, (batch * t) as f64 / best, base, peak));
    }
    gpu.set_vectorised(true);
    Ok(out)
}

/// One profiled forward pass (after a warm-up) of `batch` sequences of `t` tokens at `shape` with
/// random f16 weights (written once), for each (attention, vectorised kernels) configuration: with
/// `MEMSTEER_GPU_PROFILE` set, the model prints its per-stage times.
pub fn profile_logprobs(
    device: &Device,
    dir: &Path,
    shape: Shape,
    (batch, t): (usize, usize),
    configs: &[(Attention, bool)],
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    write_neox(dir, shape, true, Dtype::F16, 0.02, 5);
    let mut model = GpuModel::load(dir, device).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(dir);
    let seqs = random_seqs(&vec![t; batch], shape.vocab, 9);
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    for &(how, vectorised) in configs {
        eprintln!("attention {how:?}{}:", if vectorised { ", vectorised kernels" } else { "" });
        model.set_attention(how);
        model.gpu().set_vectorised(vectorised);
        let result = (0..2).try_for_each(|_| model.token_log_probs_batch(&refs).map(|_| ()));
        model.gpu().set_vectorised(true);
        result.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The LM-Steer training step on the device ([`SteerTrainer`]) against the CPU path
/// (`memsteer_steer::fused::steer_loss_and_grads`) on random inputs.
#[derive(Debug, Clone)]
pub struct SteerParity {
    /// Which inputs.
    pub case: String,
    /// Loss on the CPU and on the GPU.
    pub loss: (f64, f64),
    /// Largest gradient difference relative to the largest CPU gradient entry (`P1`, `P2`).
    pub grad_rel: (f64, f64),
}

impl SteerParity {
    /// Bound on every relative difference (the 1e-4 for f32).
    pub const BOUND: f64 = 1e-4;

    /// Whether the case meets [`SteerParity::BOUND`].
    pub fn ok(&self) -> bool {
        let loss_rel = (self.loss.0 - self.loss.1).abs() / self.loss.0.abs().max(1.0);
        [loss_rel, self.grad_rel.0, self.grad_rel.1].iter().all(|&x| x <= Self::BOUND)
    }
}

struct SteerCase {
    rows: usize,
    vocab: usize,
    dim: usize,
    rank: usize,
    steers: usize,
    epsilon: f32,
    /// Soft-cap of the logits (Gemma 2's final soft-capping).
    softcap: Option<f32>,
}

/// Random inputs of one steer step, owned (see [`steer_inputs`]).
struct SteerData {
    emb: Vec<f32>,
    h: Vec<f32>,
    p1: Vec<f32>,
    p2: Vec<f32>,
    strengths: Vec<f32>,
    targets: Vec<u32>,
}

impl SteerData {
    fn inputs<'a>(&'a self, c: &SteerCase) -> SteerStepInputs<'a> {
        SteerStepInputs {
            p1: &self.p1,
            p2: &self.p2,
            steers: c.steers,
            rank: c.rank,
            epsilon: c.epsilon,
            hidden: &self.h,
            strengths: &self.strengths,
            targets: &self.targets,
        }
    }

    /// The CPU path's loss, gradients written to `g1`, `g2`.
    fn cpu(&self, c: &SteerCase, g1: &mut [f32], g2: &mut [f32]) -> Result<f64, String> {
        let steers =
            memsteer_kernels::Steers { p1: &self.p1, p2: &self.p2, steers: c.steers, dim: c.dim, rank: c.rank };
        let batch =
            memsteer_steer::fused::SteerBatch { hidden: &self.h, strengths: &self.strengths, targets: &self.targets };
        let output = memsteer_steer::OutputLayer::new(&self.emb, c.softcap).map_err(|x| x.to_string())?;
        memsteer_steer::fused::steer_loss_and_grads(&steers, c.epsilon, output, &batch, g1, g2)
            .map_err(|x| x.to_string())
    }
}

fn steer_inputs(c: &SteerCase, seed: u64) -> SteerData {
    let mut rng = SplitMix64::new(seed);
    let mut normal = |n: usize, std: f64| -> Vec<f32> { (0..n).map(|_| (std * rng.normal()) as f32).collect() };
    let e = normal(c.vocab * c.dim, 1.0 / (c.dim as f64).sqrt());
    let h = normal(c.rows * c.dim, 2.0);
    let per = c.steers * c.dim * c.rank;
    let (p1, p2) = (normal(per, 0.3), normal(per, 0.3));
    let mut rng = SplitMix64::new(seed + 1);
    // Strengths of the labelled steer ±1 by row, the others 1 (as training uses them).
    let strengths: Vec<f32> =
        (0..c.rows * c.steers).map(|i| if i % c.steers == 0 && rng.below(2) == 0 { -1.0 } else { 1.0 }).collect();
    let targets: Vec<u32> = (0..c.rows).map(|_| rng.below(c.vocab as u64) as u32).collect();
    SteerData { emb: e, h, p1, p2, strengths, targets }
}

/// Loss and gradients of the device's steer step against the CPU's: vocabularies that are and are
/// not multiples of 8 (both log-sum-exp kernels), row counts crossing the logits chunks, one and two
/// steers, ranks below and equal to the hidden size, and soft-capped logits (at 1, where these logits,
/// of standard deviation about 2, bend).
pub fn steer_parity(gpu: &std::sync::Arc<Gpu>) -> Result<Vec<SteerParity>, String> {
    let e = |x: memsteer_steer::SteerError| x.to_string();
    let cases = [
        SteerCase { rows: 700, vocab: 1000, dim: 128, rank: 16, steers: 2, epsilon: 0.5, softcap: None },
        SteerCase { rows: 300, vocab: 1003, dim: 64, rank: 64, steers: 2, epsilon: 0.1, softcap: None },
        SteerCase { rows: 129, vocab: 5000, dim: 96, rank: 8, steers: 1, epsilon: 1.0, softcap: None },
        SteerCase { rows: 300, vocab: 1000, dim: 64, rank: 64, steers: 2, epsilon: 0.5, softcap: Some(1.0) },
    ];
    let mut out = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let data = steer_inputs(c, 40 + i as u64);
        let per = c.steers * c.dim * c.rank;
        let (mut c1, mut c2, mut g1, mut g2) = (vec![0.0; per], vec![0.0; per], vec![0.0; per], vec![0.0; per]);
        let cpu = data.cpu(c, &mut c1, &mut c2)?;
        let output = memsteer_steer::OutputLayer::new(&data.emb, c.softcap).map_err(e)?;
        let mut t = SteerTrainer::new(gpu, output, c.dim).map_err(e)?;
        t.set_chunk(256);
        let dev = t.loss_and_grads(&data.inputs(c), &mut g1, &mut g2).map_err(e)?;
        let rel = |a: &[f32], b: &[f32]| {
            let scale = a.iter().fold(0.0f64, |m, x| m.max(f64::from(x.abs()))).max(f64::MIN_POSITIVE);
            a.iter()
                .zip(b)
                .map(|(x, y)| {
                    let d = f64::from(x - y).abs() / scale;
                    if d.is_nan() { f64::INFINITY } else { d }
                })
                .fold(0.0, f64::max)
        };
        out.push(SteerParity {
            case: format!(
                "rows {} vocab {} dim {} rank {} steers {} ε {}{}",
                c.rows,
                c.vocab,
                c.dim,
                c.rank,
                c.steers,
                c.epsilon,
                c.softcap.map_or(String::new(), |cap| format!(" logits capped at {cap}"))
            ),
            loss: (cpu, dev),
            grad_rel: (rel(&c1, &g1), rel(&c2, &g2)),
        });
    }
    Ok(out)
}

/// One steer training step (GPT-2 small's output layer: `d = 768`, `V = 50,257`, rank 768, two steers)
/// at `rows` rows: milliseconds of the best of `reps` on the device, and of one step on the CPU
/// when `cpu` is set.
pub fn bench_steer_step(
    gpu: &std::sync::Arc<Gpu>,
    rows: usize,
    reps: usize,
    cpu: bool,
) -> Result<(f64, Option<f64>), String> {
    let e = |x: memsteer_steer::SteerError| x.to_string();
    let c = SteerCase { rows, vocab: 50_257, dim: 768, rank: 768, steers: 2, epsilon: 1e-3, softcap: None };
    let data = steer_inputs(&c, 3);
    let per = c.steers * c.dim * c.rank;
    let (mut g1, mut g2) = (vec![0.0; per], vec![0.0; per]);
    let t = SteerTrainer::new(gpu, memsteer_steer::OutputLayer::uncapped(&data.emb), c.dim).map_err(e)?;
    let inputs = data.inputs(&c);
    t.loss_and_grads(&inputs, &mut g1, &mut g2).map_err(e)?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        t.loss_and_grads(&inputs, &mut g1, &mut g2).map_err(e)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let cpu_ms = if cpu {
        let t0 = Instant::now();
        data.cpu(&c, &mut g1, &mut g2)?;
        Some(t0.elapsed().as_secs_f64() * 1e3)
    } else {
        None
    };
    Ok((best * 1e3, cpu_ms))
}

/// The decoding schedule of [`decode_parity`]: at each step, which sequences feed how many tokens (a
/// prompt when the sequence starts, then one token a step, and once a chunk of 4 on top of a cache).
/// Sequence 2 joins at step 3, sequence 1 leaves after step 6, so rows at different positions, new
/// prompts and single tokens share steps.
fn decode_schedule() -> Vec<Vec<(usize, usize)>> {
    (0..10)
        .map(|step| {
            let mut rows = vec![(
                0,
                if step == 0 {
                    37
                } else if step == 5 {
                    4
                } else {
                    1
                },
            )];
            if step <= 6 {
                rows.push((1, if step == 0 { 5 } else { 1 }));
            }
            if step >= 3 {
                rows.push((2, if step == 3 { 12 } else { 1 }));
            }
            rows
        })
        .collect()
}

/// Log-softmax of each row of `logits` (`vocab` wide).
fn log_softmax_rows(logits: &[f32], vocab: usize) -> Vec<Vec<f32>> {
    logits
        .chunks(vocab)
        .map(|row| {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m as f64 + row.iter().map(|&x| f64::from(x - m).exp()).sum::<f64>().ln();
            row.iter().map(|&x| (f64::from(x) - lse) as f32).collect()
        })
        .collect()
}

/// Decoding with KV caches on the device ([`GpuModel::forward_cached`], what `memsteer serve --device
/// cuda` runs) against the CPU's cached decoding of the same model, over [`decode_schedule`]: every
/// step's hidden states, and the log-softmax of each sequence's last row through [`GpuModel::logits`]
/// against the CPU's output layer. Random models of every architecture (GPT-2's learned positions,
/// GPT-NeoX's partial rotary, grouped heads of 64 to 256, Qwen 2's biases, q/k norms, a sliding window
/// of 8 that the sequences outgrow, Gemma 2's caps, Gemma 3's local rotary base), f32 (bound 1e-4) and
/// bf16 (the scoring bounds of [`parity`]).
pub fn decode_parity(dir: &Path, device: &Device) -> Result<Vec<Parity>, String> {
    let small = FamilyShape::SMALL;
    let wide = FamilyShape { head_dim: 256, ..small };
    let odd = FamilyShape { heads: 4, kv_heads: 4, head_dim: 80, ..small };
    let shape = Shape { d: 256, layers: 2, heads: 4, vocab: 1000, context: 600 };
    let mut out = Vec::new();
    let cases: [(&str, Option<FamilyShape>, Dtype); 12] = [
        ("gpt2", None, Dtype::F32),
        ("neox", None, Dtype::F32),
        ("neox", None, Dtype::BF16),
        ("llama", Some(small), Dtype::F32),
        ("llama", Some(odd), Dtype::F32),
        ("llama", Some(small), Dtype::BF16),
        ("mistral", Some(small), Dtype::F32),
        ("qwen2", Some(small), Dtype::F32),
        ("qwen3", Some(small), Dtype::F16),
        ("olmo2", Some(small), Dtype::F32),
        ("gemma3", Some(small), Dtype::F32),
        // Heads of 256 (every lane's eighth slot) and a score scale of 64^-1/2, not 256^-1/2.
        ("gemma2@64", Some(wide), Dtype::F32),
    ];
    for (i, (family, fshape, dtype)) in cases.into_iter().enumerate() {
        let m = dir.join(format!("decode-{i}"));
        let std = 2.4 / 256f64.sqrt();
        let seed = 500 + i as u64;
        match (family, fshape) {
            ("gpt2", _) => write_gpt2(&m, shape, false, dtype, std, seed),
            ("neox", _) => write_neox(&m, shape, true, dtype, std, seed),
            (f, Some(s)) => write_family(&m, f, s, 8, (dtype, std, seed))?,
            _ => return Err(format!("no shape for {family}")),
        }
        let case = format!(
            "{family} {dtype:?}{} cached decoding",
            fshape.map_or(String::new(), |s| format!(" heads {}/{} of {}", s.heads, s.kv_heads, s.head_dim))
        );
        let err = |e: memsteer_lm::LmError| format!("{case}: {e}");
        let cpu_model = Model::load(&m).map_err(err)?;
        let cpu = cpu_model.decoder();
        let gpu = GpuModel::load(&m, device).map_err(err)?;
        let vocab = cpu.vocab();
        let mut rng = SplitMix64::new(seed);
        let mut cpu_caches: Vec<memsteer_lm::KvCache> = (0..3).map(|_| memsteer_lm::KvCache::new()).collect();
        let mut gpu_caches = Vec::new();
        // Exactly what each sequence of the schedule needs, different for each: a cache read with
        // another sequence's capacity would go wrong.
        for capacity in [49, 11, 18] {
            gpu_caches.push(gpu.new_cache(capacity).map_err(err)?);
        }
        let (mut cpu_hidden, mut gpu_hidden) = (Vec::new(), Vec::new());
        let (mut cpu_lp, mut gpu_lp) = (Vec::new(), Vec::new());
        for step in decode_schedule() {
            let seqs: Vec<Vec<u32>> =
                step.iter().map(|&(_, n)| (0..n).map(|_| rng.below(vocab as u64) as u32).collect()).collect();
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let mut cc: Vec<&mut memsteer_lm::KvCache> = Vec::new();
            let mut gc: Vec<&mut memsteer_lm::gpu::DeviceKvCache> = Vec::new();
            for (s, (c, g)) in cpu_caches.iter_mut().zip(gpu_caches.iter_mut()).enumerate() {
                if step.iter().any(|&(x, _)| x == s) {
                    cc.push(c);
                    gc.push(g);
                }
            }
            let h_cpu = cpu.forward_cached(&refs, &mut cc).map_err(err)?;
            let h_gpu = gpu.forward_cached(&refs, &mut gc).map_err(err)?;
            // Each sequence's last row through both output layers.
            let d = cpu.dim();
            let mut ends = Vec::new();
            let mut at = 0;
            for s in &seqs {
                at += s.len();
                ends.push(at - 1);
            }
            let last: Vec<f32> = ends.iter().flat_map(|&r| h_gpu[r * d..(r + 1) * d].iter().copied()).collect();
            let last_cpu: Vec<f32> = ends.iter().flat_map(|&r| h_cpu[r * d..(r + 1) * d].iter().copied()).collect();
            let mut logits_cpu = vec![0.0f32; ends.len() * vocab];
            memsteer_kernels::matmul_transposed(
                &Device::Cpu,
                &last_cpu,
                cpu.output_embedding(),
                ends.len(),
                d,
                vocab,
                &mut logits_cpu,
            )
            .map_err(|e| e.to_string())?;
            cpu.logits_in_place(&mut logits_cpu);
            let logits_gpu = gpu.logits(&last, ends.len()).map_err(err)?;
            cpu_lp.extend(log_softmax_rows(&logits_cpu, vocab));
            gpu_lp.extend(log_softmax_rows(&logits_gpu, vocab));
            cpu_hidden.extend(h_cpu);
            gpu_hidden.extend(h_gpu);
        }
        let (bound, hidden) = match dtype {
            Dtype::F32 => (1e-4, 1e-4),
            Dtype::F16 => (4e-2, 0.1),
            _ => (1.5e-1, hidden_bound(dtype)),
        };
        out.push(measure(case, (&cpu_lp, &cpu_hidden), (&gpu_lp, &gpu_hidden), (bound, hidden))?);
        let _ = std::fs::remove_dir_all(&m);
    }
    Ok(out)
}

/// The errors of decoding on the device: a step past a cache's capacity, a cache of another model, a
/// capacity beyond the context. Each must be an error saying so, and a refused step must leave the
/// cache as it was: two tokens, the refused steps, two more tokens, whose hidden states must equal the
/// CPU's for positions 2 and 3.
pub fn decode_errors(dir: &Path, device: &Device) -> Result<(), String> {
    let m = dir.join("decode-errors");
    let shape = Shape { d: 64, layers: 2, heads: 2, vocab: 100, context: 50 };
    write_gpt2(&m, shape, false, Dtype::F32, 0.3, 9);
    let e = |e: memsteer_lm::LmError| e.to_string();
    let a = GpuModel::load(&m, device).map_err(e)?;
    let b = GpuModel::load(&m, device).map_err(e)?;
    let expect = |r: Result<Vec<f32>, memsteer_lm::LmError>, want: &str| match r {
        Err(e) if e.to_string().contains(want) => Ok(()),
        Err(e) => Err(format!("expected an error about {want:?}, got: {e}")),
        Ok(_) => Err(format!("expected an error about {want:?}, got hidden states")),
    };
    let mut c = a.new_cache(4).map_err(e)?;
    a.forward_cached(&[&[1, 2]], &mut [&mut c]).map_err(e)?;
    expect(a.forward_cached(&[&[7, 8, 9]], &mut [&mut c]), "capacity")?;
    expect(b.forward_cached(&[&[7]], &mut [&mut c]), "another model")?;
    if c.len() != 2 {
        return Err(format!("refused steps left {} positions in the cache, not 2", c.len()));
    }
    match a.new_cache(51) {
        Err(e) if e.to_string().contains("context") => {}
        other => return Err(format!("a cache beyond the context: expected an error, got {other:?}")),
    }
    let h = a.forward_cached(&[&[3, 4]], &mut [&mut c]).map_err(e)?;
    let cpu = Model::load(&m).map_err(e)?;
    let want = cpu.decoder().hidden_states(&[1, 2, 3, 4]).map_err(e)?;
    let want = &want[2 * shape.d..];
    let worst = h.iter().zip(want).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0f32, f32::max);
    let _ = std::fs::remove_dir_all(&m);
    if worst > 1e-4 || h.len() != want.len() {
        return Err(format!("after the refused steps, hidden states differ from the CPU's by {worst:.2e}"));
    }
    Ok(())
}
