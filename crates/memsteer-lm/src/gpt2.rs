//! GPT-2 (Hugging Face `GPT2LMHeadModel` layout) on CPU.

use std::path::Path;

use memsteer_kernels::{Device, matmul};

use crate::Decoder;
use crate::Result;
use crate::config::Gpt2Config;
use crate::ops::{KvCache, add_bias, causal_attention, check_input, gelu, layer_norm};
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
    wpe: Vec<f32>,
    blocks: Vec<Block>,
    ln_f: (Vec<f32>, Vec<f32>),
}

impl Gpt2 {
    /// Loads `dir/model.safetensors` (or its shards) for `cfg`. Tensor names may carry the
    /// `transformer.` prefix of `GPT2LMHeadModel` checkpoints.
    pub fn load(dir: &Path, cfg: Gpt2Config) -> Result<Self> {
        let w = Weights::open(dir)?;
        let d = cfg.n_embd;
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
                fc_w: t(&p("mlp.c_fc.weight"), &[d, 4 * d])?,
                fc_b: t(&p("mlp.c_fc.bias"), &[4 * d])?,
                out_w: t(&p("mlp.c_proj.weight"), &[4 * d, d])?,
                out_b: t(&p("mlp.c_proj.bias"), &[d])?,
            });
        }
        Ok(Self {
            wte: t("wte.weight", &[cfg.vocab_size, d])?,
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

    fn run(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        check_input(self, tokens, cache.len())?;
        let p0 = cache.len();

        let (t, d) = (tokens.len(), self.cfg.n_embd);
        let h = self.cfg.n_head;
        let dev = Device::Cpu;
        let mut x = vec![0.0f32; t * d];
        for (i, &tok) in tokens.iter().enumerate() {
            let pos = p0 + i;
            let (e, p) = (&self.wte[tok as usize * d..(tok as usize + 1) * d], &self.wpe[pos * d..(pos + 1) * d]);
            for k in 0..d {
                x[i * d + k] = e[k] + p[k];
            }
        }
        let eps = self.cfg.layer_norm_epsilon;
        let mut a = vec![0.0f32; t * d];
        let mut qkv = vec![0.0f32; t * 3 * d];
        let mut ctx = vec![0.0f32; t * d];
        let mut tmp = vec![0.0f32; t * d];
        let mut hidden4 = vec![0.0f32; t * 4 * d];
        let (mut q, mut k, mut v) = (vec![0.0f32; t * d], vec![0.0f32; t * d], vec![0.0f32; t * d]);
        for (l, b) in self.blocks.iter().enumerate() {
            layer_norm(&mut x, &b.ln1, eps, &mut a);
            matmul(&dev, &a, &b.attn_w, t, d, 3 * d, &mut qkv)?;
            add_bias(&mut qkv, &b.attn_b);
            for i in 0..t {
                let row = &qkv[i * 3 * d..(i + 1) * 3 * d];
                q[i * d..(i + 1) * d].copy_from_slice(&row[..d]);
                k[i * d..(i + 1) * d].copy_from_slice(&row[d..2 * d]);
                v[i * d..(i + 1) * d].copy_from_slice(&row[2 * d..]);
            }
            let (ks, vs) = cache.extend(l, &k, &v);
            causal_attention(&q, ks, vs, (t, p0 + t), d, h, &mut ctx);
            matmul(&dev, &ctx, &b.proj_w, t, d, d, &mut tmp)?;
            add_bias(&mut tmp, &b.proj_b);
            x.iter_mut().zip(&tmp).for_each(|(v, u)| *v += u);
            layer_norm(&mut x, &b.ln2, eps, &mut a);
            matmul(&dev, &a, &b.fc_w, t, d, 4 * d, &mut hidden4)?;
            add_bias(&mut hidden4, &b.fc_b);
            let act = self.cfg.activation;
            hidden4.iter_mut().for_each(|v| *v = gelu(*v, act));
            matmul(&dev, &hidden4, &b.out_w, t, 4 * d, d, &mut tmp)?;
            add_bias(&mut tmp, &b.out_b);
            x.iter_mut().zip(&tmp).for_each(|(v, u)| *v += u);
        }
        cache.advance(t);
        let mut out = vec![0.0f32; t * d];
        layer_norm(&mut x, &self.ln_f, eps, &mut out);
        Ok(out)
    }
}

impl Decoder for Gpt2 {
    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.run(tokens, cache)
    }
    fn output_embedding(&self) -> &[f32] {
        &self.wte
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
