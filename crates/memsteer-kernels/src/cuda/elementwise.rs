//! Row-wise and elementwise kernels: type conversion, embeddings, layer norm and RMSNorm (the q/k norms
//! too), bias + activation, gated activations, the residual sum with biases, and the split of the fused
//! QKV projection with rotary positions.

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

    /// `x[r] = (wte[tok[r]] (+ wpe[pos[r]])) · scale`, `d` columns, `f32` output (`scale` is 1 but
    /// for Gemma's embeddings). Token ids and positions must have been checked against the tables'
    /// rows by the caller (they are also checked here against the tables' sizes on the host copies the
    /// caller passes).
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        tok: (&[u32], View<'_>),
        pos: (&[u32], View<'_>),
        wte: View<'_>,
        wpe: Option<View<'_>>,
        x: View<'_>,
        d: usize,
        scale: f32,
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
            Arg::F(scale),
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

    /// `x += a + ba (+ b2 + bb)` over `rows × d` (`x` in `f32`; the branches of one float type; biases,
    /// when given, of length `d` and one type).
    #[allow(clippy::type_complexity)]
    pub fn residual(
        &self,
        x: View<'_>,
        (a, ba): (View<'_>, Option<View<'_>>),
        second: Option<(View<'_>, Option<View<'_>>)>,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let mut inputs = vec![("branch", a)];
        inputs.extend(ba.map(|b| ("branch bias", b)));
        if let Some((b2, bb)) = second {
            inputs.push(("second branch", b2));
            inputs.extend(bb.map(|b| ("second branch bias", b)));
        }
        check_operands(self.ordinal, "residual", &inputs, &[("residual stream", x)], false)?;
        let n = rows * d;
        x.need_type("residual", &[DType::F32])?;
        x.need("residual", n)?;
        a.need("residual branch", n)?;
        if let Some(ba) = ba {
            ba.need("residual bias", d)?;
        }
        let bias_dtype = ba.map(|b| b.dtype);
        if let Some((b2, bb)) = second {
            b2.need("residual branch", n)?;
            if let Some(bb) = bb {
                bb.need("residual bias", d)?;
                if bias_dtype.is_some_and(|t| t != bb.dtype) {
                    return Err(KernelError::Shape {
                        what: "residual bias",
                        expected: format!("{:?}", bias_dtype),
                        found: bb.len,
                    });
                }
            }
            if b2.dtype != a.dtype {
                return Err(KernelError::Shape {
                    what: "residual branch",
                    expected: format!("{:?}", a.dtype),
                    found: b2.len,
                });
            }
        }
        let bias_dtype = bias_dtype.or(second.and_then(|s| s.1).map(|b| b.dtype)).unwrap_or(DType::F32);
        let (p2, pb) = second.map_or((0, 0), |(b2, bb)| (b2.ptr, bb.map_or(0, |b| b.ptr)));
        let args = [
            Arg::P(x.ptr),
            Arg::P(a.ptr),
            Arg::P(ba.map_or(0, |b| b.ptr)),
            Arg::P(p2),
            Arg::P(pb),
            Arg::I(a.dtype.code()),
            Arg::I(bias_dtype.code()),
            Arg::L(rows as i64),
            Arg::I(d as i32),
        ];
        self.launch("residual", Self::rows_grid(d, rows), BLOCK, &args)
    }

    /// RMSNorm of `rows` rows of `d` (`x` of any float type): `out = x·rstd·g` with `rstd =
    /// 1/√(mean(x²) + eps)`, written in `out`'s type (`g` of any float type; Gemma's `1 + w` weights
    /// are offset by the caller).
    pub fn rms_norm(&self, x: View<'_>, g: View<'_>, eps: f32, out: View<'_>, rows: usize, d: usize) -> Result<()> {
        check_operands(self.ordinal, "RMSNorm", &[("input", x), ("weight", g)], &[("output", out)], false)?;
        x.need("RMSNorm input", rows * d)?;
        out.need("RMSNorm output", rows * d)?;
        g.need("RMSNorm weight", d)?;
        if rows == 0 {
            return Ok(());
        }
        let args = [
            Arg::P(x.ptr),
            Arg::I(x.dtype.code()),
            Arg::P(g.ptr),
            Arg::I(g.dtype.code()),
            Arg::P(out.ptr),
            Arg::I(out.dtype.code()),
            Arg::I(d as i32),
            Arg::F(eps),
        ];
        self.launch("rms_norm", (rows as u32, 1, 1), BLOCK, &args)
    }

    /// RMSNorm in place of the queries (`q` groups, weight `gq`) and keys (`k` groups, weight `gk`) in
    /// the fused projection `qkv` (`rows` rows of `row` values), before rotary positions: one head per
    /// group (Qwen 3, Gemma 3) or all heads at once (OLMo 2).
    #[allow(clippy::too_many_arguments)]
    pub fn qk_rms_norm(
        &self,
        qkv: View<'_>,
        (rows, row): (usize, usize),
        (q, k): (NormGroups, NormGroups),
        (gq, gk): (View<'_>, View<'_>),
        eps: f32,
    ) -> Result<()> {
        check_operands(self.ordinal, "q/k RMSNorm", &[("q weight", gq), ("k weight", gk)], &[("qkv", qkv)], false)?;
        qkv.need("q/k RMSNorm input", rows * row)?;
        gq.need("q norm weight", q.width)?;
        gk.need("k norm weight", k.width)?;
        if gq.dtype != gk.dtype {
            return Err(KernelError::Shape {
                what: "k norm weight",
                expected: format!("{:?}", gq.dtype),
                found: gk.len,
            });
        }
        for (what, g) in [("q norm groups", q), ("k norm groups", k)] {
            let end = g.offset + g.count.saturating_sub(1) * g.step + g.width;
            if g.count == 0 || end > row {
                return Err(KernelError::Shape {
                    what,
                    expected: format!("1 or more inside rows of {row}"),
                    found: end,
                });
            }
        }
        if rows == 0 {
            return Ok(());
        }
        let i = |v: usize| Arg::I(v as i32);
        let args = [
            Arg::P(qkv.ptr),
            Arg::I(qkv.dtype.code()),
            Arg::L(row as i64),
            i(q.offset),
            i(q.step),
            i(q.count),
            i(q.width),
            i(k.offset),
            i(k.step),
            i(k.count),
            i(k.width),
            Arg::P(gq.ptr),
            Arg::P(gk.ptr),
            Arg::I(gq.dtype.code()),
            Arg::F(eps),
        ];
        let groups = q.count + k.count;
        if groups > 65_535 || rows > i32::MAX as usize {
            return Err(KernelError::Unsupported {
                what: "q/k RMSNorm",
                message: format!("{rows} rows of {groups} groups; at most 2³¹ − 1 rows and 65,535 groups"),
            });
        }
        self.launch("qk_rms_norm", (rows as u32, groups as u32, 1), 128, &args)
    }

    /// `up = act(gate) · up` over `n` values (gate and up of one float type): `act` 3 is SiLU
    /// (SwiGLU), 2 the tanh GELU (GeGLU).
    pub fn gated_act(&self, gate: View<'_>, up: View<'_>, n: usize, act: i32) -> Result<()> {
        check_operands(self.ordinal, "gated activation", &[("gate", gate)], &[("up", up)], false)?;
        gate.need("gate", n)?;
        up.need("up", n)?;
        if gate.dtype != up.dtype || !matches!(act, 2 | 3) {
            return Err(KernelError::Shape {
                what: "gated activation",
                expected: format!("gate and up of one type ({:?}) and act 2 or 3 (here {act})", up.dtype),
                found: n,
            });
        }
        let args = [Arg::P(gate.ptr), Arg::P(up.ptr), Arg::I(up.dtype.code()), Arg::L(n as i64), Arg::I(act)];
        self.launch("gated_act", Self::grid_for(n), BLOCK, &args)
    }

    /// Splits the fused QKV projection (`rows` rows laid out as `layout` says, any float type) plus
    /// `bias` (when given, one row's length) into head-major `q` (`heads × rows × hd`) and `k`, `v`
    /// (`kv_heads × rows × hd`), their type, rotating the first `rot` dimensions of each q and k head
    /// (rotate-half) with the tables `cos`/`sin` (`positions × rot/2`).
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_split(
        &self,
        qkv: View<'_>,
        bias: Option<View<'_>>,
        pos: (&[u32], View<'_>),
        rotary: Option<(View<'_>, View<'_>, usize)>,
        layout: QkvRow,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        (rows, heads, kv_heads, hd): (usize, usize, usize, usize),
    ) -> Result<()> {
        let mut inputs = vec![("qkv", qkv), ("positions", pos.1)];
        inputs.extend(bias.map(|b| ("qkv bias", b)));
        if let Some((cos, sin, _)) = rotary {
            inputs.extend([("rotary cos", cos), ("rotary sin", sin)]);
        }
        check_operands(self.ordinal, "qkv split", &inputs, &[("q", q), ("k", k), ("v", v)], false)?;
        let QkvRow { row, q: q_off, k: k_off, v: v_off, head } = layout;
        if kv_heads == 0 || kv_heads > heads {
            return Err(KernelError::Shape {
                what: "key/value heads",
                expected: format!("1..={heads}"),
                found: kv_heads,
            });
        }
        for (what, off, n) in [("q heads", q_off, heads), ("k heads", k_off, kv_heads), ("v heads", v_off, kv_heads)] {
            let end = off + (n - 1) * head + hd;
            if end > row {
                return Err(KernelError::Shape { what, expected: format!("inside rows of {row}"), found: end });
            }
        }
        qkv.need("qkv", rows * row)?;
        if let Some(b) = bias {
            b.need("qkv bias", row)?;
        }
        pos.1.need("qkv positions", rows)?;
        for (what, o, n) in [("q", q, heads), ("k", k, kv_heads), ("v", v, kv_heads)] {
            o.need(what, rows * n * hd)?;
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
        let i = |v: usize| Arg::I(v as i32);
        let args = [
            Arg::P(qkv.ptr),
            Arg::I(qkv.dtype.code()),
            Arg::P(bias.map_or(0, |b| b.ptr)),
            Arg::I(bias.map_or(DType::F32, |b| b.dtype).code()),
            Arg::P(pos.1.ptr),
            Arg::P(cos),
            Arg::P(sin),
            i(rot),
            Arg::L(row as i64),
            i(q_off),
            i(k_off),
            i(v_off),
            i(head),
            Arg::P(q.ptr),
            Arg::P(k.ptr),
            Arg::P(v.ptr),
            Arg::I(q.dtype.code()),
            Arg::L(rows as i64),
            i(heads),
            i(kv_heads),
            i(hd),
            Arg::L(rotary.map_or(0, |(c, _, r)| if r == 0 { 0 } else { c.len / (r / 2) }) as i64),
        ];
        self.launch("qkv_split", (rows as u32, 1, 1), BLOCK, &args)
    }
}
