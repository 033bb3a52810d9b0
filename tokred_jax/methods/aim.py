"""AIM: token merging before the LLM and PageRank pruning inside it.

Zhong, Liu, Li, Wang, "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and
Pruning", ICCV 2025 (arXiv 2412.03248); official code LaVi-Lab/AIM. METHODS.md §1 states
the semantics implemented here.

This part holds the method's presets, its in-LLM scorer and its pruning schedule, as pure
functions of arrays and Python ints. The scorer sees one scoring layer's post-RoPE
queries and keys and builds the full attention rows it needs in float32; the layer's
own output still comes from the fused attention path.

Axis letters as in layers.py: B batch, T tokens (queries and keys alike: prefill
self-attention), H query heads, K key/value heads, h head dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from tokred_jax.models import layers

# Presets (METHODS.md §1, the official scripts).
# Bipartite merge steps: the r tokens removed by each step, chained.
LLAVA15_MERGE_252 = (288, 36)  # 576 -> 288 -> 252 tokens per image (43.75%).
LLAVA15_MERGE_72 = (288, 144, 72)  # 576 -> 288 -> 144 -> 72 tokens per image (12.5%).
LLAVA_OV_VIDEO_MERGE_49 = (98, 49)  # Per frame after 2x2 pooling: 196 -> 98 -> 49.
# Pruning schedules (l1, l2): layers <= l1 see every visual token, layers >= l2 none.
SCHEDULE_LLAMA_32 = (13, 21)  # 32-layer Vicuna / Llama (LLaVA-1.5, LLaVA-NeXT).
SCHEDULE_QWEN2_28 = (14, 22)  # 28-layer Qwen2-7B (LLaVA-OneVision).
# PageRank over each head's sharpened attention graph.
PAGERANK_TAU = 0.1
PAGERANK_ITERATIONS = 5
PAGERANK_DAMPING = 0.0

_HIGHEST = jax.lax.Precision.HIGHEST


def pagerank_scores(q: jax.Array, k: jax.Array, query_valid: jax.Array,
                    key_valid: jax.Array, *, tau: float = PAGERANK_TAU,
                    iterations: int = PAGERANK_ITERATIONS,
                    damping: float = PAGERANK_DAMPING) -> jax.Array:
  """Each token's PageRank importance in one prefill layer's attention graph.

  Per query head h (grouped-query: head i reads kv head i // (H / K)):
    Z_h = Q_h K_hᵀ / √h_dim, restricted to key index <= query index, valid queries and
    valid keys; M_h = softmax(Z_h / tau) over keys, in float32;
    π⁰ = 1 / N_valid on valid queries (0 elsewhere);
    π ← (π M_h)(1 − damping) + damping / N_valid, `iterations` times;
    score_j = sqrt(mean_h π_{h,j}²).

  Why two masks: in reference mode (the official code's semantics) pruned tokens stay in
  the sequence as queries but are masked as keys; in fast mode they are gone; padding is
  invalid for both. A query row with no visible key (padding; or a token whose own key
  and every earlier key are masked) is all zeros: its mass leaves the walk rather than
  being spread arbitrarily. With no valid query at all, every valid key scores 0.

  Args:
    q: f32[B, T, H, h] post-RoPE queries (any float dtype; computed in float32).
    k: f32[B, T, K, h] post-RoPE keys, H % K == 0.
    query_valid: bool[B, T] tokens whose attention row carries PageRank mass.
    key_valid: bool[B, T] tokens that may be attended to (and can be ranked).
    tau: softmax temperature (> 0), applied on top of the 1/√h scaling.
    iterations: power-iteration steps (>= 0).
    damping: teleport probability in [0, 1]; the official code uses 0.
    (tau, iterations and damping are Python numbers: settings, not traced values.)

  Returns:
    f32[B, T]: scores >= 0 for valid keys and -inf for invalid ones, so a top-k over
    the result never picks a masked slot. Scores are not normalised across the batch.
  """
  b, t, num_heads, head_dim = q.shape
  num_kv = layers.check_grouped_heads(q, k)
  if not tau > 0:
    raise ValueError(f"tau must be > 0, got {tau}.")
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}.")
  if not 0 <= damping <= 1:
    raise ValueError(f"damping must lie in [0, 1], got {damping}.")

  groups = num_heads // num_kv
  q32 = q.astype(jnp.float32).reshape(b, t, num_kv, groups, head_dim)
  k32 = k.astype(jnp.float32)
  # HIGHEST: τ = 0.1 multiplies logit errors by 10, so no reduced-precision matmul passes.
  logits = jnp.einsum("btkgd,bskd->bkgts", q32, k32, precision=_HIGHEST)
  logits = logits.reshape(b, num_heads, t, t) * (1.0 / (math.sqrt(head_dim) * tau))
  causal = jnp.tril(jnp.ones((t, t), bool))
  visible = causal[None] & query_valid[:, :, None] & key_valid[:, None, :]  # [B, T, T]
  # `where` leaves masked entries at exactly 0 and fully masked rows all 0, so the
  # contents of invalid slots (even inf/NaN) never reach the walk.
  walk = jax.nn.softmax(logits, axis=-1, where=visible[:, None])  # [B, H, T, T]

  n_valid = jnp.maximum(jnp.sum(query_valid, axis=-1), 1).astype(jnp.float32)
  n_valid = n_valid[:, None, None]  # [B, 1, 1]; the max avoids 0/0 with no valid query.
  start = query_valid.astype(jnp.float32)[:, None, :] / n_valid  # [B, 1, T]
  pi = jnp.broadcast_to(start, (b, num_heads, t))

  def step(_, pi):
    moved = jnp.einsum("bhi,bhij->bhj", pi, walk, precision=_HIGHEST)
    return moved * (1.0 - damping) + damping / n_valid

  pi = jax.lax.fori_loop(0, iterations, step, pi)
  scores = jnp.sqrt(jnp.mean(jnp.square(pi), axis=1))
  return jnp.where(key_valid, scores, -jnp.inf)


def layer_ratios(num_layers: int, l1: int, l2: int) -> tuple[float, ...]:
  """The fraction of post-merge visual tokens each LLM layer processes.

  v_ℓ = 1 for ℓ <= l1, 1 − (ℓ − l1)/(l2 − l1) for l1 < ℓ < l2, 0 for ℓ >= l2. The tokens
  layer ℓ keeps are picked by the scores of layer ℓ − 1, so the scoring layers are
  l1 .. l2 − 1 (the official code scores every layer; only these change the kept set).
  E.g. Qwen2 (28, 14, 22): 1.0 for layers 0-14, 0.875 for 15, ..., 0.125 for 21, 0 from 22.

  Args:
    num_layers: LLM depth L.
    l1: last layer that sees every visual token, 0 <= l1 < l2.
    l2: first layer that sees none, l2 <= num_layers (l2 = num_layers: all layers keep
      some).

  Returns:
    One float per layer, non-increasing, starting at 1.
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
  if not 0 <= l1 < l2 <= num_layers:
    raise ValueError(f"AIM schedule needs 0 <= l1 < l2 <= num_layers; got l1={l1}, "
                     f"l2={l2}, num_layers={num_layers}.")
  return tuple(1.0 if layer <= l1 else 0.0 if layer >= l2 else
               1.0 - (layer - l1) / (l2 - l1) for layer in range(num_layers))


def kept_counts(num_visual: int, ratios: Sequence[float]) -> tuple[int, ...]:
  """⌊N_v · v_ℓ⌋ per layer: how many visual tokens each layer processes.

  Args:
    num_visual: N_v, the POST-MERGE visual-token count.
    ratios: v_ℓ per layer, each in [0, 1] (e.g. from `layer_ratios`).
  """
  if num_visual < 0:
    raise ValueError(f"num_visual must be >= 0, got {num_visual}.")
  bad = [r for r in ratios if not 0 <= r <= 1]
  if bad:
    raise ValueError(f"ratios must lie in [0, 1]; got {bad[:3]}.")
  # The epsilon keeps float noise such as 3 · (1 − 1/3) = 1.999... from losing a token.
  return tuple(math.floor(num_visual * r + 1e-9) for r in ratios)
