"""Building blocks shared by the vision tower and the decoder.

Axis letters used in shapes throughout the package:
  B batch, T query tokens, S key/value tokens, N image-tower tokens, D model width,
  F MLP width, H query heads, K key/value heads, h head dim, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; choose from {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class RMSNorm(nn.Module):
  """Llama's RMSNorm, computed in float32 whatever the activation dtype."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale * x32).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, half-split ("rotate_half") convention.

  x: f32[B, T, H, h]; positions: i32[B, T] (original positions, so pruned sequences keep
  the rotation each token had in the full sequence).
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, h/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Softmax attention on the fused path; grouped-query heads need no repeat.

  q: f32[B, T, H, h]; k, v: f32[B, S, K, h] with H % K == 0; mask: bool[B, T, S] or None.
  Returns f32[B, T, H, h]. A fully masked row (a padding query) gets uniform weights
  rather than NaN, and its output is never read.
  """
  if q.shape[1] == 1:
    return _attend_one_row(q, k, v, mask)
  if mask is not None:
    mask = mask[:, None, :, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _attend_one_row(q, k, v, mask):
  """`attend` for one query row (a decode step) as a multiply-and-reduce over the cache,
  in float32, which XLA fuses into one pass over the keys and one over the values. As
  matrix products it is, per sample and KV head, an [H/K, h] x [h, S] product, which
  XLA:CPU ran at about 5 GFLOP/s: a decode step of benchmarks.hf_speed's mid model at
  batch 8 took 91 ms that way and takes 55 ms this way."""
  b, _, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  q32 = q.astype(jnp.float32).reshape(b, 1, num_kv, num_heads // num_kv, head_dim)
  scores = jnp.sum(q32 * k.astype(jnp.float32)[:, :, :, None, :], -1) * head_dim ** -0.5
  if mask is not None:  # scores: [B, S, K, H/K]
    scores = jnp.where(mask[:, 0, :, None, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=1)
  out = jnp.sum(weights[..., None] * v.astype(jnp.float32)[:, :, :, None, :], 1)
  return out.reshape(b, 1, num_heads, head_dim).astype(q.dtype)


def causal_mask(valid: jax.Array) -> jax.Array:
  """valid: bool[B, T] -> bool[B, T, T]: query t sees valid keys at indices <= t.

  Causality is by index, not position id: reduced sequences stay in original order.
  """
  t = valid.shape[1]
  return jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]


def dense(features, *, axis=-1, use_bias=True, dtype=jnp.float32, name=None):
  """A DenseGeneral with float32 master weights and `dtype` compute."""
  return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=dtype,
                         param_dtype=jnp.float32, name=name)
