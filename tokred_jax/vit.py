"""The LLaVA vision towers: CLIP (CLS token, pre-LN, quick_gelu) and SigLIP (neither).

Both are pre-LN ViTs with the same encoder layer; they differ only in their
embeddings, so one module serves both, switched by `VisionConfig.kind`.
Hidden states are indexed as Hugging Face does: 0 is the embedding output (after
CLIP's pre-LN), i the output of layer i. The tower runs only the `num_layers_run`
layers needed for the selected feature layer.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from tokred_jax import layers, sharding
from tokred_jax.config import VisionConfig


class Attention(nn.Module):
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: f32[B, N, D] -> f32[B, N, D]; full (bidirectional) attention."""
    heads = (self.cfg.num_heads, self.cfg.head_dim)
    q = layers.dense(heads, dtype=self.dtype, name="q")(x)
    k = layers.dense(heads, dtype=self.dtype, name="k")(x)
    v = layers.dense(heads, dtype=self.dtype, name="v")(x)
    out = layers.attend(q, k, v, mask=None)
    return layers.dense(self.cfg.hidden_size, axis=(-2, -1), dtype=self.dtype, name="o")(out)


class MLP(nn.Module):
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.dense(self.cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
    h = layers.activation(self.cfg.hidden_act)(h)
    return layers.dense(self.cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    ln = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32, name=name)
    x = x + Attention(cfg, self.dtype, name="attn")(ln("ln1")(x)).astype(x.dtype)
    return x + MLP(cfg, self.dtype, name="mlp")(ln("ln2")(x)).astype(x.dtype)


class VisionTower(nn.Module):
  """pixels f32[B, S, S, C] (NHWC, normalised) -> hidden state f32[B, N, D]."""
  cfg: VisionConfig
  num_layers_run: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.cfg
    self.patch_embed = layers.dense(cfg.hidden_size, use_bias=cfg.kind == "siglip",
                                    dtype=self.dtype)
    if cfg.has_cls:
      self.cls = self.param("cls", nn.initializers.normal(0.02), (cfg.hidden_size,))
      self.pre_ln = nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32)
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                (cfg.seq_len, cfg.hidden_size))
    self.layers = [EncoderLayer(cfg, self.dtype) for _ in range(cfg.num_layers)]
    self.post_ln = nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32)

  def embed(self, pixels):
    """pixels f32[B, S, S, C] -> f32[B, N, D], N = patches (+1 CLS, first)."""
    p = self.cfg.patch_size
    patches = einops.rearrange(pixels, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
    x = self.patch_embed(patches.astype(self.dtype))
    if self.cfg.has_cls:
      cls = jnp.broadcast_to(self.cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embed.astype(x.dtype)
    if self.cfg.has_cls:
      x = self.pre_ln(x)
    return x

  def __call__(self, pixels):
    x = sharding.constrain(self.embed(pixels), sharding.STREAM)
    for layer in self.layers[:self.num_layers_run]:
      x = sharding.constrain(layer(x), sharding.STREAM)
    if self.is_initializing():  # create every parameter, also those LLaVA never reads
      y = x
      for layer in self.layers[self.num_layers_run:]:
        y = layer(y)
      self.post_ln(y)
    return x
