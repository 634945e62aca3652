//! LM-Steer's training step on the device: the steered projection, the fused output layer and its
//! backward, and the chain to the projectors' gradients, with no `[tokens, vocab]` buffer.
//!
//! The computation is the CPU path's ([`crate::fused::steer_loss_and_grads`]), on the primitives the
//! kernels crate exposes ([`Gpu::matmul`], [`Gpu::lse_targets`], [`Gpu::softmax_grad`],
//! [`Gpu::scale_rows`]):
//!
//! - forward: `V_i = diag(s_i) (H P1_i)`, `H' = H + ε Σ_i V_i P2_iᵀ`;
//! - output layer, per chunk of rows: logits `H'_c Eᵀ` (`f32`), each row's log-sum-exp and target
//!   log-prob (the scoring kernels), then in place `(softmax − one-hot) / n`, and `G_c = P_c E`;
//! - backward: `dP2_i = ε Gᵀ V_i`, `dP1_i = ε Hᵀ diag(s_i) (G P2_i)`.
//!
//! Every product is an `f32` cuBLAS product without TF32, so the result equals the CPU path's up to
//! the order of the sums. Memory on the device: the output embedding (uploaded once), the batch
//! (`H`, `H'`, `G`: `3 · n · d` values), `V` (`steers · n · rank`) and one chunk of logits.

use std::sync::Arc;

use memsteer_kernels::KernelError;
use memsteer_kernels::cuda::{DType, DevBuf, Gpu, OUTPUT_CHUNK};

use crate::Result;

/// LM-Steer's training step on one CUDA device, its output embedding uploaded once.
pub struct SteerTrainer {
    gpu: Arc<Gpu>,
    embedding: DevBuf,
    vocab: usize,
    dim: usize,
    chunk: usize,
    softcap: Option<f32>,
}

impl std::fmt::Debug for SteerTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SteerTrainer({:?}, vocab {}, dim {})", self.gpu, self.vocab, self.dim)
    }
}

/// One step's inputs: the projectors and the batch, all on the host.
#[derive(Debug, Clone, Copy)]
pub struct SteerStepInputs<'a> {
    /// `P1`, `steers × dim × rank`.
    pub p1: &'a [f32],
    /// `P2`, `steers × dim × rank`.
    pub p2: &'a [f32],
    /// Number of steers.
    pub steers: usize,
    /// Rank of each steer.
    pub rank: usize,
    /// The steers' common ε.
    pub epsilon: f32,
    /// Hidden states `H`, `rows × dim`.
    pub hidden: &'a [f32],
    /// Strengths, `rows × steers`.
    pub strengths: &'a [f32],
    /// Next-token ids, one per row.
    pub targets: &'a [u32],
}

impl SteerTrainer {
    /// Uploads the output embedding (`vocab × dim`, row-major; with its logits' soft-cap, when it has
    /// one).
    pub fn new(gpu: &Arc<Gpu>, output: crate::OutputLayer<'_>, dim: usize) -> Result<Self> {
        let embedding = output.embedding();
        if dim == 0 || embedding.is_empty() || !embedding.len().is_multiple_of(dim) {
            return Err(KernelError::Shape {
                what: "output embedding",
                expected: format!("a non-empty multiple of the hidden size {dim}"),
                found: embedding.len(),
            }
            .into());
        }
        let vocab = embedding.len() / dim;
        let softcap = output.softcap();
        Ok(SteerTrainer {
            gpu: gpu.clone(),
            embedding: gpu.upload_f32(embedding)?,
            vocab,
            dim,
            chunk: OUTPUT_CHUNK,
            softcap,
        })
    }

    /// Rows per chunk of logits (default [`OUTPUT_CHUNK`]): `rows × vocab` `f32` values exist at once.
    pub fn set_chunk(&mut self, rows: usize) {
        self.chunk = rows.max(1);
    }

    /// Mean negative log-likelihood of the targets under the steered logits, and its gradients with
    /// respect to `P1` and `P2` (written to `grad_p1`, `grad_p2`, each `steers × dim × rank`).
    /// Per-row losses are summed on the host in row order (`f64`), as the CPU path sums them.
    pub fn loss_and_grads(&self, x: &SteerStepInputs<'_>, grad_p1: &mut [f32], grad_p2: &mut [f32]) -> Result<f64> {
        let (d, r, s) = (self.dim, x.rank, x.steers);
        let n = x.targets.len();
        let per = d * r;
        let shape = |what: &'static str, expected: usize, found: usize| {
            if expected == found {
                Ok(())
            } else {
                Err(KernelError::Shape { what, expected: expected.to_string(), found })
            }
        };
        if n == 0 || r == 0 {
            return Err(KernelError::Shape {
                what: "steer step",
                expected: "at least one row and rank 1".into(),
                found: 0,
            }
            .into());
        }
        shape("hidden states", n * d, x.hidden.len())?;
        shape("strengths", n * s, x.strengths.len())?;
        for (what, v) in [("p1", x.p1.len()), ("p2", x.p2.len()), ("p1 gradient", grad_p1.len())] {
            shape(what, s * per, v)?;
        }
        shape("p2 gradient", s * per, grad_p2.len())?;
        if let Some((i, t)) = x.targets.iter().enumerate().find(|(_, t)| **t as usize >= self.vocab) {
            return Err(KernelError::Shape {
                what: "target id",
                expected: format!("below the vocabulary size {} (row {i})", self.vocab),
                found: *t as usize,
            }
            .into());
        }
        let g = &*self.gpu;
        let (h, st, tg) = (g.upload_f32(x.hidden)?, g.upload_f32(x.strengths)?, g.upload_u32(x.targets)?);
        let (p1, p2) = (g.upload_f32(x.p1)?, g.upload_f32(x.p2)?);
        let (gp1, gp2) = (g.alloc(DType::F32, s * per)?, g.alloc(DType::F32, s * per)?);
        let hp = g.alloc(DType::F32, n * d)?;
        let v = g.alloc(DType::F32, s * n * r)?;
        let q = g.alloc(DType::F32, n * r)?;
        let grad = g.alloc(DType::F32, n * d)?;
        let (out, lse) = (g.alloc(DType::F32, n)?, g.alloc(DType::F32, n)?);
        let strengths = st.view();

        // Forward: V_i = diag(s_i) (H P1_i); H' = H + ε Σ_i V_i P2_iᵀ.
        g.copy(h.view(), hp.view(), n * d)?;
        for i in 0..s {
            let vi = v.view().slice(i * n * r, n * r)?;
            g.matmul((n, d, r), h.view(), false, p1.view().slice(i * per, per)?, false, vi, 1.0, 0.0)?;
            g.scale_rows(vi, (n, r), strengths, (s, i), 1.0)?;
            g.matmul((n, r, d), vi, false, p2.view().slice(i * per, per)?, true, hp.view(), x.epsilon, 1.0)?;
        }

        // Output layer, chunk by chunk: loss terms and G = dL/dH'.
        let chunk = self.chunk.min(n);
        let logits = g.alloc(DType::F32, chunk * self.vocab)?;
        let e = self.embedding.view();
        for r0 in (0..n).step_by(chunk) {
            let c = chunk.min(n - r0);
            let lg = logits.view().slice(0, c * self.vocab)?;
            let (t, o, l) = (tg.view().slice(r0, c)?, out.view().slice(r0, c)?, lse.view().slice(r0, c)?);
            g.matmul((c, d, self.vocab), hp.view().slice(r0 * d, c * d)?, false, e, true, lg, 1.0, 0.0)?;
            if let Some(cap) = self.softcap {
                g.softcap(lg, cap)?;
            }
            g.lse_targets(lg, self.vocab, t, o, l, c)?;
            g.softmax_grad(lg, self.vocab, l, t, 1.0 / n as f32, c, self.softcap)?;
            g.matmul((c, self.vocab, d), lg, false, e, false, grad.view().slice(r0 * d, c * d)?, 1.0, 0.0)?;
        }
        drop(logits);

        // Backward: dP2_i = ε Gᵀ V_i; dP1_i = ε Hᵀ diag(s_i) (G P2_i).
        for i in 0..s {
            let vi = v.view().slice(i * n * r, n * r)?;
            let (g1, g2) = (gp1.view().slice(i * per, per)?, gp2.view().slice(i * per, per)?);
            g.matmul((d, n, r), grad.view(), true, vi, false, g2, x.epsilon, 0.0)?;
            g.matmul((n, d, r), grad.view(), false, p2.view().slice(i * per, per)?, false, q.view(), 1.0, 0.0)?;
            g.scale_rows(q.view(), (n, r), strengths, (s, i), x.epsilon)?;
            g.matmul((d, n, r), h.view(), true, q.view(), false, g1, 1.0, 0.0)?;
        }
        grad_p1.copy_from_slice(&g.download_f32(gp1.view())?);
        grad_p2.copy_from_slice(&g.download_f32(gp2.view())?);
        let lp = g.download_f32(out.view())?;
        Ok(-lp.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64)
    }
}
