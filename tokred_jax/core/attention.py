"""The attention logits every attention-row scorer starts from (FastV's last row,
PageRank's full rows, MustDrop's text rows and CLS row), computed once here.

Axis letters as in models/layers.py: B batch, T query rows, S keys, H query heads,
K key/value heads, h head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_grouped_heads(q: jax.Array, k: jax.Array) -> int:
  """Checks queries q: [B, T, H, h] against keys k: [B, S, K, h] with H % K == 0 (query
  head i reads kv head i // (H / K)); returns K."""
  b, _, num_heads, head_dim = q.shape
  if k.ndim != 4 or k.shape[0] != b or k.shape[3] != head_dim:
    raise ValueError(f"keys {k.shape} do not match queries {q.shape}: expected "
                     f"[{b}, S, K, {head_dim}].")
  num_kv = k.shape[2]
  if num_heads % num_kv:
    raise ValueError(f"{num_heads} query heads do not group evenly over {num_kv} kv heads.")
  return num_kv


def grouped_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """Attention logits q·kᵀ (unscaled) of query rows over keys, in float32 at the
  highest matmul precision (the scorers compare these with thresholds or sharpen them).

  q: f32[B, T, H, h] (every row, or the text rows); k: f32[B, S, K, h] with H % K == 0,
  query head i reading kv head i // (H / K). Returns f32[B, H, T, S].
  """
  b, t, num_heads, head_dim = q.shape
  num_kv = check_grouped_heads(q, k)
  q32 = q.astype(jnp.float32).reshape(b, t, num_kv, num_heads // num_kv, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q32, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return logits.reshape(b, num_heads, t, k.shape[1])


def row_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """`grouped_logits` of one query row per sample (the last token's, CLS's), as one
  matrix-vector product per head: q f32[B, H, h], k f32[B, S, K, h] -> f32[B, H, S]."""
  b, num_heads, head_dim = q.shape
  num_kv = check_grouped_heads(q[:, None], k)
  q32 = q.astype(jnp.float32).reshape(b, num_kv, num_heads // num_kv, head_dim)
  logits = jnp.einsum("bkgd,bskd->bkgs", q32, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return logits.reshape(b, num_heads, k.shape[1])
