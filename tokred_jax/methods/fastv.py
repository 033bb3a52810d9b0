"""FastV: prune the visual tokens the last token ignores, once, early in the LLM.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024 (arXiv
2403.06764); official code pkunlp-icler/FastV. METHODS.md §4 states the semantics.

K counts layers, not 0-based indices, as in the paper's FLOPs formula and the official
code: the first K layers (0 .. K−1) see every visual token, the attention of layer K−1
ranks them, and layers K .. L−1 see the top (1 − R). The default K = 2 is the title's
"after layer 2".

Axis letters as in layers.py: B batch, T tokens, H query heads, K key/value heads,
h head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from tokred_jax.core import attention
from tokred_jax.methods import prune
from tokred_jax.methods.base import Recipe, check_retention
from tokred_jax.models.config import ConfigError, LlavaConfig

# Presets (paper and official scripts): prune after 2 layers, drop half the visual tokens.
FASTV_K = 2
FASTV_R = 0.5


def last_token_scores(q_last: jax.Array, k: jax.Array, key_valid: jax.Array) -> jax.Array:
  """Head-mean softmax attention that the last query gives each key.

  Only this 1×T row of attention is computed (float32). The causal mask is trivially
  met by the last token; invalid keys (padding, pruned slots) are left out of the
  softmax, so the valid weights of each head sum to 1.

  Args:
    q_last: f32[B, H, h] post-RoPE query of the last VALID token of each sequence (with
      left padding, the last slot; with right padding the caller must gather it).
    k: f32[B, T, K, h] post-RoPE keys, H % K == 0 (head i reads kv head i // (H / K)).
    key_valid: bool[B, T] keys the last token may attend to.

  Returns:
    f32[B, T]: mean over heads of the attention weights, in [0, 1], for valid keys;
    -inf for invalid keys (all -inf when no key is valid), so a top-k over the result
    never picks a masked slot.
  """
  logits = attention.row_logits(q_last, k) / math.sqrt(q_last.shape[-1])
  weights = jax.nn.softmax(logits, axis=-1, where=key_valid[:, None, :])  # [B, H, T]
  return jnp.where(key_valid, jnp.mean(weights, axis=1), -jnp.inf)


def layer_ratios(num_layers: int, k: int = FASTV_K, r: float = FASTV_R) -> tuple[float, ...]:
  """The fraction of visual tokens each LLM layer processes under FastV.

  Layers 0 .. k−1 see all of them (ratio 1); the attention of layer k−1 scores them;
  layers k .. L−1 see (1 − r). E.g. (32, 2, 0.5): 1, 1, then 0.5 for layers 2-31.

  Args:
    num_layers: LLM depth L.
    k: how many layers run before pruning, 1 <= k < num_layers (pruning needs one
      layer's attention; k = L would prune nothing).
    r: fraction of visual tokens dropped, 0 <= r <= 1. r = 1 is allowed: layers k ..
      L−1 then see no visual token, as AIM's last layers do.

  Returns:
    One float per layer, non-increasing, starting at 1.
  """
  if num_layers < 2:
    raise ValueError(f"FastV needs num_layers >= 2 (one layer to score, one to prune); "
                     f"got {num_layers}.")
  if not 1 <= k < num_layers:
    raise ValueError(f"FastV needs 1 <= k < num_layers: k layers run before pruning and "
                     f"the attention of layer k-1 scores the tokens; got k={k}, "
                     f"num_layers={num_layers}.")
  if not 0 <= r <= 1:
    raise ValueError(f"FastV drop ratio r must lie in [0, 1], got {r}.")
  return tuple(1.0 if layer < k else 1.0 - r for layer in range(num_layers))


@dataclasses.dataclass(frozen=True)
class LastTokenPlan(prune.PrunePlan):
  name: ClassVar[str] = "FastV"

  def score(self, run, stream, q, k, count):
    return last_token_scores(q[:, -1], k, stream.keys_valid)

  def scorer_flops(self, cfg, num_tokens):
    return 2 * num_tokens * cfg.text.num_heads * cfg.text.head_dim  # one row of logits


@dataclasses.dataclass(frozen=True)
class LastToken(prune.Prune):
  """FastV's pruning: layer ℓ keeps ⌊N_v · ratios[ℓ]⌋ visual tokens, ranked by the last
  token's attention in layer ℓ − 1 (`layer_ratios` makes FastV's (K, R) schedule)."""
  name: ClassVar[str] = "FastV"
  plan_class: ClassVar[type] = LastTokenPlan


def build(cfg: LlavaConfig, retention: float | None = None, k: int = FASTV_K,
          r: float = FASTV_R, mode: str = "fast") -> Recipe:
  """FastV: layers 0..k−1 see every visual token; layer k−1's last-token attention
  drops the fraction r for the rest. With `retention`, r is solved from
  (k + (L − k)(1 − r)) / L = retention."""
  n_layers = cfg.text.num_layers
  if retention is not None:
    check_retention(retention)
    r = 1 - (retention * n_layers - k) / (n_layers - k)
    if r > 1:
      raise ConfigError(f"FastV with k={k} keeps every visual token in its first {k} of "
                        f"{n_layers} layers, so it cannot retain less than "
                        f"{k / n_layers:.3f} on average; ask for more or lower k.")
    r = max(r, 0.0)
  try:
    ratios = layer_ratios(n_layers, k, r)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return Recipe((LastToken(ratios),), "fastv", mode)
