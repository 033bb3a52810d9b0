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
  if mask is not None:
    mask = mask[:, None, :, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def attend_cache(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention over a decode cache (`decoder.DecodeCache`'s layout), in float32.

  q: f32[B, T, H, h]; k: f32[B·K, h, S]; v: f32[B·K, S, h] with H % K == 0;
  mask: bool[B, T, S]. Returns f32[B, T, H, h]. A fully masked row (a padding query)
  gets uniform weights rather than NaN, and its output is never read.

  Per sample and KV head it is two matrix products, [T·H/K, h] x [h, S] and
  [T·H/K, S] x [S, h], each reading its cache operand in memory order. On the mid model
  of benchmarks.hf_speed (XLA:CPU, batch 8) a layer's decode attention took 0.9 ms
  this way against 1.7 ms as a multiply-and-reduce over a [B, S, K, h] cache.
  """
  b, t, num_heads, head_dim = q.shape
  num_kv = k.shape[0] // b
  group = num_heads // num_kv
  # The rows of each KV head: its T x H/K queries.
  q32 = q.astype(jnp.float32).reshape(b, t, num_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
  scores = jnp.einsum("xrh,xhs->xrs", q32.reshape(b * num_kv, t * group, head_dim),
                      k.astype(jnp.float32)) * head_dim ** -0.5
  scores = jnp.where(mask[:, None, :, None], scores.reshape(b, num_kv, t, group, -1),
                     jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).reshape(b * num_kv, t * group, -1)
  out = jnp.einsum("xrs,xsh->xrh", weights, v.astype(jnp.float32))
  out = out.reshape(b, num_kv, t, group, head_dim).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, t, num_heads, head_dim).astype(q.dtype)


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
