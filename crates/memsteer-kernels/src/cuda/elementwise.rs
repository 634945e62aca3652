//! Row-wise and elementwise kernels: type conversion, embeddings, layer norm, bias + activation, the
//! residual sum with biases, and the split of the fused QKV projection with rotary positions.

use super::*;

impl Gpu {
    /// `y = x` for `n` values, converted from `x`'s float type to `y`'s (round to nearest even).
    pub fn convert(&self, x: View<'_>, y: View<'_>, n: usize) -> Result<()> {
        check_operands(self.ordinal, "convert", &[("input", x)], &[("output", y)], false)?;
        x.need("convert input", n)?;
        y.need("convert output", n)?;
        if !x.dtype.is_float() || !y.dtype.is_float() {
            return Err(KernelError::Shape { what: "convert", expected: "float types".into(), found: n });
        }
        let args = [Arg::P(x.ptr), Arg::I(x.dtype.code()), Arg::P(y.ptr), Arg::I(y.dtype.code()), Arg::L(n as i64)];
        self.launch("convert", Self::grid_for(n), BLOCK, &args)
    }

    /// `x[r] = wte[tok[r]] (+ wpe[pos[r]])`, `d` columns, `f32` output. Token ids and positions must
    /// have been checked against the tables' rows by the caller (they are also checked here against
    /// the tables' sizes on the host copies the caller passes).
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        tok: (&[u32], View<'_>),
        pos: (&[u32], View<'_>),
        wte: View<'_>,
        wpe: Option<View<'_>>,
        x: View<'_>,
        d: usize,
    ) -> Result<()> {
        let mut inputs = vec![("token ids", tok.1), ("positions", pos.1), ("token embedding", wte)];
        inputs.extend(wpe.map(|p| ("position embedding", p)));
        check_operands(self.ordinal, "embed", &inputs, &[("output", x)], false)?;
        let rows = tok.0.len();
        if d == 0 {
            return Err(KernelError::Shape { what: "embed width", expected: "at least 1".into(), found: 0 });
        }
        if pos.0.len() != rows {
            return Err(KernelError::Shape {
                what: "embed positions",
                expected: format!("{rows}"),
                found: pos.0.len(),
            });
        }
        if let Some((position, &id)) = tok.0.iter().enumerate().find(|(_, t)| (**t as usize + 1) * d > wte.len) {
            return Err(KernelError::Target { position, id, vocab: wte.len / d });
        }
        if let Some(p) = wpe {
            if let Some(&bad) = pos.0.iter().find(|q| (**q as usize + 1) * d > p.len) {
                return Err(KernelError::Shape {
                    what: "position",
                    expected: format!("below {}", p.len / d),
                    found: bad as usize,
                });
            }
            if p.dtype != wte.dtype {
                return Err(KernelError::Shape {
                    what: "position table",
                    expected: format!("{:?}", wte.dtype),
                    found: p.len,
                });
            }
        }
        tok.1.need("embed tokens", rows)?;
        pos.1.need("embed positions", rows)?;
        x.need("embed output", rows * d)?;
        x.need_type("embed output", &[DType::F32])?;
        // The kernel bounds ids and positions by the tables too (NaN outside), in case the device
        // copies differ from the host slices checked above.
        let args = [
            Arg::P(tok.1.ptr),
            Arg::P(pos.1.ptr),
            Arg::P(wte.ptr),
            Arg::P(wpe.map_or(0, |p| p.ptr)),
            Arg::I(wte.dtype.code()),
            Arg::P(x.ptr),
            Arg::I(d as i32),
            Arg::L((wte.len / d) as i64),
            Arg::L(wpe.map_or(0, |p| p.len / d) as i64),
        ];
        self.launch("embed", (rows as u32, 1, 1), BLOCK, &args)
    }

    /// Layer norm of `rows` rows of `d` (`x` in `f32`), written in `out`'s type.
    pub fn layer_norm(
        &self,
        x: View<'_>,
        (g, b): (View<'_>, View<'_>),
        eps: f32,
        out: View<'_>,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        check_operands(
            self.ordinal,
            "layer norm",
            &[("input", x), ("weight", g), ("bias", b)],
            &[("output", out)],
            false,
        )?;
        x.need_type("layer norm input", &[DType::F32])?;
        x.need("layer norm input", rows * d)?;
        out.need("layer norm output", rows * d)?;
        g.need("layer norm weight", d)?;
        b.need("layer norm bias", d)?;
        if g.dtype != b.dtype {
            return Err(KernelError::Shape {
                what: "layer norm bias",
                expected: format!("{:?}", g.dtype),
                found: b.len,
            });
        }
        let aligned = x.ptr.is_multiple_of(16) && out.ptr.is_multiple_of(16) && d.is_multiple_of(4);
        if self.vectorised.load(Ordering::Relaxed) && aligned && rows.div_ceil(8) <= i32::MAX as usize {
            let args = [
                Arg::P(x.ptr),
                Arg::P(g.ptr),
                Arg::P(b.ptr),
                Arg::I(g.dtype.code()),
                Arg::P(out.ptr),
                Arg::I(out.dtype.code()),
                Arg::L(rows as i64),
                Arg::I(d as i32),
                Arg::F(eps),
            ];
            // 8 warps per block, one row each.
            return self.launch("layer_norm_warp", (rows.div_ceil(8) as u32, 1, 1), 256, &args);
        }
        let args = [
            Arg::P(x.ptr),
            Arg::P(g.ptr),
            Arg::P(b.ptr),
            Arg::I(g.dtype.code()),
            Arg::P(out.ptr),
            Arg::I(out.dtype.code()),
            Arg::I(d as i32),
            Arg::F(eps),
        ];
        self.launch("layer_norm", (rows as u32, 1, 1), BLOCK, &args)
    }

    pub(super) fn rows_grid(cols: usize, rows: usize) -> (u32, u32, u32) {
        (cols.div_ceil(BLOCK as usize).max(1) as u32, rows.clamp(1, 32_768) as u32, 1)
    }

    /// `out = act(y + b)` (`act`: 0 none, 1 exact GELU, 2 tanh GELU) over `rows × cols`, `y` of any
    /// float type, in `out`'s type (`out` may be `y`).
    pub fn bias_act(
        &self,
        y: View<'_>,
        b: View<'_>,
        out: View<'_>,
        (rows, cols): (usize, usize),
        act: i32,
    ) -> Result<()> {
        check_operands(self.ordinal, "bias + activation", &[("input", y), ("bias", b)], &[("output", out)], true)?;
        y.need("bias input", rows * cols)?;
        out.need("bias output", rows * cols)?;
        b.need("bias", cols)?;
        let half = matches!(y.dtype, DType::F16 | DType::Bf16) && out.dtype == y.dtype;
        let aligned = y.ptr.is_multiple_of(16) && out.ptr.is_multiple_of(16) && cols.is_multiple_of(8);
        if self.vectorised.load(Ordering::Relaxed) && half && aligned {
            let args = [
                Arg::P(y.ptr),
                Arg::P(b.ptr),
                Arg::I(b.dtype.code()),
                Arg::P(out.ptr),
                Arg::I(y.dtype.code()),
                Arg::L(rows as i64),
                Arg::I(cols as i32),
                Arg::I(act),
            ];
            // 128 threads of 8 columns per block; each thread walks about 8 rows.
            let grid = ((cols / 8).div_ceil(128).max(1) as u32, rows.div_ceil(8).clamp(1, 32_768) as u32, 1);
            return self.launch("bias_act_vec", grid, 128, &args);
        }
        let args = [
            Arg::P(y.ptr),
            Arg::I(y.dtype.code()),
            Arg::P(b.ptr),
            Arg::I(b.dtype.code()),
            Arg::P(out.ptr),
            Arg::I(out.dtype.code()),
            Arg::L(rows as i64),
            Arg::I(cols as i32),
            Arg::I(act),
        ];
        self.launch("bias_act", Self::rows_grid(cols, rows), BLOCK, &args)
    }

    /// `x += a + ba (+ b2 + bb)` over `rows × d` (`x` in `f32`; the branches of one float type; biases
    /// of length `d`, one type).
    pub fn residual(
        &self,
        x: View<'_>,
        (a, ba): (View<'_>, View<'_>),
        second: Option<(View<'_>, View<'_>)>,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let mut inputs = vec![("branch", a), ("branch bias", ba)];
        if let Some((b2, bb)) = second {
            inputs.extend([("second branch", b2), ("second branch bias", bb)]);
        }
        check_operands(self.ordinal, "residual", &inputs, &[("residual stream", x)], false)?;
        let n = rows * d;
        x.need_type("residual", &[DType::F32])?;
        x.need("residual", n)?;
        a.need("residual branch", n)?;
        ba.need("residual bias", d)?;
        if let Some((b2, bb)) = second {
            b2.need("residual branch", n)?;
            bb.need("residual bias", d)?;
            if bb.dtype != ba.dtype || b2.dtype != a.dtype {
                return Err(KernelError::Shape {
                    what: "residual branch",
                    expected: format!("{:?}", a.dtype),
                    found: b2.len,
                });
            }
        }
        let (p2, pb) = second.map_or((0, 0), |(b2, bb)| (b2.ptr, bb.ptr));
        let args = [
            Arg::P(x.ptr),
            Arg::P(a.ptr),
            Arg::P(ba.ptr),
            Arg::P(p2),
            Arg::P(pb),
            Arg::I(a.dtype.code()),
            Arg::I(ba.dtype.code()),
            Arg::L(rows as i64),
            Arg::I(d as i32),
        ];
        self.launch("residual", Self::rows_grid(d, rows), BLOCK, &args)
    }

    /// Splits the fused QKV projection (`rows × 3d`, any float type) plus `bias` into head-major `q`, `k`, `v`
    /// (`heads × rows × hd` each, their type), rotating the first `rot` dimensions of each q and k
    /// head with the tables `cos`/`sin` (`positions × rot/2`). `neox`: per-head `[q k v]` rows;
    /// otherwise GPT-2's `[q | k | v]`.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_split(
        &self,
        qkv: View<'_>,
        bias: View<'_>,
        pos: (&[u32], View<'_>),
        rotary: Option<(View<'_>, View<'_>, usize)>,
        neox: bool,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        (rows, heads, hd): (usize, usize, usize),
    ) -> Result<()> {
        let mut inputs = vec![("qkv", qkv), ("qkv bias", bias), ("positions", pos.1)];
        if let Some((cos, sin, _)) = rotary {
            inputs.extend([("rotary cos", cos), ("rotary sin", sin)]);
        }
        check_operands(self.ordinal, "qkv split", &inputs, &[("q", q), ("k", k), ("v", v)], false)?;
        let d = heads * hd;
        qkv.need("qkv", rows * 3 * d)?;
        bias.need("qkv bias", 3 * d)?;
        pos.1.need("qkv positions", rows)?;
        for (what, o) in [("q", q), ("k", k), ("v", v)] {
            o.need(what, rows * d)?;
            if o.dtype != q.dtype {
                return Err(KernelError::Shape { what, expected: format!("{:?}", q.dtype), found: o.len });
            }
        }
        let (cos, sin, rot) = rotary.map_or((0, 0, 0), |(c, s, r)| (c.ptr, s.ptr, r));
        if let Some((c, s, r)) = rotary {
            if r > hd || r % 2 == 1 {
                return Err(KernelError::Shape {
                    what: "rotary dimensions",
                    expected: format!("even, at most {hd}"),
                    found: r,
                });
            }
            let max = pos.0.iter().copied().max().unwrap_or(0) as usize;
            c.need("rotary cos", (max + 1) * r / 2)?;
            s.need("rotary sin", (max + 1) * r / 2)?;
        }
        let args = [
            Arg::P(qkv.ptr),
            Arg::I(qkv.dtype.code()),
            Arg::P(bias.ptr),
            Arg::I(bias.dtype.code()),
            Arg::P(pos.1.ptr),
            Arg::P(cos),
            Arg::P(sin),
            Arg::I(rot as i32),
            Arg::I(neox as i32),
            Arg::P(q.ptr),
            Arg::P(k.ptr),
            Arg::P(v.ptr),
            Arg::I(q.dtype.code()),
            Arg::L(rows as i64),
            Arg::I(heads as i32),
            Arg::I(hd as i32),
            Arg::L(rotary.map_or(0, |(c, _, r)| if r == 0 { 0 } else { c.len / (r / 2) }) as i64),
        ];
        self.launch("qkv_split", (rows as u32, 1, 1), BLOCK, &args)
    }
}
