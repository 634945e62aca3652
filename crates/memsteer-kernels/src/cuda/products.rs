//! Matrix products on the device through cuBLAS: the strided batched GEMM every product goes through,
//! and the linear layer in either weight layout.

use super::*;

impl Gpu {
    /// Column-major `C = α op(A) op(B) + β C` for `batch` matrices (cuBLAS `GemmStridedBatchedEx`,
    /// `f32` accumulation). Shapes are checked here against the views.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand<'_>,
        b: Operand<'_>,
        c: Operand<'_>,
        batch: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        // Extent of a column-major operand: the last element of the last batch.
        let extent = |o: &Operand<'_>, rows: usize, cols: usize| -> Option<usize> {
            let (r, c) = if o.trans { (cols, rows) } else { (rows, cols) };
            if o.ld < r.max(1) {
                return None;
            }
            (batch - 1).checked_mul(o.stride)?.checked_add((c.max(1) - 1).checked_mul(o.ld)?)?.checked_add(r)
        };
        for (what, o, rows, cols) in [("gemm A", &a, m, k), ("gemm B", &b, k, n), ("gemm C", &c, m, n)] {
            let need = extent(o, rows, cols).ok_or(KernelError::Overflow { what, rows, cols })?;
            o.v.need(what, need)?;
            if !o.v.dtype.is_float() {
                return Err(KernelError::Shape { what, expected: "a float type".into(), found: o.v.len });
            }
        }
        let int = |x: usize, what: &'static str| -> Result<i32> {
            i32::try_from(x).map_err(|_| KernelError::Overflow { what, rows: x, cols: 1 })
        };
        let op = |t: bool| {
            if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N }
        };
        let blas_h = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: extents checked above; α and β are host scalars (the handle's default pointer mode).
        unsafe {
            blas::gemm_strided_batched_ex(
                *blas_h.handle(),
                op(a.trans),
                op(b.trans),
                int(m, "gemm m")?,
                int(n, "gemm n")?,
                int(k, "gemm k")?,
                (&alpha) as *const f32 as *const _,
                a.v.ptr as *const _,
                a.v.dtype.blas(),
                int(a.ld, "gemm lda")?,
                a.stride as i64,
                b.v.ptr as *const _,
                b.v.dtype.blas(),
                int(b.ld, "gemm ldb")?,
                b.stride as i64,
                (&beta) as *const f32 as *const _,
                c.v.ptr as *mut _,
                c.v.dtype.blas(),
                int(c.ld, "gemm ldc")?,
                c.stride as i64,
                int(batch, "gemm batch")?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cuBLAS gemm", e))
    }

    /// Row-major `C (m × n) = α A (m × k) · B (k × n) + β C`, where `a_t` / `b_t` say that `A` is
    /// stored `k × m` / `B` stored `n × k` (each row-major) instead.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        (m, k, n): (usize, usize, usize),
        a: View<'_>,
        a_t: bool,
        b: View<'_>,
        b_t: bool,
        c: View<'_>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        check_operands(self.ordinal, "matmul", &[("A", a), ("B", b)], &[("C", c)], false)?;
        // Row-major C = A B is column-major Cᵀ = Bᵀ Aᵀ.
        let bo = Operand { v: b, trans: b_t, ld: if b_t { k } else { n }, stride: 0 };
        let ao = Operand { v: a, trans: a_t, ld: if a_t { m } else { k }, stride: 0 };
        self.gemm((n, m, k), bo, ao, Operand { v: c, trans: false, ld: n, stride: 0 }, 1, alpha, beta)
    }

    /// `y (rows × outputs) = x (rows × inputs) · Wᵀ`; `x` must have the weight's element type, `y` is
    /// `f32` or the weight's type (accumulation is `f32` either way).
    pub fn linear(&self, x: View<'_>, w: &Linear<'_>, y: View<'_>, rows: usize) -> Result<()> {
        if x.dtype != w.w.dtype {
            return Err(KernelError::Shape {
                what: "linear input",
                expected: format!("element type {:?} (the weight's)", w.w.dtype),
                found: x.len,
            });
        }
        y.need_type("linear output", &[DType::F32, w.w.dtype])?;
        self.matmul((rows, w.inputs, w.outputs), x, false, w.w, !w.inputs_major, y, 1.0, 0.0)
    }
}
