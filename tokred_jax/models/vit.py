"""The LLaVA vision towers: CLIP (CLS token, pre-LN, quick_gelu) and SigLIP (neither).

Both are pre-LN ViTs with the same encoder layer; they differ only in their
embeddings, so one module serves both, switched by `VisionConfig.kind`.
Hidden states are indexed as Hugging Face does: 0 is the embedding output (after
CLIP's pre-LN), i the output of layer i. The tower runs only the `num_layers_run`
layers needed for the selected feature layer.

Token reduction hooks in here at two places: ToMe merges tokens between the attention
and the MLP of every layer (with proportional attention: log token size added to the
attention logits), and AIM reads the keys the LAST layer would compute, as its
similarity metric. MustDrop splits the tower in two (`window_merge_stage`,
`after_window_merge`): its window merge after layer 0 sets a data-dependent length,
which the caller may cut to a bucketed capacity in between.
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from tokred_jax.core import sharding, tokens
from tokred_jax.methods import mustdrop
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
    p = self.cfg.patch_size
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

  def with_tome(self, pixels, capacities: tuple[int, ...], merge_r):
    """The tower with ToMe: layer i merges `merge_r[i]` (traced i32) token pairs
    between its attention and its MLP, by the similarity of its head-mean keys, with a
    size-weighted mean; attention adds log(size) to each key's logits. `capacities[i]`
    is the static token capacity entering layer i+1. The CLS token is never merged.

    Returns the TokenSet of the selected hidden state (CLS in slot 0 if the tower has
    one), with `sources` over the N tower tokens.
    """
    ts = tokens.from_features(self.embed(pixels))
    for i, layer in enumerate(self.layers[:self.num_layers_run]):
      x, k = layer.attention_block(ts.features, tokens.proportional_attention_bias(ts.sizes, ts.valid))
      metric = jnp.mean(k.astype(jnp.float32), axis=2)
      merged = tokens.bipartite_merge(ts._replace(features=x), metric, merge_r[i],
                                      weighted=True, protect_first=self.cfg.has_cls)
      ts = tokens.compact(merged, capacities[i])
      ts = ts._replace(features=sharding.constrain(layer.mlp_block(ts.features),
                                                   sharding.STREAM))
    return ts

  def window_merge_stage(self, pixels, window: int, threshold):
    """Embedding, layer 0 and MustDrop's window merge of the patch tokens.

    Returns (CLS hidden state f32[B, 1, D], the merged patches: a TokenSet of length P
    with the valid tokens a prefix, see `mustdrop.window_merge`). threshold may be traced.
    """
    x = sharding.constrain(self.layers[0](self.embed(pixels)), sharding.STREAM)
    grid = math.isqrt(self.cfg.num_patches)
    ts = mustdrop.window_merge(tokens.from_features(x[:, 1:]), grid, window, threshold)
    return x[:, :1], ts

  def after_window_merge(self, cls, ts: tokens.TokenSet, key_ratio: float):
    """Layers 1.. on CLS + the merged patches (any capacity N), then MustDrop's key set.

    Empty slots are masked as keys. The key set ranks the patches by the CLS row of
    the tower's LAST layer, run on the feature layer's output (LLaVA's -2); only that
    row's logits are computed.

    Returns (the patch tokens at the feature layer, a TokenSet of length N; key tokens
    bool[B, N]).
    """
    valid = jnp.concatenate([jnp.ones_like(ts.valid[:, :1]), ts.valid], axis=1)
    x = jnp.concatenate([cls, ts.features.astype(cls.dtype)], axis=1)
    # Finite, as tokens.py's masks: exp() of it is exactly 0.
    bias = jnp.where(valid, 0.0, -1e30)
    for layer in self.layers[1:self.num_layers_run]:
      x = sharding.constrain(layer.mlp_block(layer.attention_block(x, bias)[0]),
                             sharding.STREAM)
    last = self.layers[-1]
    h = last.ln1(x)
    attention = mustdrop.cls_attention(last.attn.q(h[:, 0]), last.attn.k(h), valid)
    key = mustdrop.key_tokens(attention[..., 1:], ts.valid, key_ratio)
    features = jnp.where(ts.valid[..., None], x[:, 1:], jnp.zeros((), x.dtype))
    return ts._replace(features=features), key

  def last_layer_keys(self, hidden):
    """AIM's merge metric: the keys the tower's last layer computes from `hidden`
    (the input of that layer), heads concatenated: f32[B, N, D]."""
    k = self.layers[-1].keys(hidden)
    return k.reshape(k.shape[:2] + (-1,))
