//! Decoding with key/value caches on the device: each sequence of a batch owns one cache buffer, the
//! new rows' keys and values are stored at their positions ([`Gpu::cache_store`]) and each row's
//! queries attend to its own sequence's cache ([`Gpu::cached_attention`]), so rows at different
//! positions of different sequences share one launch.

use super::*;

/// The caches of one decoding batch, checked once for every launch of the step: one buffer per
/// sequence (laid out `layers × 2 × kv_heads × capacity × hd`, keys then values) and, per row of the
/// batch, its sequence and position. Built by [`Gpu::cache_table`]; it borrows the buffers, so it cannot
/// outlive them.
#[derive(Debug)]
pub struct CacheTable<'a> {
    addresses: DevBuf,
    capacities: DevBuf,
    seq: DevBuf,
    pos: DevBuf,
    rows: usize,
    dtype: DType,
    /// The device whose buffers it points to.
    device: usize,
    /// Layers, key/value heads, dimensions per head.
    shape: (usize, usize, usize),
    _caches: PhantomData<&'a DevBuf>,
}

impl CacheTable<'_> {
    /// Rows of the batch.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// The caches' element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl CacheTable<'_> {
    /// Each operand holds at least `len` elements of the caches' type.
    fn check_operands(&self, operands: [(&'static str, View<'_>); 2], len: usize) -> Result<()> {
        for (what, o) in operands {
            o.need(what, len)?;
            if o.dtype != self.dtype {
                return Err(KernelError::Shape {
                    what,
                    expected: format!("{:?} (the caches' type)", self.dtype),
                    found: o.len,
                });
            }
        }
        Ok(())
    }
}

/// Elements of one sequence's cache of `capacity` positions.
pub fn cache_len((layers, kv_heads, hd): (usize, usize, usize), capacity: usize) -> Option<usize> {
    layers.checked_mul(2)?.checked_mul(kv_heads)?.checked_mul(capacity)?.checked_mul(hd)
}

impl Gpu {
    /// Checks a decoding batch's caches and uploads their table: `caches[s]` is sequence `s`'s buffer
    /// and its capacity in positions, `rows[r] = (s, p)` says that row `r` belongs to sequence `s` at
    /// position `p` (below the capacity). Every buffer must hold [`cache_len`] elements of one float type
    /// on this device, no two buffers may overlap and no two rows may share a sequence and position
    /// (their blocks would write the same slot).
    pub fn cache_table<'a>(
        &self,
        caches: &[(View<'a>, usize)],
        rows: &[(usize, usize)],
        shape: (usize, usize, usize),
    ) -> Result<CacheTable<'a>> {
        let (layers, kv_heads, hd) = shape;
        if layers == 0 || kv_heads == 0 || hd == 0 || hd > 256 {
            return Err(KernelError::Unsupported {
                what: "KV cache",
                message: format!(
                    "{layers} layers, {kv_heads} key/value heads of {hd}: needs at least one of each, heads of at most 256"
                ),
            });
        }
        let Some(&(first, _)) = caches.first() else {
            return Err(KernelError::Shape { what: "KV caches", expected: "at least one".into(), found: 0 });
        };
        if caches.len() > u32::MAX as usize {
            return Err(KernelError::Overflow { what: "KV caches", rows: caches.len(), cols: 1 });
        }
        let dtype = first.dtype;
        first.need_type("KV cache", &[DType::F32, DType::F16, DType::Bf16])?;
        let mut addresses = Vec::with_capacity(caches.len() * 2);
        let mut capacities = Vec::with_capacity(caches.len());
        for &(v, capacity) in caches {
            let need = cache_len(shape, capacity).ok_or(KernelError::Overflow {
                what: "KV cache",
                rows: capacity,
                cols: hd,
            })?;
            v.need("KV cache", need)?;
            if v.dtype != dtype {
                return Err(KernelError::Shape {
                    what: "KV cache",
                    expected: format!("{dtype:?} like the first"),
                    found: v.len,
                });
            }
            if capacity == 0 || capacity > u32::MAX as usize {
                return Err(KernelError::Shape {
                    what: "KV cache capacity",
                    expected: format!("1..={}", u32::MAX),
                    found: capacity,
                });
            }
            addresses.extend([v.ptr as u32, (v.ptr >> 32) as u32]);
            capacities.push(capacity as u32);
        }
        // On this device, and no two overlapping.
        let outputs: Vec<(&'static str, View<'_>)> = caches.iter().map(|&(v, _)| ("KV cache", v)).collect();
        check_operands(self.ordinal, "KV cache table", &[], &outputs, false)?;
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        if let Some(&(s, p)) = rows.iter().find(|&&row| !seen.insert(row)) {
            return Err(KernelError::Shape {
                what: "KV cache rows",
                expected: format!("one row per sequence and position; sequence {s} has position {p} twice"),
                found: rows.len(),
            });
        }
        let (mut seq, mut pos) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
        for (r, &(s, p)) in rows.iter().enumerate() {
            let Some(&(_, capacity)) = caches.get(s) else {
                return Err(KernelError::Shape {
                    what: "KV cache row's sequence",
                    expected: format!("below {}", caches.len()),
                    found: s,
                });
            };
            if p >= capacity {
                return Err(KernelError::Shape {
                    what: "KV cache position",
                    expected: format!("row {r}: below sequence {s}'s capacity of {capacity}"),
                    found: p,
                });
            }
            seq.push(s as u32);
            pos.push(p as u32);
        }
        if rows.len() > i32::MAX as usize {
            return Err(KernelError::Overflow { what: "KV cache rows", rows: rows.len(), cols: 1 });
        }
        Ok(CacheTable {
            addresses: self.upload_u32(&addresses)?,
            capacities: self.upload_u32(&capacities)?,
            seq: self.upload_u32(&seq)?,
            pos: self.upload_u32(&pos)?,
            rows: rows.len(),
            dtype,
            device: self.ordinal,
            shape,
            _caches: PhantomData,
        })
    }

    /// The table was built on this device and has `layer`.
    fn check_layer(&self, table: &CacheTable<'_>, layer: usize) -> Result<()> {
        if table.device != self.ordinal {
            return Err(KernelError::Shape {
                what: "KV cache table",
                expected: format!("one built on device {}", self.ordinal),
                found: table.device,
            });
        }
        if layer >= table.shape.0 {
            return Err(KernelError::Shape {
                what: "KV cache layer",
                expected: format!("below {}", table.shape.0),
                found: layer,
            });
        }
        Ok(())
    }

    /// Stores layer `layer`'s keys and values of the table's rows (`k`, `v` head-major, `kv_heads ×
    /// rows × hd`, the caches' type) at the rows' positions.
    pub fn cache_store(&self, table: &CacheTable<'_>, layer: usize, (k, v): (View<'_>, View<'_>)) -> Result<()> {
        self.check_layer(table, layer)?;
        let (_, kv_heads, hd) = table.shape;
        let rows = table.rows;
        check_operands(self.ordinal, "KV cache store", &[("keys", k), ("values", v)], &[], false)?;
        table.check_operands([("keys", k), ("values", v)], kv_heads * rows * hd)?;
        let args = [
            Arg::P(k.ptr),
            Arg::P(v.ptr),
            Arg::P(table.addresses.ptr),
            Arg::P(table.capacities.ptr),
            Arg::P(table.seq.ptr),
            Arg::P(table.pos.ptr),
            Arg::I(table.dtype.code()),
            Arg::L(rows as i64),
            Arg::I(kv_heads as i32),
            Arg::I(hd as i32),
            Arg::I(layer as i32),
        ];
        self.launch("cache_store", (rows as u32, kv_heads as u32, 1), 128, &args)
    }

    /// Attention of the table's rows over their sequences' cached keys and values of layer `layer`
    /// (stored by [`Gpu::cache_store`] for this step's rows first): `q` head-major (`heads × rows ×
    /// hd`), `ctx` row-major (`rows × heads·hd`), both the caches' type. `shape`'s `rows`, `kv_heads`
    /// and `hd` must be the table's; its window, scale and soft-cap apply as in
    /// [`Gpu::attention_shaped`].
    pub fn cached_attention(
        &self,
        table: &CacheTable<'_>,
        layer: usize,
        q: View<'_>,
        ctx: View<'_>,
        shape: AttentionShape,
    ) -> Result<()> {
        self.check_layer(table, layer)?;
        let AttentionShape { rows, heads, kv_heads, hd, window, scale, softcap } = shape;
        if (rows, kv_heads, hd) != (table.rows, table.shape.1, table.shape.2) {
            return Err(KernelError::Shape {
                what: "cached attention",
                expected: format!(
                    "{} rows, {} key/value heads of {} (the table's)",
                    table.rows, table.shape.1, table.shape.2
                ),
                found: rows,
            });
        }
        shape.check_options()?;
        if heads > 65_535 {
            return Err(KernelError::Shape { what: "query heads", expected: "at most 65,535".into(), found: heads });
        }
        check_operands(self.ordinal, "cached attention", &[("q", q)], &[("context", ctx)], false)?;
        table.check_operands([("q", q), ("attention output", ctx)], rows * heads * hd)?;
        let scale = scale.unwrap_or(1.0 / (hd as f32).sqrt());
        let args = [
            Arg::P(q.ptr),
            Arg::P(table.addresses.ptr),
            Arg::P(table.capacities.ptr),
            Arg::P(table.seq.ptr),
            Arg::P(table.pos.ptr),
            Arg::P(ctx.ptr),
            Arg::I(table.dtype.code()),
            Arg::L(rows as i64),
            Arg::I(heads as i32),
            Arg::I(kv_heads as i32),
            Arg::I(hd as i32),
            Arg::I(layer as i32),
            Arg::F(scale),
            Arg::I(window.map_or(0, |w| w.min(i32::MAX as usize) as i32)),
            Arg::F(softcap.unwrap_or(0.0)),
        ];
        self.launch("cached_attention", (rows as u32, heads as u32, 1), 128, &args)
    }
}
