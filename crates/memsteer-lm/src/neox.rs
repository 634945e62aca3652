//! GPT-NeoX (Hugging Face `GPTNeoXForCausalLM` layout, as Pythia) on CPU.

use std::path::Path;

use memsteer_kernels::{Device, matmul_transposed};

use crate::Decoder;
use crate::Result;
use crate::config::NeoXConfig;
use rayon::prelude::*;

use crate::ops::{self, Heads, KvCache};
use crate::weights::Weights;

#[derive(Debug)]
struct Layer {
    ln1: (Vec<f32>, Vec<f32>),
    ln2: (Vec<f32>, Vec<f32>),
    qkv_w: Vec<f32>,
    qkv_b: Vec<f32>,
    dense_w: Vec<f32>,
    dense_b: Vec<f32>,
    up_w: Vec<f32>,
    up_b: Vec<f32>,
    down_w: Vec<f32>,
    down_b: Vec<f32>,
}

/// A loaded GPT-NeoX model.
#[derive(Debug)]
pub struct GptNeoX {
    cfg: NeoXConfig,
    embed_in: Vec<f32>,
    /// `None` when tied to `embed_in`.
    embed_out: Option<Vec<f32>>,
    layers: Vec<Layer>,
    ln_f: (Vec<f32>, Vec<f32>),
    /// Rotary inverse frequencies (`rot / 2` of them).
    inv_freq: Vec<f64>,
    rot: usize,
}

impl GptNeoX {
    /// Loads `dir/model.safetensors` (or its shards) for `cfg`.
    pub fn load(dir: &Path, cfg: NeoXConfig) -> Result<Self> {
        let w = Weights::open(dir)?;
        let (d, inter, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let t = |name: &str, shape: &[usize]| w.tensor(&[name], shape);
        let ln = |name: &str| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((t(&format!("{name}.weight"), &[d])?, t(&format!("{name}.bias"), &[d])?))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("gpt_neox.layers.{i}.{s}");
            layers.push(Layer {
                ln1: ln(&p("input_layernorm"))?,
                ln2: ln(&p("post_attention_layernorm"))?,
                qkv_w: t(&p("attention.query_key_value.weight"), &[3 * d, d])?,
                qkv_b: t(&p("attention.query_key_value.bias"), &[3 * d])?,
                dense_w: t(&p("attention.dense.weight"), &[d, d])?,
                dense_b: t(&p("attention.dense.bias"), &[d])?,
                up_w: t(&p("mlp.dense_h_to_4h.weight"), &[inter, d])?,
                up_b: t(&p("mlp.dense_h_to_4h.bias"), &[inter])?,
                down_w: t(&p("mlp.dense_4h_to_h.weight"), &[d, inter])?,
                down_b: t(&p("mlp.dense_4h_to_h.bias"), &[d])?,
            });
        }
        let hd = d / cfg.num_attention_heads;
        let rot = ((hd as f64) * cfg.rotary_pct) as usize / 2 * 2;
        let inv_freq = (0..rot / 2).map(|i| 1.0 / cfg.rotary_base.powf((2 * i) as f64 / rot as f64)).collect();
        Ok(Self {
            embed_in: t("gpt_neox.embed_in.weight", &[v, d])?,
            // transformers 5 names the output layer `lm_head` in memory; saved files say `embed_out`.
            embed_out: if cfg.tie_word_embeddings {
                None
            } else {
                Some(w.tensor(&["embed_out.weight", "lm_head.weight"], &[v, d])?)
            },
            ln_f: ln("gpt_neox.final_layer_norm")?,
            layers,
            inv_freq,
            rot,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NeoXConfig {
        &self.cfg
    }

    /// `(cos, sin)` of every rotary angle for positions `from..to`, `(to − from) × rot/2` each.
    fn rotary_table(&self, (from, to): (usize, usize)) -> (Vec<f32>, Vec<f32>) {
        let half = self.rot / 2;
        let mut cos = Vec::with_capacity((to - from) * half);
        let mut sin = Vec::with_capacity((to - from) * half);
        for pos in from..to {
            for f in &self.inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

    fn run(&self, seqs: &[&[u32]], mut cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        let lay = ops::layout(self, seqs, cache.as_deref())?;
        let (t, d) = (lay.rows(), self.cfg.hidden_size);
        let (heads, inter) = (self.cfg.num_attention_heads, self.cfg.intermediate_size);
        let hd = d / heads;
        let dev = Device::Cpu;
        let eps = self.cfg.layer_norm_eps;
        let act = self.cfg.activation;
        let mut x = vec![0.0f32; t * d];
        for (row, &tok) in x.chunks_exact_mut(d).zip(seqs.iter().flat_map(|s| s.iter())) {
            row.copy_from_slice(&self.embed_in[tok as usize * d..(tok as usize + 1) * d]);
        }
        let half = self.rot / 2;
        // Only the positions this call sees (decoding one token costs one row, not the whole prefix).
        let first = lay.positions.iter().min().copied().unwrap_or(0);
        let (cos, sin) = self.rotary_table((first, lay.positions.iter().max().map_or(first, |p| p + 1)));
        let (mut h1, mut h2) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
        let mut qkv = vec![0.0f32; t * 3 * d];
        let (mut ctx, mut attn) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
        let (mut mid, mut mlp) = (vec![0.0f32; t * inter], vec![0.0f32; t * d]);
        // In the fused projection each head's slice of a row is [q (hd), k (hd), v (hd)].
        let fused = |base| Heads { data: &[], row_stride: 3 * d, base, head_stride: 3 * hd };
        for (li, l) in self.layers.iter().enumerate() {
            ops::layer_norm(&x, &l.ln1, eps, &mut h1);
            matmul_transposed(&dev, &h1, &l.qkv_w, t, d, 3 * d, &mut qkv)?;
            ops::bias_act(&mut qkv, &l.qkv_b, None);
            if half > 0 {
                // Rotate-half rotary embedding of the first `rot` dimensions of every q and k head.
                qkv.par_chunks_mut(3 * d).zip(&lay.positions).for_each(|(row, &pos)| {
                    let at = pos - first;
                    let (c, s) = (&cos[at * half..(at + 1) * half], &sin[at * half..(at + 1) * half]);
                    for h in 0..heads {
                        for part in [0, hd] {
                            let base = h * 3 * hd + part;
                            for i in 0..half {
                                let (a, b) = (row[base + i], row[base + i + half]);
                                row[base + i] = a * c[i] - b * s[i];
                                row[base + i + half] = b * c[i] + a * s[i];
                            }
                        }
                    }
                });
            }
            let q = Heads { data: &qkv, ..fused(0) };
            if let Some(c) = cache.as_deref_mut() {
                let (mut k, mut v) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
                for i in 0..t {
                    for h in 0..heads {
                        let src = i * 3 * d + h * 3 * hd;
                        k[i * d + h * hd..i * d + (h + 1) * hd].copy_from_slice(&qkv[src + hd..src + 2 * hd]);
                        v[i * d + h * hd..i * d + (h + 1) * hd].copy_from_slice(&qkv[src + 2 * hd..src + 3 * hd]);
                    }
                }
                let (ks, vs) = c.extend(li, &k, &v);
                let cached = |data| Heads { data, row_stride: d, base: 0, head_stride: hd };
                ops::attention((q, cached(ks), cached(vs)), &lay, &|_| 0, (heads, hd), &mut ctx)?;
            } else {
                let (k, v) = (Heads { data: &qkv, ..fused(hd) }, Heads { data: &qkv, ..fused(2 * hd) });
                ops::attention((q, k, v), &lay, &|s| lay.starts[s], (heads, hd), &mut ctx)?;
            }
            matmul_transposed(&dev, &ctx, &l.dense_w, t, d, d, &mut attn)?;
            ops::bias_act(&mut attn, &l.dense_b, None);
            let mut run_mlp = |input: &[f32], out: &mut [f32]| -> Result<()> {
                matmul_transposed(&dev, input, &l.up_w, t, d, inter, &mut mid)?;
                ops::bias_act(&mut mid, &l.up_b, Some(act));
                matmul_transposed(&dev, &mid, &l.down_w, t, inter, d, out)?;
                ops::bias_act(out, &l.down_b, None);
                Ok(())
            };
            if self.cfg.use_parallel_residual {
                ops::layer_norm(&x, &l.ln2, eps, &mut h2);
                run_mlp(&h2, &mut mlp)?;
                ops::residual(&mut x, &attn, Some(&mlp));
            } else {
                ops::residual(&mut x, &attn, None);
                ops::layer_norm(&x, &l.ln2, eps, &mut h2);
                run_mlp(&h2, &mut mlp)?;
                ops::residual(&mut x, &mlp, None);
            }
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        ops::layer_norm(&x, &self.ln_f, eps, &mut h1);
        Ok(h1)
    }
}

impl Decoder for GptNeoX {
    fn forward_packed(&self, seqs: &[&[u32]], cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        self.run(seqs, cache)
    }
    fn output_embedding(&self) -> &[f32] {
        self.embed_out.as_deref().unwrap_or(&self.embed_in)
    }
    fn dim(&self) -> usize {
        self.cfg.hidden_size
    }
    fn context(&self) -> usize {
        self.cfg.max_position_embeddings
    }
    fn vocab(&self) -> usize {
        self.cfg.vocab_size
    }
}
