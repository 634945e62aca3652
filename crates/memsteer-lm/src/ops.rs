//! Operations shared by the architectures, on packed batches: the rows of several sequences are laid
//! end to end, so every linear layer is one large matrix product split across threads by the
//! kernels, and attention runs one task per (sequence, head).

use memsteer_kernels::{Device, MatMut, MatRef, matmul_strided, vmath};
use rayon::prelude::*;

use crate::arch::ScoreMap;
use crate::config::Activation;
use crate::{LmError, Result};

/// Rows per parallel task of the row-wise operations.
const ROW_BLOCK: usize = 32;
/// Query rows per attention tile (bounds the score buffer at `QUERY_BLOCK × keys`).
const QUERY_BLOCK: usize = 64;

/// Where the sequences of a packed batch sit.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Sequence `s` holds rows `starts[s]..starts[s + 1]`.
    pub starts: Vec<usize>,
    /// Positions already in each sequence's cache (0 without one).
    pub pasts: Vec<usize>,
    /// The position of every row.
    pub positions: Vec<usize>,
}

impl Layout {
    /// Rows of the packed batch.
    pub fn rows(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }
}

/// Checks every sequence (non-empty, ids inside the vocabulary, inside the context after the
/// positions its cache holds) before anything is allocated from them, and lays them out. `pasts` is
/// empty (no caches) or holds each sequence's cached positions.
pub(crate) fn layout(m: &impl crate::Decoder, seqs: &[&[u32]], pasts: &[usize]) -> Result<Layout> {
    layout_for((m.vocab(), m.context()), seqs, pasts)
}

/// [`layout`] for a model of `vocab` tokens and `context` positions.
pub(crate) fn layout_for((vocab, context): (usize, usize), seqs: &[&[u32]], pasts: &[usize]) -> Result<Layout> {
    let name = |i: usize, message: String| {
        if seqs.len() == 1 { LmError::Input(message) } else { LmError::Sequence { index: i, message } }
    };
    if !pasts.is_empty() && pasts.len() != seqs.len() {
        return Err(LmError::Input(format!("{} KV caches for {} sequences", pasts.len(), seqs.len())));
    }
    let mut starts = Vec::with_capacity(seqs.len() + 1);
    starts.push(0usize);
    for (i, s) in seqs.iter().enumerate() {
        let past = pasts.get(i).copied().unwrap_or(0);
        if s.is_empty() {
            return Err(name(i, "empty sequence".into()));
        }
        if past == 0 && s.len() > context {
            return Err(name(i, format!("sequence of {} tokens is longer than the context of {}", s.len(), context)));
        }
        if past + s.len() > context {
            return Err(name(i, format!("{past} cached + {} new tokens exceed the context of {}", s.len(), context)));
        }
        if let Some((p, t)) = s.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return Err(name(i, format!("token id {t} at position {p} is outside the vocabulary of {}", vocab)));
        }
        starts.push(starts[i] + s.len());
    }
    let pasts: Vec<usize> = if pasts.is_empty() { vec![0; seqs.len()] } else { pasts.to_vec() };
    let positions = seqs.iter().zip(&pasts).flat_map(|(s, &past)| past..past + s.len()).collect();
    Ok(Layout { starts, pasts, positions })
}

/// `out = layer_norm(x)` row by row (`g`, `b` of length `d`).
pub(crate) fn layer_norm(x: &[f32], (g, b): (&[f32], &[f32]), eps: f32, out: &mut [f32]) {
    let rows = x.len() / g.len();
    let (mut mean, mut rstd) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    layer_norm_stats(x, (g, b), eps, out, &mut mean, &mut rstd);
}

/// Layer norm of every row: `out = (x − mean)·rstd·g + b`, also writing each row's `mean` and `rstd`
/// (which the trainer's backward reads).
pub(crate) fn layer_norm_stats(
    x: &[f32],
    (g, b): (&[f32], &[f32]),
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let d = g.len();
    out.par_chunks_mut(ROW_BLOCK * d)
        .zip(x.par_chunks(ROW_BLOCK * d))
        .zip(mean.par_chunks_mut(ROW_BLOCK).zip(rstd.par_chunks_mut(ROW_BLOCK)))
        .for_each(|((out, x), (mean, rstd))| {
            for (((row, o), m), r) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(mean).zip(rstd) {
                (*m, *r) = vmath::layer_norm_row(row, g, b, eps, o);
            }
        });
}

/// `out = x / √(mean(x²) + eps) · g` row by row (RMSNorm; `g` of the row's length).
pub(crate) fn rms_norm(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let d = g.len();
    out.par_chunks_mut(ROW_BLOCK * d).zip(x.par_chunks(ROW_BLOCK * d)).for_each(|(out, x)| {
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            vmath::rms_norm_row(row, g, eps, o);
        }
    });
}

/// RMSNorm of the queries (weight `qn`) and keys (weight `kn`) of the fused projection, in place, in
/// groups of `q_width` and `k_width` values: one head (Qwen 3) or all heads at once (OLMo 2; the blocked
/// layout keeps each projection's heads contiguous).
pub(crate) fn qk_rms_norm(
    qkv: &mut [f32],
    (off, (heads, kv_heads), hd): (crate::arch::QkvOffsets, (usize, usize), usize),
    (qn, kn): (&[f32], &[f32]),
    (q_width, k_width): (usize, usize),
    eps: f32,
) {
    qkv.par_chunks_mut(off.row).for_each(|row| {
        let mut norm = |at: usize, g: &[f32]| {
            vmath::rms_norm_in_place(&mut row[at..at + g.len()], g, eps);
        };
        for h in 0..heads * hd / q_width {
            norm(off.q + h * q_width / hd * off.head, qn);
        }
        for h in 0..kv_heads * hd / k_width {
            norm(off.k + h * k_width / hd * off.head, kn);
        }
    });
}

/// `up ← silu(gate) · up`, elementwise (SwiGLU).
pub(crate) fn silu_mul(gate: &[f32], up: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    up.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).for_each(|(u, g)| {
        u.iter_mut().zip(g).for_each(|(u, &g)| *u *= g / (1.0 + vmath::exp(-g)));
    });
}

/// `up ← gelu_tanh(gate) · up`, elementwise (GeGLU); `gate` is overwritten by its activation.
pub(crate) fn gelu_tanh_mul(gate: &mut [f32], up: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    up.par_chunks_mut(CHUNK).zip(gate.par_chunks_mut(CHUNK)).for_each(|(u, g)| {
        vmath::gelu_tanh_in_place(g);
        u.iter_mut().zip(g.iter()).for_each(|(u, g)| *u *= g);
    });
}

/// The residual stream's first value: token embeddings, plus learned positions when given
/// (`rows × d`, `tokens` and `positions` one per row).
pub(crate) fn embed<'t>(
    tokens: impl Iterator<Item = &'t u32>,
    positions: &[usize],
    (embed, learned): (&[f32], Option<&[f32]>),
    d: usize,
) -> Vec<f32> {
    embed_rows(tokens, positions, |tok, row| row.copy_from_slice(&embed[tok * d..(tok + 1) * d]), learned, d)
}

/// [`embed`] with each token's row written by `row(token, out)`.
pub(crate) fn embed_rows<'t>(
    tokens: impl Iterator<Item = &'t u32>,
    positions: &[usize],
    row: impl Fn(usize, &mut [f32]),
    learned: Option<&[f32]>,
    d: usize,
) -> Vec<f32> {
    let mut x = vec![0.0f32; positions.len() * d];
    for (out, &tok) in x.chunks_exact_mut(d).zip(tokens) {
        row(tok as usize, out);
    }
    if let Some(wpe) = learned {
        for (row, &pos) in x.chunks_exact_mut(d).zip(positions) {
            row.iter_mut().zip(&wpe[pos * d..(pos + 1) * d]).for_each(|(x, p)| *x += p);
        }
    }
    x
}

/// `out = x W` (`rows × outputs`) with `W` stored as `layout` says: `inputs × outputs` (GPT-2's
/// `Conv1D`) or `outputs × inputs` (`nn.Linear`, multiplied transposed).
pub(crate) fn linear(
    x: &[f32],
    w: &[f32],
    layout: crate::arch::WeightLayout,
    (rows, inputs, outputs): (usize, usize, usize),
    out: &mut [f32],
) -> Result<()> {
    let dev = Device::Cpu;
    match layout {
        crate::arch::WeightLayout::InputsMajor => memsteer_kernels::matmul(&dev, x, w, rows, inputs, outputs, out)?,
        crate::arch::WeightLayout::OutputsMajor => {
            memsteer_kernels::matmul_transposed(&dev, x, w, rows, inputs, outputs, out)?
        }
    }
    Ok(())
}

/// Adds `b` to every row of `x`, then applies `act` if given.
pub(crate) fn bias_act(x: &mut [f32], b: &[f32], act: Option<Activation>) {
    let d = b.len();
    x.par_chunks_mut(ROW_BLOCK * d).for_each(|x| {
        for row in x.chunks_exact_mut(d) {
            row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
            match act {
                None => {}
                Some(Activation::GeluTanh) => vmath::gelu_tanh_in_place(row),
                Some(Activation::GeluExact) => vmath::gelu_erf_in_place(row),
            }
        }
    });
}

/// Rotate-half rotary embedding, in place, of the first `2·half` dimensions of every query and key
/// head of the fused projection `qkv` (rows laid out as `off` says): row `r` uses row `table_rows[r]`
/// of the `(cos, sin)` tables (`half` values per row). `inverse` applies the transposed rotation (the
/// backward of the forward one).
pub(crate) fn rotate(
    qkv: &mut [f32],
    (off, (heads, kv_heads), half): (crate::arch::QkvOffsets, (usize, usize), usize),
    (cos, sin): (&[f32], &[f32]),
    table_rows: &[usize],
    inverse: bool,
) {
    if half == 0 {
        return;
    }
    qkv.par_chunks_mut(off.row).zip(table_rows).for_each(|(row, &at)| {
        let (c, s) = (&cos[at * half..(at + 1) * half], &sin[at * half..(at + 1) * half]);
        for h in 0..heads {
            for part in [Some(off.q), (h < kv_heads).then_some(off.k)].into_iter().flatten() {
                let base = part + h * off.head;
                for i in 0..half {
                    let (a, b) = (row[base + i], row[base + i + half]);
                    if inverse {
                        row[base + i] = a * c[i] + b * s[i];
                        row[base + i + half] = b * c[i] - a * s[i];
                    } else {
                        row[base + i] = a * c[i] - b * s[i];
                        row[base + i + half] = b * c[i] + a * s[i];
                    }
                }
            }
        }
    });
}

/// `x += a` (and `+= b` when given), elementwise.
pub(crate) fn residual(x: &mut [f32], a: &[f32], b: Option<&[f32]>) {
    const CHUNK: usize = 1 << 14;
    match b {
        None => x.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(x, a)| {
            x.iter_mut().zip(a).for_each(|(x, a)| *x += a);
        }),
        Some(b) => x.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((x, a), b)| {
            x.iter_mut().zip(a.iter().zip(b)).for_each(|(x, (a, b))| *x += a + b);
        }),
    }
}

/// Per-head views into a row-major buffer: head `h` of row `r` starts at
/// `data[r·row_stride + base + h·head_stride]` and holds `head_dim` values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub base: usize,
    pub head_stride: usize,
}

impl<'a> Heads<'a> {
    /// Head `h` from row `row0` on, as a (rows × head_dim) view.
    fn at(&self, h: usize, row0: usize) -> MatRef<'a> {
        let start = (row0 * self.row_stride + self.base + h * self.head_stride).min(self.data.len());
        MatRef { data: &self.data[start..], rs: self.row_stride, cs: 1 }
    }
}

/// Causal multi-head attention over a packed batch, written to `out` (`rows × heads·head_dim`).
/// Queries of sequence `s` are rows `starts[s]..` of `q`; its keys and values are rows
/// `row0..row0 + past + len` of the `(k, v, row0)` that `kv(s)` gives (`past` = `layout.pasts[s]`).
/// Query `i` of a sequence sits at position `past + i` and sees keys up to it. One task per (sequence, head); scores are tiled by
/// `QUERY_BLOCK` query rows and reach only the keys a tile can see.
///
/// `group` query heads share each key/value head (grouped-query attention: query
/// head `h` reads key/value head `h / group`) and, when given, a sliding `window`: a query at position
/// `p` sees the keys at positions `p + 1 − window ..= p` only.
pub(crate) fn attention<'a>(
    q: Heads<'_>,
    kv: &(dyn Fn(usize) -> (Heads<'a>, Heads<'a>, usize) + Sync),
    layout: &Layout,
    (heads, group, hd): (usize, usize, usize),
    map: ScoreMap,
    out: &mut [f32],
) -> Result<()> {
    let d = heads * hd;
    // Head-major scratch: sequence s's region holds its heads one after another (len × hd each).
    let mut scratch = vec![0.0f32; out.len()];
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(layout.starts.len() * heads);
    let mut rest = scratch.as_mut_slice();
    for s in 0..layout.starts.len() - 1 {
        let len = layout.starts[s + 1] - layout.starts[s];
        let (region, tail) = rest.split_at_mut(len * d);
        rest = tail;
        for (h, chunk) in region.chunks_exact_mut(len * hd).enumerate() {
            tasks.push((s, h, chunk));
        }
    }
    let dev = Device::Cpu;
    tasks.into_par_iter().try_for_each(|(s, h, o)| -> Result<()> {
        let (len, past) = (layout.starts[s + 1] - layout.starts[s], layout.pasts[s]);
        let (k, v, row0) = kv(s);
        let (qm, km, vm) = (q.at(h, layout.starts[s]), k.at(h / group, row0), v.at(h / group, row0));
        let mut scores = vec![0.0f32; QUERY_BLOCK.min(len) * (past + len)];
        for i0 in (0..len).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(len - i0);
            let keys = past + i0 + rows;
            let sc = &mut scores[..rows * keys];
            let q_tile = MatRef { data: &qm.data[(i0 * qm.rs).min(qm.data.len())..], ..qm };
            matmul_strided(&dev, (rows, hd, keys), q_tile, km.t(), 0.0, MatMut::row_major(sc, keys))?;
            for r in 0..rows {
                map.weights(&mut sc[r * keys..(r + 1) * keys], past + i0 + r, None);
            }
            matmul_strided(
                &dev,
                (rows, keys, hd),
                MatRef::row_major(sc, keys),
                vm,
                0.0,
                MatMut::row_major(&mut o[i0 * hd..(i0 + rows) * hd], hd),
            )?;
        }
        Ok(())
    })?;
    // Back to row-major (rows × d).
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let s = layout.starts.partition_point(|&st| st <= row) - 1;
        let (start, len) = (layout.starts[s], layout.starts[s + 1] - layout.starts[s]);
        let i = row - start;
        for h in 0..heads {
            let src = start * d + h * len * hd + i * hd;
            o[h * hd..(h + 1) * hd].copy_from_slice(&scratch[src..src + hd]);
        }
    });
    Ok(())
}

/// Keys and values of every layer for the positions seen so far (incremental decoding).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: keys and values, `len × d` each.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends layer `l`'s keys and values for new positions.
    pub(crate) fn extend(&mut self, l: usize, k: &[f32], v: &[f32]) {
        if self.layers.len() <= l {
            self.layers.resize_with(l + 1, Default::default);
        }
        let (ks, vs) = &mut self.layers[l];
        ks.extend_from_slice(k);
        vs.extend_from_slice(v);
    }

    /// Layer `l`'s keys and values (empty before the layer was extended).
    pub(crate) fn layer(&self, l: usize) -> (&[f32], &[f32]) {
        self.layers.get(l).map_or((&[], &[]), |(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Bytes the keys and values take.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.capacity() + v.capacity()) * std::mem::size_of::<f32>()).sum()
    }

    /// Records that `t` new positions went through every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// Next-token logits after feeding `tokens` on top of `cache`.
pub(crate) fn next_logits(m: &impl crate::Decoder, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let hidden = m.forward(tokens, cache)?;
    let d = m.dim();
    let last = &hidden[hidden.len().saturating_sub(d)..];
    let mut logits = vec![0.0f32; m.vocab()];
    memsteer_kernels::matmul_transposed(&Device::Cpu, last, m.output_embedding(), 1, d, m.vocab(), &mut logits)?;
    m.logits_in_place(&mut logits);
    Ok(logits)
}

/// `log p(x_t | x_<t)` for `t = 1..T` of every sequence, through one packed forward pass and the
/// fused output layer. Every sequence needs at least two tokens.
pub(crate) fn token_log_probs_batch(m: &impl crate::Decoder, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
    if let Some((i, s)) = seqs.iter().enumerate().find(|(_, s)| s.len() < 2) {
        let message =
            format!("{} token(s): a log-probability needs at least two (the first token is not scored)", s.len());
        return Err(if seqs.len() == 1 { LmError::Input(message) } else { LmError::Sequence { index: i, message } });
    }
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let hidden = m.forward_packed(seqs, None)?;
    let d = m.dim();
    // Every row but each sequence's last predicts the next token.
    let scored: usize = seqs.iter().map(|s| s.len() - 1).sum();
    let mut h = Vec::with_capacity(scored * d);
    let mut targets = Vec::with_capacity(scored);
    let mut row = 0;
    for s in seqs {
        h.extend_from_slice(&hidden[row * d..(row + s.len() - 1) * d]);
        targets.extend_from_slice(&s[1..]);
        row += s.len();
    }
    let mut out = vec![0.0f32; scored];
    m.output_log_probs(&h, &targets, &mut out)?;
    let mut result = Vec::with_capacity(seqs.len());
    let mut at = 0;
    for s in seqs {
        result.push(out[at..at + s.len() - 1].to_vec());
        at += s.len() - 1;
    }
    Ok(result)
}

/// Sequence log-probabilities (sums over tokens in `f64`).
pub(crate) fn sequence_log_probs(m: &impl crate::Decoder, batch: &[Vec<u32>]) -> Result<Vec<f64>> {
    let seqs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
    Ok(token_log_probs_batch(m, &seqs)?.iter().map(|lp| lp.iter().map(|&x| f64::from(x)).sum()).collect())
}
