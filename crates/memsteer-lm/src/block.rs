//! The block loop, written once against a small backend interface: the CPU runtime ([`crate::cpu`]),
//! the CUDA runtime (`gpu`) and the trainer's recording backend (`train`) each implement
//! [`Backend`], and every one of them runs [`forward`].
//!
//! Operations consume the buffers they read (a backend recycles them, or, when it records for a
//! backward pass, keeps them), except the norms, which read the residual stream that continues.
//! Biases of the two projections that feed the residual stream are added by [`Backend::residual`],
//! so that a backend can fuse them with the sum.

use crate::Result;
use crate::arch::{Affine, Arch, LayerTensors, Residual, Tensors};

/// Which norm a [`Backend::norm`] call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NormSite {
    /// Before attention, in layer `.0`.
    Attention(usize),
    /// Before the MLP, in layer `.0`.
    Mlp(usize),
    /// After the attention, in layer `.0` (sandwich placement).
    AfterAttention(usize),
    /// After the MLP, in layer `.0` (sandwich placement).
    AfterMlp(usize),
    /// The final norm.
    Final,
}

/// What a backend provides: a buffer type for activations (`rows × width` of the packed batch the
/// backend was set up for), a tensor type for weights, and the operations of a block.
pub(crate) trait Backend {
    /// An activation buffer.
    type Act;
    /// A stored tensor.
    type W;

    /// Called at the start of layer `index` (a recording backend opens the layer's record here).
    fn begin_layer(&mut self, _index: usize) -> Result<()> {
        Ok(())
    }
    /// Token embeddings (plus learned positions when given): the residual stream.
    fn embed(&mut self, embed: &Self::W, positions: Option<&Self::W>) -> Result<Self::Act>;
    /// A norm of the residual stream `x`.
    fn norm(&mut self, x: &Self::Act, p: &Affine<Self::W>, site: NormSite) -> Result<Self::Act>;
    /// The fused query/key/value projection of `h`, with its bias, the per-head q/k norms when the
    /// architecture has them, and rotary positions applied.
    fn qkv(&mut self, index: usize, h: Self::Act, layer: &LayerTensors<Self::W>) -> Result<Self::Act>;
    /// Causal attention of layer `index` (the backend knows the batch's layout and any cache).
    fn attention(&mut self, index: usize, qkv: Self::Act, layer: &LayerTensors<Self::W>) -> Result<Self::Act>;
    /// The attention output projection, without its bias.
    fn attention_out(&mut self, ctx: Self::Act, layer: &LayerTensors<Self::W>) -> Result<Self::Act>;
    /// The MLP of `h`: up projection, bias, activation (gated: `silu(gate(h)) · up(h)`), down
    /// projection (without its bias).
    fn mlp(&mut self, h: Self::Act, layer: &LayerTensors<Self::W>) -> Result<Self::Act>;
    /// A copy of `x` (an operation's input that the residual stream keeps).
    fn copy(&mut self, x: &Self::Act) -> Result<Self::Act>;
    /// Gives back a buffer no operation reads any more.
    fn recycle(&mut self, x: Self::Act) -> Result<()>;
    /// `x += (a + bias_a)` and, when given, `+ (b + bias_b)` (each bias when the architecture has it).
    fn residual(&mut self, x: &mut Self::Act, a: Biased<'_, Self>, b: Option<Biased<'_, Self>>) -> Result<()>;
}

/// An activation and the bias still to be added to it.
pub(crate) type Biased<'w, B> = (<B as Backend>::Act, Option<&'w <B as Backend>::W>);

/// The forward pass of every architecture: embeddings, the blocks, the final norm; returns the final
/// hidden states.
pub(crate) fn forward<B: Backend>(arch: &Arch, w: &Tensors<B::W>, b: &mut B) -> Result<B::Act> {
    let mut x = b.embed(&w.embed, w.positions.as_ref())?;
    for (i, l) in w.layers.iter().enumerate() {
        b.begin_layer(i)?;
        if arch.residual == Residual::Sandwich {
            // Norms before and after each branch; the branch outputs are normed before they are added.
            let post = l
                .post_norms
                .as_ref()
                .ok_or_else(|| crate::LmError::Input("internal: sandwich norms missing".into()))?;
            let h = b.norm(&x, &l.norm1, NormSite::Attention(i))?;
            let qkv = b.qkv(i, h, l)?;
            let ctx = b.attention(i, qkv, l)?;
            let attn = b.attention_out(ctx, l)?;
            let normed = b.norm(&attn, &post.0, NormSite::AfterAttention(i))?;
            b.recycle(attn)?;
            b.residual(&mut x, (normed, None), None)?;
            let h = b.norm(&x, &l.norm2, NormSite::Mlp(i))?;
            let mlp = b.mlp(h, l)?;
            let normed = b.norm(&mlp, &post.1, NormSite::AfterMlp(i))?;
            b.recycle(mlp)?;
            b.residual(&mut x, (normed, None), None)?;
            continue;
        }
        if arch.residual == Residual::PostNorm {
            // The branches read the stream itself; their outputs are normed before they are added.
            let h = b.copy(&x)?;
            let qkv = b.qkv(i, h, l)?;
            let ctx = b.attention(i, qkv, l)?;
            let attn = b.attention_out(ctx, l)?;
            let normed = b.norm(&attn, &l.norm1, NormSite::Attention(i))?;
            b.recycle(attn)?;
            b.residual(&mut x, (normed, None), None)?;
            let h = b.copy(&x)?;
            let mlp = b.mlp(h, l)?;
            let normed = b.norm(&mlp, &l.norm2, NormSite::Mlp(i))?;
            b.recycle(mlp)?;
            b.residual(&mut x, (normed, None), None)?;
            continue;
        }
        let h = b.norm(&x, &l.norm1, NormSite::Attention(i))?;
        let qkv = b.qkv(i, h, l)?;
        let ctx = b.attention(i, qkv, l)?;
        let attn = b.attention_out(ctx, l)?;
        match arch.residual {
            Residual::Parallel => {
                let h = b.norm(&x, &l.norm2, NormSite::Mlp(i))?;
                let mlp = b.mlp(h, l)?;
                b.residual(&mut x, (attn, l.attn_out.1.as_ref()), Some((mlp, l.down.1.as_ref())))?;
            }
            Residual::Sequential | Residual::PostNorm | Residual::Sandwich => {
                b.residual(&mut x, (attn, l.attn_out.1.as_ref()), None)?;
                let h = b.norm(&x, &l.norm2, NormSite::Mlp(i))?;
                let mlp = b.mlp(h, l)?;
                b.residual(&mut x, (mlp, l.down.1.as_ref()), None)?;
            }
        }
    }
    b.norm(&x, &w.final_norm, NormSite::Final)
}
