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
