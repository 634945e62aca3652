//! The fused output layer (log-probabilities of targets without a vocabulary-wide buffer) and the
//! steered projection.

use super::*;

impl Gpu {
    /// Fused target log-probabilities on the device: `out[r] = log softmax(hidden[r] · Eᵀ)[targets[r]]`
    /// for `rows` rows of `hidden` (the output weight's element type), in chunks of `chunk` rows so
    /// that logits (`chunk × vocab`, `logits_type`) exist for one chunk at a time. `lse`, when given,
    /// receives each row's log-sum-exp. With `softcap = Some(c)` the logits are soft-capped to
    /// `c·tanh(z/c)` first (Gemma 2).
    #[allow(clippy::too_many_arguments)]
    pub fn log_prob_targets(
        &self,
        hidden: View<'_>,
        e: &Linear<'_>,
        targets: View<'_>,
        out: View<'_>,
        lse: Option<View<'_>>,
        rows: usize,
        (chunk, logits_type): (usize, DType),
        softcap: Option<f32>,
    ) -> Result<()> {
        let mut outputs = vec![("log-probabilities", out)];
        outputs.extend(lse.map(|l| ("log-sum-exp", l)));
        check_operands(
            self.ordinal,
            "log-probabilities",
            &[("hidden", hidden), ("output embedding", e.w), ("targets", targets)],
            &outputs,
            false,
        )?;
        let vocab = e.outputs;
        if !(logits_type == DType::F32 || (logits_type == DType::F16 && e.w.dtype == DType::F16)) {
            return Err(KernelError::Unsupported {
                what: "logits type",
                message: format!("{logits_type:?} with {:?} weights; F32, or F16 with f16 weights", e.w.dtype),
            });
        }
        targets.need("targets", rows)?;
        out.need("log-probs", rows)?;
        out.need_type("log-probs", &[DType::F32])?;
        if let Some(l) = lse {
            l.need("log-sum-exp", rows)?;
        }
        hidden.need("hidden", rows * e.inputs)?;
        let chunk = chunk.clamp(1, rows.max(1));
        // Two logits buffers: while the row kernel reduces chunk i on the side stream, cuBLAS
        // computes chunk i + 1 on the main stream (compute-bound products overlap the
        // memory-bound reductions). Events order each buffer's reuse.
        let bufs = [self.alloc(logits_type, chunk * vocab)?, self.alloc(logits_type, chunk * vocab)?];
        let ev = |e: cudarc::driver::DriverError| cuda_err("event", e);
        // Declared after `bufs`, so dropped first: on every exit, error paths included, the main
        // stream waits for the side stream's reductions before the buffers are freed on it.
        let mut guard = SideWork { stream: &self.stream, done: [None, None] };
        let done = &mut guard.done;
        for (i, r0) in (0..rows).step_by(chunk).enumerate() {
            let n = chunk.min(rows - r0);
            let h = hidden.slice(r0 * e.inputs, n * e.inputs)?;
            let lg = bufs[i % 2].view().slice(0, n * vocab)?;
            if let Some(d) = &done[i % 2] {
                self.stream.wait(d).map_err(ev)?;
            }
            self.matmul((n, e.inputs, vocab), h, false, e.w, !e.inputs_major, lg, 1.0, 0.0)?;
            if let Some(cap) = softcap {
                self.softcap(lg, cap)?;
            }
            let ready = self.stream.record_event(None).map_err(ev)?;
            self.side.wait(&ready).map_err(ev)?;
            let args = [
                Arg::P(lg.ptr),
                Arg::I(lg.dtype.code()),
                Arg::L(vocab as i64),
                Arg::P(targets.slice(r0, n)?.ptr),
                Arg::P(out.slice(r0, n)?.ptr),
                Arg::P(lse.map_or(Ok(0), |l| l.slice(r0, n).map(|v| v.ptr))?),
            ];
            // Rows of a multiple of 8 values start on 16-byte boundaries: the vectorised kernel.
            let kernel = if vocab.is_multiple_of(8) { "lse_target_vec" } else { "lse_target" };
            self.launch_on(&self.side, kernel, (n as u32, 1, 1), 512, &args)?;
            done[i % 2] = Some(self.side.record_event(None).map_err(ev)?);
        }
        for d in guard.done.iter_mut().filter_map(Option::take) {
            self.stream.wait(&d).map_err(ev)?;
        }
        Ok(())
    }

    /// Soft-capping in place on the main stream: every value `z` of `x` (any element type) becomes
    /// `cap·tanh(z/cap)`.
    pub fn softcap(&self, x: View<'_>, cap: f32) -> Result<()> {
        if !(cap.is_finite() && cap > 0.0) {
            return Err(KernelError::Unsupported {
                what: "soft-cap",
                message: "must be a positive finite number".into(),
            });
        }
        x.need_type("soft-capped values", &[DType::F32, DType::F16, DType::Bf16])?;
        check_operands(self.ordinal, "soft-cap", &[], &[("soft-capped values", x)], false)?;
        if x.len == 0 {
            return Ok(());
        }
        let args = [Arg::P(x.ptr), Arg::I(x.dtype.code()), Arg::L(x.len as i64), Arg::F(cap)];
        let blocks = x.len.div_ceil(BLOCK as usize).min(65_535) as u32;
        self.launch("softcap", (blocks, 1, 1), BLOCK, &args)
    }

    /// LM-Steer's projection on the device: `out = h + ε Σ_s v_s (h P1_s) P2_sᵀ` for `rows` rows of
    /// `h` (`f32`, `rows × dim`), `P1`, `P2` of `steers × dim × rank` (`f32`). `tmp` holds at least
    /// `rows × rank` values.
    #[allow(clippy::too_many_arguments)]
    pub fn steered_projection(
        &self,
        h: View<'_>,
        (p1, p2): (View<'_>, View<'_>),
        strengths: &[f32],
        epsilon: f32,
        out: View<'_>,
        tmp: View<'_>,
        (rows, dim, rank): (usize, usize, usize),
    ) -> Result<()> {
        check_operands(
            self.ordinal,
            "steered projection",
            &[("hidden", h), ("p1", p1), ("p2", p2)],
            &[("steered hidden", out), ("steer scratch", tmp)],
            false,
        )?;
        let steers = strengths.len();
        for (what, v) in [("hidden", h), ("p1", p1), ("p2", p2), ("steered hidden", out), ("steer scratch", tmp)] {
            v.need_type(what, &[DType::F32])?;
        }
        h.need("hidden", rows * dim)?;
        out.need("steered hidden", rows * dim)?;
        p1.need("p1", steers * dim * rank)?;
        p2.need("p2", steers * dim * rank)?;
        tmp.need("steer scratch", rows * rank)?;
        // out = h: a copy through cuBLAS-free device memcpy.
        // SAFETY: both extents were checked above.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(out.ptr, h.ptr, rows * dim * 4, self.stream.cu_stream())
                .map_err(|e| cuda_err("copy on device", e))?;
        }
        for (s, &v) in strengths.iter().enumerate() {
            if v == 0.0 {
                continue;
            }
            let (a, b) = (p1.slice(s * dim * rank, dim * rank)?, p2.slice(s * dim * rank, dim * rank)?);
            self.matmul((rows, dim, rank), h, false, a, false, tmp, 1.0, 0.0)?;
            self.matmul((rows, rank, dim), tmp, false, b, true, out, epsilon * v, 1.0)?;
        }
        Ok(())
    }
}
