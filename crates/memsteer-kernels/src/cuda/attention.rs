//! Causal attention: the tiled cuBLAS path, the fused (flash) kernel and its pipelined variant.

use super::*;

impl Gpu {
    /// Causal attention of packed sequences (`spans`: `(first row, length)` each) over head-major
    /// `q`, `k`, `v` (`heads × rows × hd`), written row-major to `ctx` (`rows × heads·hd`, `ctx`'s type
    /// equal to q's). Tiled by [`QUERY_TILE`] queries: a tile's scores (`heads × tile × keys`, f32)
    /// and probabilities exist one tile at a time, and each tile reaches only the keys it can see.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, hd): (usize, usize, usize),
    ) -> Result<()> {
        self.attention_with(Attention::Auto, (q, k, v), ctx, spans, (rows, heads, hd))
    }

    /// Whether [`Attention::Fused`] runs for these operands on this device: f16 or bf16 heads of 64 or
    /// 128, compute capability 8.0 or above (`mma.sync` m16n8k16).
    pub fn fused_attention_applies(&self, dtype: DType, hd: usize) -> bool {
        matches!(dtype, DType::F16 | DType::Bf16) && matches!(hd, 64 | 128) && self.capability >= (8, 0)
    }

    /// [`Gpu::attention`] with the implementation chosen: [`Attention::Fused`] is the flash-attention
    /// kernel (tensor cores, scores in registers; f16/bf16 heads of 64 or 128 dimensions, an error
    /// otherwise), [`Attention::Tiled`] the cuBLAS products over query tiles with a softmax kernel
    /// between them (any type and head size), [`Attention::Auto`] the pipelined fused kernel where it
    /// applies.
    pub fn attention_with(
        &self,
        how: Attention,
        qkv: (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, hd): (usize, usize, usize),
    ) -> Result<()> {
        let shape = AttentionShape { rows, heads, kv_heads: heads, hd, window: None, scale: None, softcap: None };
        self.attention_shaped(how, qkv, ctx, spans, shape)
    }

    /// [`Gpu::attention_with`] for grouped-query attention (`k` and `v` hold `kv_heads × rows × hd`;
    /// query head `h` reads key/value head `h / (heads / kv_heads)`, nothing copied), a sliding
    /// window (the tiled path only: [`Attention::Auto`] takes it, a fused kernel is refused) and a
    /// scale other than `hd^-1/2`.
    pub fn attention_shaped(
        &self,
        how: Attention,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        shape: AttentionShape,
    ) -> Result<()> {
        let AttentionShape { rows, heads, kv_heads, hd, window, scale, softcap } = shape;
        shape.check_options()?;
        // A window no sequence outgrows changes nothing: the fused kernels stay available.
        let longest_span = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let window = window.filter(|&w| w < longest_span);
        let group = heads / kv_heads;
        // Fused kernels take scores in log2 units (their exponentials are ex2).
        let log2_scale = scale.map_or(std::f32::consts::LOG2_E / (hd as f32).sqrt(), |s| std::f32::consts::LOG2_E * s);
        let scale = scale.unwrap_or(1.0 / (hd as f32).sqrt());
        check_operands(self.ordinal, "attention", &[("q", q), ("k", k), ("v", v)], &[("context", ctx)], false)?;
        let fused = match how {
            Attention::Tiled => false,
            // Measured on an H200 (docs/performance.md, 2026-12-04): the pipelined kernel is 1.96-2.09×
            // the tiled path at 64-dimensional heads and 1.3× at 128.
            Attention::Auto => self.fused_attention_applies(q.dtype, hd) && window.is_none() && softcap.is_none(),
            Attention::Fused | Attention::FusedTransposedV | Attention::Pipelined => {
                if window.is_some() || softcap.is_some() {
                    return Err(KernelError::Unsupported {
                        what: "fused attention",
                        message: "a sliding window or a soft-cap runs on the tiled path (Attention::Tiled or Auto)"
                            .into(),
                    });
                }
                if !self.fused_attention_applies(q.dtype, hd) {
                    return Err(KernelError::Unsupported {
                        what: "fused attention",
                        message: format!(
                            "needs f16 or bf16 heads of 64 or 128 dimensions on compute capability 8.0 or above; \
                             here {:?} heads of {hd} on {}.{}",
                            q.dtype, self.capability.0, self.capability.1
                        ),
                    });
                }
                true
            }
        };
        // One set of checks for both implementations (flash_attention is only reached from here).
        let d = heads * hd;
        for (what, o, n) in
            [("q", q, d), ("k", k, kv_heads * hd), ("v", v, kv_heads * hd), ("attention output", ctx, d)]
        {
            o.need(what, rows * n)?;
            if o.dtype != q.dtype {
                return Err(KernelError::Shape { what, expected: format!("{:?}", q.dtype), found: o.len });
            }
        }
        if let Some(&(s, l)) = spans.iter().find(|(s, l)| s + l > rows) {
            return Err(KernelError::Shape {
                what: "attention span",
                expected: format!("inside {rows} rows"),
                found: s + l,
            });
        }
        if fused {
            // The pipelined kernel's cp.async loads need 16-byte aligned operands (every buffer
            // `Gpu::alloc` gives is; a view into one may not be): Auto falls back to the first kernel,
            // whose 4-byte loads need q, k, v and the output on 4-byte boundaries.
            let aligned = |n: u64| [q, k, v, ctx].iter().all(|o| o.ptr.is_multiple_of(n));
            if how != Attention::Pipelined && !aligned(4) {
                if how == Attention::Auto {
                    return self.attention_shaped(Attention::Tiled, (q, k, v), ctx, spans, shape);
                }
                return Err(KernelError::Unsupported {
                    what: "fused attention",
                    message: "q, k, v and the output must start on 4-byte boundaries".into(),
                });
            }
            if how == Attention::Pipelined || (how == Attention::Auto && aligned(16)) {
                return self.flash_attention_pipelined((q, k, v), ctx, spans, (rows, heads, group, hd), log2_scale);
            }
            let transposed_v = how == Attention::FusedTransposedV;
            return self.flash_attention((q, k, v), ctx, spans, (rows, heads, group, hd), log2_scale, transposed_v);
        }
        self.tiled_attention((q, k, v), ctx, spans, shape, scale)
    }

    /// [`Attention::Tiled`], after [`Gpu::attention_shaped`]'s checks (`scale` already resolved, a
    /// window only where some sequence outgrows it): cuBLAS products over query tiles with the causal
    /// (and windowed) softmax kernel between them.
    fn tiled_attention(
        &self,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        shape: AttentionShape,
        scale: f32,
    ) -> Result<()> {
        let AttentionShape { rows, heads, kv_heads, hd, window, softcap, .. } = shape;
        let longest_span = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let window = window.filter(|&w| w < longest_span);
        let (group, d) = (heads / kv_heads, heads * hd);
        let longest = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let tile = QUERY_TILE.min(longest.max(1));
        let scores = self.alloc(DType::F32, heads * tile * longest)?;
        let probs = self.alloc(q.dtype, heads * tile * longest)?;
        for &(start, len) in spans {
            for q0 in (0..len).step_by(tile) {
                let qb = tile.min(len - q0);
                let kn = q0 + qb;
                let (s, p) = (scores.view().slice(0, heads * qb * kn)?, probs.view().slice(0, heads * qb * kn)?);
                // Query heads j, j + group, … share key/value heads 0, 1, …: one batched product per j
                // (batch kv_heads; a single one without grouping), scores of head h at h·qb·kn.
                for j in 0..group {
                    // S (qb × kn) = Q_tile Kᵀ per head: column-major Sᵀ = K Q_tileᵀ.
                    let kop =
                        Operand { v: k.slice(start * hd, k.len - start * hd)?, trans: true, ld: hd, stride: rows * hd };
                    let q_at = (j * rows + start + q0) * hd;
                    let qop =
                        Operand { v: q.slice(q_at, q.len - q_at)?, trans: false, ld: hd, stride: group * rows * hd };
                    let s_at = j * qb * kn;
                    let sop =
                        Operand { v: s.slice(s_at, s.len - s_at)?, trans: false, ld: kn, stride: group * qb * kn };
                    self.gemm((kn, qb, hd), kop, qop, sop, kv_heads, 1.0, 0.0)?;
                }
                let args = [
                    Arg::P(s.ptr),
                    Arg::P(p.ptr),
                    Arg::I(p.dtype.code()),
                    Arg::I(qb as i32),
                    Arg::I(kn as i32),
                    Arg::I(q0 as i32),
                    Arg::F(scale),
                    Arg::I(window.map_or(0, |w| w.min(i32::MAX as usize) as i32)),
                    Arg::F(softcap.unwrap_or(0.0)),
                ];
                self.launch("causal_softmax", (qb as u32, heads as u32, 1), BLOCK, &args)?;
                for j in 0..group {
                    // O (qb × hd) = P V per head: column-major Oᵀ = Vᵀ Pᵀ, written into ctx's head columns.
                    let vop = Operand {
                        v: v.slice(start * hd, v.len - start * hd)?,
                        trans: false,
                        ld: hd,
                        stride: rows * hd,
                    };
                    let p_at = j * qb * kn;
                    let pop =
                        Operand { v: p.slice(p_at, p.len - p_at)?, trans: false, ld: kn, stride: group * qb * kn };
                    let o_at = (start + q0) * d + j * hd;
                    let o = Operand { v: ctx.slice(o_at, ctx.len - o_at)?, trans: false, ld: d, stride: group * hd };
                    self.gemm((hd, qb, kn), vop, pop, o, kv_heads, 1.0, 0.0)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn flash_attention(
        &self,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, group, hd): (usize, usize, usize, usize),
        scale: f32,
        transposed_v: bool,
    ) -> Result<()> {
        if spans.is_empty() {
            return Ok(());
        }
        if rows > i32::MAX as usize || heads > 65_535 {
            return Err(KernelError::Unsupported {
                what: "fused attention",
                message: format!("{rows} rows and {heads} heads; at most 2³¹ − 1 rows and 65,535 heads"),
            });
        }
        let name = match (transposed_v, hd, q.dtype) {
            (false, 64, DType::F16) => "flash_hd64_f16",
            (false, 64, _) => "flash_hd64_bf16",
            (false, 128, DType::F16) => "flash_hd128_f16",
            (false, _, _) => "flash_hd128_bf16",
            (true, 64, DType::F16) => "flash_tv_hd64_f16",
            (true, 64, _) => "flash_tv_hd64_bf16",
            (true, 128, DType::F16) => "flash_tv_hd128_f16",
            (true, _, _) => "flash_tv_hd128_bf16",
        };
        // Grid (query blocks of 64, heads, sequences).
        self.launch_flash(name, 128, (q, k, v), ctx, spans, (rows, heads, group, scale), |longest, seqs| {
            (longest.div_ceil(64) as u32, heads as u32, seqs as u32)
        })
    }

    /// Launches a flash-attention kernel (`name`, `threads` per block) on `spans` in groups of at most
    /// 65,535 sequences (a grid dimension's limit), each group's starts and lengths uploaded;
    /// `grid(longest, sequences)` gives a group's grid. `group` query heads share a key/value head;
    /// scores are multiplied by `scale` (in log2 units: the kernels' exponentials are ex2).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_flash(
        &self,
        name: &'static str,
        threads: u32,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, group, scale): (usize, usize, usize, f32),
        grid: impl Fn(usize, usize) -> (u32, u32, u32),
    ) -> Result<()> {
        for batch in spans.chunks(65_535) {
            let starts: Vec<u32> = batch.iter().map(|s| s.0 as u32).collect();
            let lens: Vec<u32> = batch.iter().map(|s| s.1 as u32).collect();
            let (sb, lb) = (self.upload_u32(&starts)?, self.upload_u32(&lens)?);
            let longest = batch.iter().map(|s| s.1).max().unwrap_or(0);
            let args = [
                Arg::P(q.ptr),
                Arg::P(k.ptr),
                Arg::P(v.ptr),
                Arg::P(ctx.ptr),
                Arg::P(sb.view().ptr),
                Arg::P(lb.view().ptr),
                Arg::I(rows as i32),
                Arg::I(heads as i32),
                Arg::I(group as i32),
                Arg::F(scale),
            ];
            self.launch(name, grid(longest, batch.len()), threads, &args)?;
        }
        Ok(())
    }

    /// [`Attention::Pipelined`], after [`Gpu::attention_with`]'s checks; its own: q, k and v start on
    /// 16-byte boundaries (`cp.async`), and the grid's limits.
    pub(super) fn flash_attention_pipelined(
        &self,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, group, hd): (usize, usize, usize, usize),
        scale: f32,
    ) -> Result<()> {
        if spans.is_empty() {
            return Ok(());
        }
        // Queries per block: 8 warps of 16 at heads of 64, 4 at 128 (kernels.cu).
        let block_queries = if hd == 64 { 128 } else { 64 };
        let longest = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let blocks = longest.div_ceil(block_queries);
        if rows > i32::MAX as usize || heads > i32::MAX as usize || blocks > 65_535 {
            return Err(KernelError::Unsupported {
                what: "pipelined attention",
                message: format!(
                    "{rows} rows, {heads} heads, sequences of {longest}; at most 2³¹ − 1 rows and heads and \
                     sequences of {} tokens",
                    65_535 * block_queries
                ),
            });
        }
        if let Some((what, _)) = [("q", q), ("k", k), ("v", v)].into_iter().find(|(_, o)| !o.ptr.is_multiple_of(16)) {
            return Err(KernelError::Unsupported {
                what: "pipelined attention",
                message: format!("{what} must start on a 16-byte boundary (cp.async)"),
            });
        }
        let name = match (hd, q.dtype) {
            (64, DType::F16) => "flash2_hd64_f16",
            (64, _) => "flash2_hd64_bf16",
            (_, DType::F16) => "flash2_hd128_f16",
            (_, _) => "flash2_hd128_bf16",
        };
        let threads = if hd == 64 { 256 } else { 128 };
        // Grid (heads, sequences, query blocks): the kernel walks grid.z last-first.
        self.launch_flash(name, threads, (q, k, v), ctx, spans, (rows, heads, group, scale), |longest, seqs| {
            (heads as u32, seqs as u32, longest.div_ceil(block_queries) as u32)
        })
    }
}
