//! The CPU runtime: every architecture of [`crate::arch`] through one block loop, on packed batches.

use std::path::Path;

use memsteer_kernels::{Device, matmul, matmul_transposed};

use crate::arch::{Arch, Positions, Residual, Tensors, WeightLayout};
use crate::ops::{self, Heads, KvCache};
use crate::weights::Weights;
use crate::{Decoder, Result};

/// A model loaded for the CPU: its description and its tensors in `f32`, whatever their storage type.
#[derive(Debug)]
pub struct Model {
    arch: Arch,
    w: Tensors<Vec<f32>>,
}

impl Model {
    /// Loads the weights of `dir` (`model.safetensors` or its shards) for `arch` (which
    /// [`Model::load`] reads from `dir/config.json`).
    pub fn load_arch(dir: &Path, arch: Arch) -> Result<Self> {
        let weights = Weights::open(dir)?;
        let w = arch.load_tensors(|spec| weights.tensor(&spec.name_refs(), &spec.shape))?;
        Ok(Self { arch, w })
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// `out = x W (+ nothing)`, `rows × outputs`, with `W` as the architecture stores it.
    fn linear(
        &self,
        x: &[f32],
        w: &[f32],
        (rows, inputs, outputs): (usize, usize, usize),
        out: &mut [f32],
    ) -> Result<()> {
        let dev = Device::Cpu;
        match self.arch.weights {
            WeightLayout::InputsMajor => matmul(&dev, x, w, rows, inputs, outputs, out)?,
            WeightLayout::OutputsMajor => matmul_transposed(&dev, x, w, rows, inputs, outputs, out)?,
        }
        Ok(())
    }

    fn run(&self, seqs: &[&[u32]], mut cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        let a = &self.arch;
        let lay = ops::layout(self, seqs, cache.as_deref())?;
        let (t, d, inner) = (lay.rows(), a.dim, a.inner);
        let (heads, hd) = (a.heads, a.head_dim);
        let (eps, act) = (a.norm_eps(), a.activation);
        let mut x = vec![0.0f32; t * d];
        let tokens = seqs.iter().flat_map(|s| s.iter());
        for (row, &tok) in x.chunks_exact_mut(d).zip(tokens) {
            row.copy_from_slice(&self.w.embed[tok as usize * d..(tok as usize + 1) * d]);
        }
        if let (Positions::Learned, Some(wpe)) = (a.positions, &self.w.positions) {
            for (row, &pos) in x.chunks_exact_mut(d).zip(&lay.positions) {
                row.iter_mut().zip(&wpe[pos * d..(pos + 1) * d]).for_each(|(x, p)| *x += p);
            }
        }
        // Rotary angles of only the positions this call sees (a decoding step costs one row).
        let first = lay.positions.iter().min().copied().unwrap_or(0);
        let last = lay.positions.iter().max().map_or(first, |p| p + 1);
        let (cos, sin) = a.rotary_table((first, last));
        let table_rows: Vec<usize> = lay.positions.iter().map(|p| p - first).collect();
        let off = a.qkv_offsets();
        let width = a.qkv_width();
        let (mut h1, mut h2) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
        let mut qkv = vec![0.0f32; t * width];
        let (mut ctx, mut attn) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
        let (mut mid, mut mlp) = (vec![0.0f32; t * inner], vec![0.0f32; t * d]);
        let fused = |base| Heads { data: &[], row_stride: off.row, base, head_stride: off.head };
        for (li, l) in self.w.layers.iter().enumerate() {
            ops::layer_norm(&x, &l.norm1, eps, &mut h1);
            self.linear(&h1, &l.qkv.0, (t, d, width), &mut qkv)?;
            ops::bias_act(&mut qkv, &l.qkv.1, None);
            ops::rotate(&mut qkv, (off, heads, a.rotary_dims() / 2), (&cos, &sin), &table_rows, false);
            let q = Heads { data: &qkv, ..fused(off.q) };
            if let Some(c) = cache.as_deref_mut() {
                let (mut k, mut v) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
                for i in 0..t {
                    let row = &qkv[i * off.row..(i + 1) * off.row];
                    for h in 0..heads {
                        let (dst, at) = (i * d + h * hd, h * off.head);
                        k[dst..dst + hd].copy_from_slice(&row[off.k + at..off.k + at + hd]);
                        v[dst..dst + hd].copy_from_slice(&row[off.v + at..off.v + at + hd]);
                    }
                }
                let (ks, vs) = c.extend(li, &k, &v);
                let cached = |data| Heads { data, row_stride: d, base: 0, head_stride: hd };
                ops::attention((q, cached(ks), cached(vs)), &lay, &|_| 0, (heads, hd), &mut ctx)?;
            } else {
                let (k, v) = (Heads { data: &qkv, ..fused(off.k) }, Heads { data: &qkv, ..fused(off.v) });
                ops::attention((q, k, v), &lay, &|s| lay.starts[s], (heads, hd), &mut ctx)?;
            }
            self.linear(&ctx, &l.attn_out.0, (t, d, d), &mut attn)?;
            ops::bias_act(&mut attn, &l.attn_out.1, None);
            let mut run_mlp = |input: &[f32], out: &mut [f32]| -> Result<()> {
                self.linear(input, &l.up.0, (t, d, inner), &mut mid)?;
                ops::bias_act(&mut mid, &l.up.1, Some(act));
                self.linear(&mid, &l.down.0, (t, inner, d), out)?;
                ops::bias_act(out, &l.down.1, None);
                Ok(())
            };
            match a.residual {
                Residual::Parallel => {
                    ops::layer_norm(&x, &l.norm2, eps, &mut h2);
                    run_mlp(&h2, &mut mlp)?;
                    ops::residual(&mut x, &attn, Some(&mlp));
                }
                Residual::Sequential => {
                    ops::residual(&mut x, &attn, None);
                    ops::layer_norm(&x, &l.norm2, eps, &mut h2);
                    run_mlp(&h2, &mut mlp)?;
                    ops::residual(&mut x, &mlp, None);
                }
            }
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        ops::layer_norm(&x, &self.w.final_norm, eps, &mut h1);
        Ok(h1)
    }
}

impl Decoder for Model {
    fn forward_packed(&self, seqs: &[&[u32]], cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        self.run(seqs, cache)
    }
    fn output_embedding(&self) -> &[f32] {
        self.w.output()
    }
    fn dim(&self) -> usize {
        self.arch.dim
    }
    fn context(&self) -> usize {
        self.arch.context
    }
    fn vocab(&self) -> usize {
        self.arch.vocab
    }
}
