"""The decoder LLM: Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention) and Qwen2
(the same with q/k/v biases, `TextConfig.attention_bias`).

Position ids are explicit inputs everywhere, so a reduced sequence keeps the rotary
positions its tokens had in the full prompt. Every layer returns its own keys and
values; caches are per layer, so layers may hold different numbers of tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from tokred_jax.core import sharding
from tokred_jax.models import layers
from tokred_jax.models.config import TextConfig


class LayerCache(NamedTuple):
  """One layer's keys and values as a forward over the stream makes them, the layout
  scorers read. k, v: f32[B, S, K, h] (keys already rotated)."""
  k: jax.Array
  v: jax.Array


class DecodeCache(NamedTuple):
  """One layer's KV cache for decoding, each sample's KV heads in one leading axis
  (sample-major): k: f32[B·K, h, S] (keys already rotated), v: f32[B·K, S, h]. A step's
  attention reads both in memory order (`layers.attend_cache`), and the write of the
  new token stays in place at any batch size (a [B, K, ...] cache, read through a
  reshape at B = 1, was copied whole every step). S is this layer's own capacity, so
  it may differ between layers."""
  k: jax.Array
  v: jax.Array

  @classmethod
  def of(cls, cache: LayerCache) -> "DecodeCache":
    """From the [B, S, K, h] layout."""
    b, s, num_kv, head_dim = cache.k.shape
    return cls(cache.k.transpose(0, 2, 3, 1).reshape(b * num_kv, head_dim, s),
               cache.v.transpose(0, 2, 1, 3).reshape(b * num_kv, s, head_dim))

  def layer_cache(self, num_kv: int) -> LayerCache:
    """Back to the [B, S, K, h] layout."""
    bk, head_dim, s = self.k.shape
    return LayerCache(self.k.reshape(bk // num_kv, num_kv, head_dim, s).transpose(0, 3, 1, 2),
                      self.v.reshape(bk // num_kv, num_kv, s, head_dim).transpose(0, 2, 1, 3))


class Attention(nn.Module):
  cfg: TextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache: DecodeCache | None = None, write_index=None):
    """x: f32[B, T, D], positions: i32[B, T], mask: bool[B, T, S].

    Without a cache, attends over the T new tokens (S = T). With one, writes the new
    keys/values at `write_index` (i32[]) and attends over the whole cache.
    Returns (f32[B, T, D], what was attended to: a LayerCache, or with a cache the
    DecodeCache written to, the rotated queries f32[B, T, H, h]); a scoring layer hands
    the queries and keys to its scorer.
    """
    cfg = self.cfg
    proj = lambda n, name: layers.dense((n, cfg.head_dim), use_bias=cfg.attention_bias,
                                        dtype=self.dtype, name=name)
    q = layers.rope(proj(cfg.num_heads, "q")(x), positions, cfg.rope_theta)
    k = layers.rope(proj(cfg.num_kv_heads, "k")(x), positions, cfg.rope_theta)
    v = proj(cfg.num_kv_heads, "v")(x)
    if cache is None:
      new_cache = LayerCache(k, v)
      out = layers.attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    else:
      new = DecodeCache.of(LayerCache(k.astype(cache.k.dtype), v.astype(cache.v.dtype)))
      new_cache = DecodeCache(
          jax.lax.dynamic_update_slice_in_dim(cache.k, new.k, write_index, 2),
          jax.lax.dynamic_update_slice_in_dim(cache.v, new.v, write_index, 1))
      out = layers.attend_cache(q, *new_cache, mask)
    out = layers.dense(cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                       name="o")(out)
    return out, new_cache, q


class MLP(nn.Module):
  cfg: TextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = lambda n, name: layers.dense(n, use_bias=False, dtype=self.dtype, name=name)
    h = jax.nn.silu(d(self.cfg.intermediate_size, "gate")(x)) * d(self.cfg.intermediate_size,
                                                                   "up")(x)
    return d(self.cfg.hidden_size, "down")(h)


class DecoderLayer(nn.Module):
  """A pre-norm decoder layer; `has_router` adds p-MoD's router, Linear(D -> 1) with
  bias, zero-initialised, read on the layer's input."""
  cfg: TextConfig
  dtype: jnp.dtype = jnp.float32
  has_router: bool = False

  def setup(self):
    eps = self.cfg.rms_norm_eps
    self.attn_norm = layers.RMSNorm(eps)
    self.attn = Attention(self.cfg, self.dtype)
    self.mlp_norm = layers.RMSNorm(eps)
    self.mlp = MLP(self.cfg, self.dtype)
    if self.has_router:
      self.router = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                             kernel_init=nn.initializers.zeros)

  def attention_block(self, x, positions, mask, cache=None, write_index=None):
    """x + attention: (f32[B, T, D], LayerCache, rotated queries f32[B, T, H, h])."""
    h, new_cache, q = self.attn(self.attn_norm(x), positions, mask, cache, write_index)
    return x + h.astype(x.dtype), new_cache, q

  def mlp_branch(self, h):
    """The MLP branch alone, without the residual: f32[B, T, D]."""
    return self.mlp(self.mlp_norm(h)).astype(h.dtype)

  def route(self, x):
    """Router logits f32[B, T] for the layer input x (p-MoD)."""
    return self.router(x.astype(jnp.float32))[..., 0]

  def __call__(self, x, positions, mask, cache=None, write_index=None):
    if self.has_router and self.is_initializing():  # a dense call still creates it
      self.route(x)
    h, new_cache, q = self.attention_block(x, positions, mask, cache, write_index)
    return h + self.mlp_branch(h), new_cache, q


# Rematerialised layers: every entry point a forward uses (the dense call, and the
# attention block and MLP branch a p-MoD layer calls on its routed tokens) is wrapped in
# jax.checkpoint, so the backward recomputes their insides instead of storing them.
# Parameter names do not change.
RematDecoderLayer = nn.remat(DecoderLayer, methods=["__call__", "attention_block",
                                                    "mlp_branch"])


class Decoder(nn.Module):
  """Token embedding, the layer stack, the final norm and the LM head. With `remat`,
  each layer's activations are recomputed in the backward pass (`RematDecoderLayer`)."""
  cfg: TextConfig
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                          param_dtype=jnp.float32,
                          embedding_init=nn.initializers.normal(0.02))
    layer = RematDecoderLayer if self.remat else DecoderLayer
    self.layers = [layer(cfg, self.dtype, has_router=i in cfg.router_layers)
                   for i in range(cfg.num_layers)]
    self.final_norm = layers.RMSNorm(cfg.rms_norm_eps)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, use_bias=False, dtype=self.dtype)

  def embed_tokens(self, ids):
    """ids: i32[B, T] -> f32[B, T, D]."""
    return self.embed(ids)

  def logits(self, x):
    """x: f32[B, T, D] (after the last layer) -> f32[B, T, V], in float32."""
    x = self.final_norm(x)
    if self.cfg.tie_word_embeddings:
      return self.embed.attend(x).astype(jnp.float32)
    return self.lm_head(x).astype(jnp.float32)

  def __call__(self, x, positions, masks, caches=None, write_indices=None):
    """Runs every layer. masks: one bool[B, T, S_l] per layer (or one shared mask);
    caches / write_indices: one DecodeCache / i32[] per layer, or None for a cache-less
    forward. Returns (hidden f32[B, T, D], a LayerCache, or DecodeCache, per layer)."""
    n = self.cfg.num_layers
    masks = masks if isinstance(masks, (list, tuple)) else [masks] * n
    caches = caches if caches is not None else [None] * n
    write_indices = write_indices if write_indices is not None else [None] * n
    new_caches = []
    for layer, mask, cache, index in zip(self.layers, masks, caches, write_indices):
      x, c, _ = layer(x, positions, mask, cache, index)
      x = sharding.constrain(x, sharding.STREAM)
      new_caches.append(c)
    return x, tuple(new_caches)
