"""Checks shared by every attention-row scorer (FastV's last row, PageRank's full rows,
MustDrop's text rows and CLS row).

Axis letters as in models/layers.py: B batch, T query rows, S keys, H query heads,
K key/value heads, h head dim.
"""

from __future__ import annotations

import jax


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
