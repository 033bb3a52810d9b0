"""The LLaVA vision towers: CLIP (CLS token, pre-LN, quick_gelu) and SigLIP (neither).

Both are pre-LN ViTs with the same encoder layer; they differ only in their
embeddings, so one module serves both, switched by `VisionConfig.kind`.
Hidden states are indexed as Hugging Face does: 0 is the embedding output (after
CLIP's pre-LN), i the output of layer i. The tower runs only the `num_layers_run`
layers needed for the selected feature layer.

Token reduction hooks in around every layer run (`run_layers`, the plan's
`vision_layer` hooks): a stage may merge between a layer's attention and its MLP (ToMe),
or change the token set after a layer (MustDrop's window merge); once the set may hold
empty slots (`Run.vision_masked`), attention masks them.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from tokred_jax.core import sharding, tokens
from tokred_jax.models import layers
from tokred_jax.models.config import VisionConfig


class Attention(nn.Module):
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    heads = (self.cfg.num_heads, self.cfg.head_dim)
    self.q = layers.dense(heads, dtype=self.dtype)
    self.k = layers.dense(heads, dtype=self.dtype)
    self.v = layers.dense(heads, dtype=self.dtype)
    self.o = layers.dense(self.cfg.hidden_size, axis=(-2, -1), dtype=self.dtype)

  def __call__(self, x, bias=None):
    """x: f32[B, N, D]; bias: f32[B, N] added to every query's logit for key n (ToMe's
    proportional attention) -> (f32[B, N, D], keys f32[B, N, H, h])."""
    q, k, v = self.q(x), self.k(x), self.v(x)
    if bias is None:
      out = layers.attend(q, k, v, mask=None)
    else:
      out = jax.nn.dot_product_attention(q, k, v, bias=bias[:, None, None, :].astype(q.dtype))
    return self.o(out), k


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

  def setup(self):
    eps = self.cfg.layer_norm_eps
    self.ln1 = nn.LayerNorm(eps, dtype=jnp.float32)
    self.attn = Attention(self.cfg, self.dtype)
    self.ln2 = nn.LayerNorm(eps, dtype=jnp.float32)
    self.mlp = MLP(self.cfg, self.dtype)

  def attention_block(self, x, bias=None):
    """x + attention: (f32[B, N, D], keys f32[B, N, H, h])."""
    h, k = self.attn(self.ln1(x), bias)
    return x + h.astype(x.dtype), k

  def mlp_block(self, x):
    return x + self.mlp(self.ln2(x)).astype(x.dtype)

  def keys(self, x):
    """The keys this layer would compute for input x: f32[B, N, H, h]."""
    return self.attn.k(self.ln1(x))

  def __call__(self, x):
    return self.mlp_block(self.attention_block(x)[0])


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
    p, side = self.cfg.patch_size, self.cfg.grid * self.cfg.patch_size
    pixels = pixels[:, :side, :side]  # as the stride-p convolution, which ignores the rest
    patches = einops.rearrange(pixels, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
    x = self.patch_embed(patches.astype(self.dtype))
    if self.cfg.has_cls:
      cls = jnp.broadcast_to(self.cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embed.astype(x.dtype)
    if self.cfg.has_cls:
      x = self.pre_ln(x)
    return sharding.constrain(x, sharding.STREAM)

  def __call__(self, pixels):
    x = self.embed(pixels)
    for layer in self.layers[:self.num_layers_run]:
      x = sharding.constrain(layer(x), sharding.STREAM)
    if self.is_initializing():  # create every parameter, also those LLaVA never reads
      y = x
      for layer in self.layers[self.num_layers_run:]:
        y = layer(y)
      self.post_ln(y)
    return x

  def run_layers(self, ts: tokens.TokenSet, run, start: int, stop: int) -> tokens.TokenSet:
    """Layers start..stop−1 on a token set (features f32[B, N, D]), each wrapped by the
    plan's `vision_layer` hooks (see models/hooks.py)."""
    for index in range(start, stop):
      layer = self.layers[index]
      step = run.around("vision_layer", lambda ts, layer=layer: self.layer_step(layer, ts, run),
                        index, layer)
      ts = step(ts)
    return ts

  @staticmethod
  def layer_step(layer: EncoderLayer, ts: tokens.TokenSet, run, bias=None) -> tokens.TokenSet:
    """One layer on a token set; empty slots are masked as keys when the set may hold
    some (`run.vision_masked`) or by `bias` f32[B, N] (added to every query's logits)."""
    if bias is None and run.vision_masked:
      bias = jnp.where(ts.valid, 0.0, -1e30)  # finite, as tokens.py's masks
    x, _ = layer.attention_block(ts.features, bias)
    return ts._replace(features=sharding.constrain(layer.mlp_block(x), sharding.STREAM))
