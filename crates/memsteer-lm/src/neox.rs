//! GPT-NeoX (Hugging Face `GPTNeoXForCausalLM` layout, as Pythia) on CPU.

use std::path::Path;

use memsteer_kernels::{Device, matmul_transposed};

use crate::Decoder;
use crate::Result;
use crate::config::NeoXConfig;
use crate::ops::{KvCache, add_bias, causal_attention, check_input, gelu, layer_norm};
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
            embed_out: if cfg.tie_word_embeddings { None } else { Some(t("embed_out.weight", &[v, d])?) },
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

    /// Rotates the first `rot` dimensions of each head of `x` (`t × d`, positions `p0..p0+t`) in place
    /// (rotate-half form).
    fn rotary(&self, x: &mut [f32], t: usize, p0: usize) {
        let (d, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let (hd, half) = (d / heads, self.rot / 2);
        for row in 0..t {
            let pos = p0 + row;
            for h in 0..heads {
                let base = row * d + h * hd;
                for i in 0..half {
                    let angle = pos as f64 * self.inv_freq[i];
                    let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
                    let (a, b) = (x[base + i], x[base + i + half]);
                    x[base + i] = a * cos - b * sin;
                    x[base + i + half] = b * cos + a * sin;
                }
            }
        }
    }

    fn run(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        check_input(self, tokens, cache.len())?;
        let p0 = cache.len();

        let (t, d) = (tokens.len(), self.cfg.hidden_size);
        let (heads, inter) = (self.cfg.num_attention_heads, self.cfg.intermediate_size);
        let hd = d / heads;
        let dev = Device::Cpu;
        let eps = self.cfg.layer_norm_eps;
        let mut x = vec![0.0f32; t * d];
        for (i, &tok) in tokens.iter().enumerate() {
            x[i * d..(i + 1) * d].copy_from_slice(&self.embed_in[tok as usize * d..(tok as usize + 1) * d]);
        }
        let (mut h1, mut h2) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
        let mut qkv = vec![0.0f32; t * 3 * d];
        let (mut q, mut k, mut v) = (vec![0.0f32; t * d], vec![0.0f32; t * d], vec![0.0f32; t * d]);
        let (mut ctx, mut attn) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
        let (mut mid, mut mlp) = (vec![0.0f32; t * inter], vec![0.0f32; t * d]);
        for (li, l) in self.layers.iter().enumerate() {
            layer_norm(&mut x, &l.ln1, eps, &mut h1);
            matmul_transposed(&dev, &h1, &l.qkv_w, t, d, 3 * d, &mut qkv)?;
            add_bias(&mut qkv, &l.qkv_b);
            // Per head the fused output is [q (hd), k (hd), v (hd)].
            for i in 0..t {
                for h in 0..heads {
                    let src = &qkv[i * 3 * d + h * 3 * hd..i * 3 * d + (h + 1) * 3 * hd];
                    let dst = i * d + h * hd;
                    q[dst..dst + hd].copy_from_slice(&src[..hd]);
                    k[dst..dst + hd].copy_from_slice(&src[hd..2 * hd]);
                    v[dst..dst + hd].copy_from_slice(&src[2 * hd..]);
                }
            }
            if self.rot > 0 {
                self.rotary(&mut q, t, p0);
                self.rotary(&mut k, t, p0);
            }
            let (ks, vs) = cache.extend(li, &k, &v);
            causal_attention(&q, ks, vs, (t, p0 + t), d, heads, &mut ctx);
            matmul_transposed(&dev, &ctx, &l.dense_w, t, d, d, &mut attn)?;
            add_bias(&mut attn, &l.dense_b);
            let act = self.cfg.activation;
            let mut run_mlp = |input: &[f32], out: &mut [f32]| -> Result<()> {
                matmul_transposed(&dev, input, &l.up_w, t, d, inter, &mut mid)?;
                add_bias(&mut mid, &l.up_b);
                mid.iter_mut().for_each(|m| *m = gelu(*m, act));
                matmul_transposed(&dev, &mid, &l.down_w, t, inter, d, out)?;
                add_bias(out, &l.down_b);
                Ok(())
            };
            if self.cfg.use_parallel_residual {
                layer_norm(&mut x, &l.ln2, eps, &mut h2);
                run_mlp(&h2, &mut mlp)?;
                x.iter_mut().zip(attn.iter().zip(&mlp)).for_each(|(xi, (a, m))| *xi += a + m);
            } else {
                x.iter_mut().zip(&attn).for_each(|(xi, a)| *xi += a);
                layer_norm(&mut x, &l.ln2, eps, &mut h2);
                run_mlp(&h2, &mut mlp)?;
                x.iter_mut().zip(&mlp).for_each(|(xi, m)| *xi += m);
            }
        }
        cache.advance(t);
        let mut out = vec![0.0f32; t * d];
        layer_norm(&mut x, &self.ln_f, eps, &mut out);
        Ok(out)
    }
}

impl Decoder for GptNeoX {
    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.run(tokens, cache)
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
