//! The trainer's recording backend of the block loop ([`crate::block`]) and what it records for the
//! backward pass.

use std::ops::Range;

use super::{Params, ops};
use crate::arch::{Affine, LayerTensors, Mlp, Positions};
use crate::block::NormSite;
use crate::ops::Layout;
use crate::{LmError, Result};

/// The trainer's backend of the block loop: the CPU runtime's operations (the trainer's copies of
/// them, which also return the norms' statistics) on the parameter buffer, recording every input the
/// backward needs as it goes. Weights are ranges of the parameter buffer.
pub(super) struct Tape<'a> {
    pub(super) p: &'a Params,
    pub(super) layout: &'a Layout,
    pub(super) tokens: &'a [u32],
    pub(super) rotary: ops::Rotary,
    /// The sliding layers' rotary tables, when they have their own.
    pub(super) local: Option<ops::Rotary>,
    pub(super) layers: Vec<LayerActs>,
    /// The final norm's record.
    pub(super) last: Option<NormRecord>,
}

impl Tape<'_> {
    fn layer(&mut self) -> Result<&mut LayerActs> {
        self.layers.last_mut().ok_or_else(|| LmError::Input("internal: a layer operation before the layer".into()))
    }

    /// `x W + b` (the bias when the layer has one), `rows × outputs`.
    fn linear(&self, x: &[f32], p: &Affine<Range<usize>>, (din, dout): (usize, usize)) -> Result<Vec<f32>> {
        let mut y = self.project(x, &p.0, (din, dout))?;
        if let Some(b) = &p.1 {
            crate::ops::bias_act(&mut y, self.p.t(b), None);
        }
        Ok(y)
    }

    /// `x W` without the bias.
    fn project(&self, x: &[f32], w: &Range<usize>, (din, dout): (usize, usize)) -> Result<Vec<f32>> {
        let rows = self.layout.rows();
        let mut y = vec![0.0f32; rows * dout];
        crate::ops::linear(x, self.p.t(w), self.p.arch.weights, (rows, din, dout), &mut y)?;
        Ok(y)
    }
}

impl crate::block::Backend for Tape<'_> {
    type Act = Vec<f32>;
    type W = Range<usize>;

    fn embed(&mut self, embed: &Range<usize>, positions: Option<&Range<usize>>) -> Result<Vec<f32>> {
        let arch = &self.p.arch;
        let learned = if arch.positions == Positions::Learned { positions.map(|p| self.p.t(p)) } else { None };
        let mut x = crate::ops::embed(self.tokens.iter(), &self.layout.positions, (self.p.t(embed), learned), arch.dim);
        if let Some(scale) = arch.embed_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(x)
    }

    fn begin_layer(&mut self, _: usize) -> Result<()> {
        self.layers.push(LayerActs::default());
        Ok(())
    }

    fn norm(&mut self, x: &Vec<f32>, p: &Affine<Range<usize>>, site: NormSite) -> Result<Vec<f32>> {
        let n = self.layout.rows();
        let (mut h, mut mean, mut rstd) = (vec![0.0f32; x.len()], Vec::new(), vec![0.0f32; n]);
        match self.p.arch.norm {
            crate::arch::Norm::LayerNorm { eps } => {
                mean = vec![0.0f32; n];
                ops::layer_norm_forward(x, self.p.pair(p)?, eps, &mut h, &mut mean, &mut rstd);
            }
            crate::arch::Norm::RmsNorm { eps, .. } => {
                ops::rms_norm_forward(x, &self.p.gain(&p.0), eps, &mut h, &mut rstd)
            }
        }
        let rec = NormRecord { x: x.clone(), mean, rstd };
        match site {
            NormSite::Attention(_) => self.layer()?.norm1 = rec,
            NormSite::Mlp(_) => self.layer()?.norm2 = rec,
            NormSite::AfterAttention(_) => self.layer()?.post1 = rec,
            NormSite::AfterMlp(_) => self.layer()?.post2 = rec,
            NormSite::Final => self.last = Some(rec),
        }
        Ok(h)
    }

    fn qkv(&mut self, index: usize, h: Vec<f32>, l: &LayerTensors<Range<usize>>) -> Result<Vec<f32>> {
        let arch = &self.p.arch;
        let mut qkv = self.linear(&h, &l.qkv, (arch.dim, arch.qkv_width()))?;
        let stats = match &l.qk_norm {
            Some((qn, kn)) => {
                Some(ops::qk_norm_forward(&mut qkv, arch, (&self.p.gain(qn), &self.p.gain(kn)), self.layout.rows()))
            }
            None => None,
        };
        match &self.local {
            Some(local) if arch.sliding_layer(index) => local.apply(&mut qkv, &self.layout.positions, false),
            _ => self.rotary.apply(&mut qkv, &self.layout.positions, false),
        }
        let a = self.layer()?;
        (a.h1, a.qk_norm) = (h, stats);
        Ok(qkv)
    }

    fn attention(&mut self, index: usize, qkv: Vec<f32>, _: &LayerTensors<Range<usize>>) -> Result<Vec<f32>> {
        let arch = &self.p.arch;
        let mut ctx = vec![0.0f32; self.layout.rows() * arch.attn_dim()];
        ops::attention_forward(&qkv, self.layout, arch, arch.scores(index), &mut ctx)?;
        self.layer()?.qkv = qkv;
        Ok(ctx)
    }

    fn attention_out(&mut self, ctx: Vec<f32>, l: &LayerTensors<Range<usize>>) -> Result<Vec<f32>> {
        let arch = &self.p.arch;
        let out = self.project(&ctx, &l.attn_out.0, (arch.attn_dim(), arch.dim))?;
        self.layer()?.ctx = ctx;
        Ok(out)
    }

    fn mlp(&mut self, h: Vec<f32>, l: &LayerTensors<Range<usize>>) -> Result<Vec<f32>> {
        let (d, inter) = (self.p.arch.dim, self.p.arch.inner);
        let pre = self.linear(&h, &l.up, (d, inter))?;
        let (gate, mid) = match (self.p.arch.mlp, &l.gate) {
            (Mlp::Plain(act), _) => {
                let mut mid = vec![0.0f32; pre.len()];
                ops::gelu_forward(&pre, act, &mut mid);
                (None, mid)
            }
            (mlp @ (Mlp::SwiGlu | Mlp::GeGlu), Some(g)) => {
                let gate = self.linear(&h, g, (d, inter))?;
                let mid =
                    if mlp == Mlp::SwiGlu { ops::swiglu_forward(&gate, &pre) } else { ops::geglu_forward(&gate, &pre) };
                (Some(gate), mid)
            }
            (Mlp::SwiGlu | Mlp::GeGlu, None) => {
                return Err(LmError::Input("internal: a gated MLP without its gate".into()));
            }
        };
        let out = self.project(&mid, &l.down.0, (inter, d))?;
        let a = self.layer()?;
        (a.h2, a.pre, a.gate, a.mid) = (h, pre, gate, mid);
        Ok(out)
    }

    fn copy(&mut self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn recycle(&mut self, _: Vec<f32>) -> Result<()> {
        Ok(())
    }

    fn residual(
        &mut self,
        x: &mut Vec<f32>,
        (mut a, ba): (Vec<f32>, Option<&Range<usize>>),
        b: Option<(Vec<f32>, Option<&Range<usize>>)>,
    ) -> Result<()> {
        if let Some(bias) = ba {
            crate::ops::bias_act(&mut a, self.p.t(bias), None);
        }
        match b {
            Some((mut b, bb)) => {
                if let Some(bias) = bb {
                    crate::ops::bias_act(&mut b, self.p.t(bias), None);
                }
                crate::ops::residual(x, &a, Some(&b));
            }
            None => crate::ops::residual(x, &a, None),
        }
        Ok(())
    }
}

/// A norm's input and statistics (`mean` empty for RMSNorm).
#[derive(Debug, Default)]
pub(super) struct NormRecord {
    pub(super) x: Vec<f32>,
    pub(super) mean: Vec<f32>,
    pub(super) rstd: Vec<f32>,
}

/// What one layer's forward keeps for its backward.
#[derive(Debug, Default)]
pub(super) struct LayerActs {
    /// The attention norm: before the attention (its input is the stream entering the layer), or after
    /// it (post-norm placement: its input is the attention's output).
    pub(super) norm1: NormRecord,
    /// The norms after the attention and after the MLP (sandwich placement).
    pub(super) post1: NormRecord,
    pub(super) post2: NormRecord,
    pub(super) h1: Vec<f32>,
    /// The projection before its q/k norms, and their statistics (query groups, key groups).
    pub(super) qk_norm: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    pub(super) qkv: Vec<f32>,
    pub(super) ctx: Vec<f32>,
    /// The MLP norm (its input: the stream entering the layer with a parallel residual, the stream
    /// after the attention with a sequential one).
    pub(super) norm2: NormRecord,
    pub(super) h2: Vec<f32>,
    /// The up projection's output (before the activation of a plain MLP).
    pub(super) pre: Vec<f32>,
    /// The gate projection's output (gated MLPs).
    pub(super) gate: Option<Vec<f32>>,
    pub(super) mid: Vec<f32>,
}

/// A forward pass's saved state.
#[derive(Debug)]
pub(super) struct Activations {
    pub(super) layout: Layout,
    pub(super) tokens: Vec<u32>,
    pub(super) rotary: ops::Rotary,
    pub(super) local: Option<ops::Rotary>,
    pub(super) layers: Vec<LayerActs>,
    pub(super) final_norm: NormRecord,
    pub(super) hf: Vec<f32>,
}
