//! GPT-2 (Hugging Face `GPT2LMHeadModel` layout) on CPU.

use std::path::Path;

use memsteer_kernels::{Device, matmul};

use crate::Decoder;
use crate::Result;
use crate::config::Gpt2Config;
use crate::ops::{self, Heads, KvCache};
use crate::weights::Weights;

#[derive(Debug)]
struct Block {
    ln1: (Vec<f32>, Vec<f32>),
    attn_w: Vec<f32>,
    attn_b: Vec<f32>,
    proj_w: Vec<f32>,
    proj_b: Vec<f32>,
    ln2: (Vec<f32>, Vec<f32>),
    fc_w: Vec<f32>,
    fc_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
}

/// A loaded GPT-2 model (weights in `f32`, whatever their storage type).
#[derive(Debug)]
pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Vec<f32>,
    /// `None` when tied to `wte`.
    lm_head: Option<Vec<f32>>,
    wpe: Vec<f32>,
    blocks: Vec<Block>,
    ln_f: (Vec<f32>, Vec<f32>),
}

impl Gpt2 {
    /// Loads `dir/model.safetensors` (or its shards) for `cfg`. Tensor names may carry the
    /// `transformer.` prefix of `GPT2LMHeadModel` checkpoints.
    pub fn load(dir: &Path, cfg: Gpt2Config) -> Result<Self> {
        let w = Weights::open(dir)?;
        let (d, inner) = (cfg.n_embd, cfg.n_inner);
        let t = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let prefixed = format!("transformer.{name}");
            w.tensor(&[name, &prefixed], shape)
        };
        let ln = |name: &str| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((t(&format!("{name}.weight"), &[d])?, t(&format!("{name}.bias"), &[d])?))
        };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("h.{i}.{s}");
            blocks.push(Block {
                ln1: ln(&p("ln_1"))?,
                attn_w: t(&p("attn.c_attn.weight"), &[d, 3 * d])?,
                attn_b: t(&p("attn.c_attn.bias"), &[3 * d])?,
                proj_w: t(&p("attn.c_proj.weight"), &[d, d])?,
                proj_b: t(&p("attn.c_proj.bias"), &[d])?,
                ln2: ln(&p("ln_2"))?,
                fc_w: t(&p("mlp.c_fc.weight"), &[d, inner])?,
                fc_b: t(&p("mlp.c_fc.bias"), &[inner])?,
                out_w: t(&p("mlp.c_proj.weight"), &[inner, d])?,
                out_b: t(&p("mlp.c_proj.bias"), &[d])?,
            });
        }
        Ok(Self {
            wte: t("wte.weight", &[cfg.vocab_size, d])?,
            lm_head: if cfg.tie_word_embeddings {
                None
            } else {
                Some(w.tensor(&["lm_head.weight"], &[cfg.vocab_size, d])?)
            },
            wpe: t("wpe.weight", &[cfg.n_positions, d])?,
            ln_f: ln("ln_f")?,
            blocks,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    fn run(&self, seqs: &[&[u32]], mut cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        let lay = ops::layout(self, seqs, cache.as_deref())?;
        let (t, d) = (lay.rows(), self.cfg.n_embd);
        let (heads, hd) = (self.cfg.n_head, self.cfg.n_embd / self.cfg.n_head);
        let dev = Device::Cpu;
        let mut x = vec![0.0f32; t * d];
        let tokens = seqs.iter().flat_map(|s| s.iter());
        for ((row, &tok), &pos) in x.chunks_exact_mut(d).zip(tokens).zip(&lay.positions) {
            let (e, p) = (&self.wte[tok as usize * d..(tok as usize + 1) * d], &self.wpe[pos * d..(pos + 1) * d]);
            row.iter_mut().zip(e.iter().zip(p)).for_each(|(x, (e, p))| *x = e + p);
        }
        let eps = self.cfg.layer_norm_epsilon;
        let act = self.cfg.activation;
        let mut a = vec![0.0f32; t * d];
        let mut qkv = vec![0.0f32; t * 3 * d];
        let mut ctx = vec![0.0f32; t * d];
        let mut tmp = vec![0.0f32; t * d];
        let inner = self.cfg.n_inner;
        let mut hidden4 = vec![0.0f32; t * inner];
        // In the fused projection a row is [q (d) | k (d) | v (d)], head h at offset h·hd of each.
        let fused = |base| Heads { data: &[], row_stride: 3 * d, base, head_stride: hd };
        for (l, b) in self.blocks.iter().enumerate() {
            ops::layer_norm(&x, &b.ln1, eps, &mut a);
            matmul(&dev, &a, &b.attn_w, t, d, 3 * d, &mut qkv)?;
            ops::bias_act(&mut qkv, &b.attn_b, None);
            let q = Heads { data: &qkv, ..fused(0) };
            if let Some(c) = cache.as_deref_mut() {
                let (mut k, mut v) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
                for i in 0..t {
                    k[i * d..(i + 1) * d].copy_from_slice(&qkv[i * 3 * d + d..i * 3 * d + 2 * d]);
                    v[i * d..(i + 1) * d].copy_from_slice(&qkv[i * 3 * d + 2 * d..(i + 1) * 3 * d]);
                }
                let (ks, vs) = c.extend(l, &k, &v);
                let cached = |data| Heads { data, row_stride: d, base: 0, head_stride: hd };
                ops::attention((q, cached(ks), cached(vs)), &lay, &|_| 0, (heads, hd), &mut ctx)?;
            } else {
                let (k, v) = (Heads { data: &qkv, ..fused(d) }, Heads { data: &qkv, ..fused(2 * d) });
                ops::attention((q, k, v), &lay, &|s| lay.starts[s], (heads, hd), &mut ctx)?;
            }
            matmul(&dev, &ctx, &b.proj_w, t, d, d, &mut tmp)?;
            ops::bias_act(&mut tmp, &b.proj_b, None);
            ops::residual(&mut x, &tmp, None);
            ops::layer_norm(&x, &b.ln2, eps, &mut a);
            matmul(&dev, &a, &b.fc_w, t, d, inner, &mut hidden4)?;
            ops::bias_act(&mut hidden4, &b.fc_b, Some(act));
            matmul(&dev, &hidden4, &b.out_w, t, inner, d, &mut tmp)?;
            ops::bias_act(&mut tmp, &b.out_b, None);
            ops::residual(&mut x, &tmp, None);
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        ops::layer_norm(&x, &self.ln_f, eps, &mut a);
        Ok(a)
    }
}

impl Decoder for Gpt2 {
    fn forward_packed(&self, seqs: &[&[u32]], cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        self.run(seqs, cache)
    }
    fn output_embedding(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.wte)
    }
    fn dim(&self) -> usize {
        self.cfg.n_embd
    }
    fn context(&self) -> usize {
        self.cfg.n_positions
    }
    fn vocab(&self) -> usize {
        self.cfg.vocab_size
    }
}
