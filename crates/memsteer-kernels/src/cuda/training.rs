//! Primitives of training steps on the device: a device copy, the softmax cross-entropy's pieces on a
//! chunk of logits (log-sum-exp with the target's log-probability, and the gradient in place), and
//! per-row scaling by one column of a strengths matrix. LM-Steer's device step
//! (`memsteer_steer::cuda::SteerTrainer`) is built from these and [`Gpu::matmul`].

use super::*;

impl Gpu {
    /// `dst[..n] = src[..n]` on the device (same element type, this device, no overlap).
    pub fn copy(&self, src: View<'_>, dst: View<'_>, n: usize) -> Result<()> {
        src.need("copy source", n)?;
        dst.need("copy destination", n)?;
        check_operands(self.ordinal, "copy", &[("source", src)], &[("destination", dst)], false)?;
        if src.dtype != dst.dtype {
            return Err(KernelError::Unsupported {
                what: "copy",
                message: format!("{:?} into {:?}", src.dtype, dst.dtype),
            });
        }
        // SAFETY: both views hold at least n elements of the same type (checked above) on this device.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst.ptr, src.ptr, n * src.dtype.size(), self.stream.cu_stream())
                .map_err(|e| cuda_err("copy on device", e))
        }
    }

    /// For each of `rows` rows of `logits` (`rows × vocab`, f32): `lse[r]` = its log-sum-exp and
    /// `out[r]` = the log-probability of `targets[r]`.
    pub fn lse_targets(
        &self,
        logits: View<'_>,
        vocab: usize,
        targets: View<'_>,
        out: View<'_>,
        lse: View<'_>,
        rows: usize,
    ) -> Result<()> {
        logits.need("logits", rows * vocab)?;
        logits.need_type("logits", &[DType::F32])?;
        targets.need("targets", rows)?;
        targets.need_type("targets", &[DType::U32])?;
        out.need("log-probabilities", rows)?;
        lse.need("log-sum-exp", rows)?;
        out.need_type("log-probabilities", &[DType::F32])?;
        lse.need_type("log-sum-exp", &[DType::F32])?;
        check_operands(
            self.ordinal,
            "log-sum-exp and target log-probabilities",
            &[("logits", logits), ("targets", targets)],
            &[("log-probabilities", out), ("log-sum-exp", lse)],
            false,
        )?;
        let args = [
            Arg::P(logits.ptr),
            Arg::I(DType::F32.code()),
            Arg::L(vocab as i64),
            Arg::P(targets.ptr),
            Arg::P(out.ptr),
            Arg::P(lse.ptr),
        ];
        let kernel = if vocab.is_multiple_of(8) { "lse_target_vec" } else { "lse_target" };
        self.launch(kernel, (rows as u32, 1, 1), 512, &args)
    }

    /// In place, for `rows` rows of f32 `logits`: `(softmax(row) − one_hot(target)) · scale`, the
    /// gradient of `scale ·` the cross-entropy with respect to the logits (`lse` from
    /// [`Gpu::lse_targets`]). With `softcap = Some(c)`, `logits` are soft-capped ones (`c·tanh(z/c)`,
    /// [`Gpu::softcap`]) and the result is the gradient with respect to the uncapped `z`.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_grad(
        &self,
        logits: View<'_>,
        vocab: usize,
        lse: View<'_>,
        targets: View<'_>,
        scale: f32,
        rows: usize,
        softcap: Option<f32>,
    ) -> Result<()> {
        logits.need("logits", rows * vocab)?;
        logits.need_type("logits", &[DType::F32])?;
        lse.need("log-sum-exp", rows)?;
        lse.need_type("log-sum-exp", &[DType::F32])?;
        targets.need("targets", rows)?;
        targets.need_type("targets", &[DType::U32])?;
        check_operands(
            self.ordinal,
            "softmax gradient",
            &[("log-sum-exp", lse), ("targets", targets)],
            &[("logits", logits)],
            false,
        )?;
        let args = [
            Arg::P(logits.ptr),
            Arg::L(vocab as i64),
            Arg::P(lse.ptr),
            Arg::P(targets.ptr),
            Arg::F(scale),
            Arg::L(rows as i64),
            Arg::F(softcap.unwrap_or(0.0)),
        ];
        self.launch("softmax_grad", Gpu::rows_grid(vocab, rows), BLOCK, &args)
    }

    /// `m[t, :] *= factor · strengths[t · steers + i]` for `m` of `rows × cols` (f32).
    pub fn scale_rows(
        &self,
        m: View<'_>,
        (rows, cols): (usize, usize),
        strengths: View<'_>,
        (steers, i): (usize, usize),
        factor: f32,
    ) -> Result<()> {
        if i >= steers {
            return Err(KernelError::Shape {
                what: "strength column",
                expected: format!("below the number of steers {steers}"),
                found: i,
            });
        }
        m.need("scaled rows", rows * cols)?;
        m.need_type("scaled rows", &[DType::F32])?;
        strengths.need("strengths", rows * steers)?;
        strengths.need_type("strengths", &[DType::F32])?;
        check_operands(self.ordinal, "scale rows", &[("strengths", strengths)], &[("scaled rows", m)], false)?;
        let args = [
            Arg::P(m.ptr),
            Arg::I(cols as i32),
            Arg::P(strengths.ptr),
            Arg::I(steers as i32),
            Arg::I(i as i32),
            Arg::F(factor),
            Arg::L(rows as i64),
        ];
        self.launch("scale_rows", Gpu::rows_grid(cols, rows), BLOCK, &args)
    }
}
