"""DART: prune the visual tokens that duplicate a few pivot tokens, once, early in the LLM.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025 (arXiv 2502.11494); official code ZichenWen1/DART,
`get_retained_image_token` in llava/model/language_model/modeling_llama_self.py, called
at prefill just before decoder layer K runs. What that code does (batch size 1):

- Tensors: the OUTPUT hidden states of layer K−1 passed through the model's FINAL
  RMSNorm (`self.norm`, learned scale included), and the keys of layer K−1 after RoPE
  (all heads concatenated to one vector per token; a patched decoder layer returns them,
  as the repo's Qwen2.5-VL file shows, and LightCompress's port reads the KV cache). No
  attention map is needed. It runs at prefill only; layers 0 .. K−1 cache every token.
- Pivots: the `pivot_image_token` image tokens with the largest L1 norm of their keys,
  and the `pivot_text_token` text tokens AFTER the image (question and assistant prefix)
  with the largest L1 key norm. The system prompt before the image is never a pivot.
- For each pivot in turn, the TOKEN_TOPK = budget // (number of pivots) image tokens
  least cosine-similar to it (on the normed hidden states) are kept and leave the
  candidate pool; image pivots are kept and never candidates. Text pivots only choose
  tokens; text is never pruned. So `budget` 128 keeps 4 + 8·16 = 132 visual tokens.
- The kept slots are sorted: the stream keeps its original order and position ids.
- Order and ties: pivots are visited in the iteration order of a Python set of their
  sequence positions (a CPython hashing detail); `torch.topk` breaks ties arbitrarily.
  Here pivots go image first, then text, each by descending key norm (the order the
  code lists them in), and every tie goes to the lower slot.

The final norm's per-token 1/rms factor cancels in a cosine, so only its scale vector is
needed (`norm_scale`). A `count` that is not P_img + P·m (which the official code cannot
produce) hands the remainder to the first pivots, one token each, so exactly `count`
visual tokens are kept.

As a method (`Duplication`, the shared prune stage with this scorer; `build`): layers
0 .. K−1 see every visual token, and after layer K−1 the stream keeps DART's set of the
count the plan traces for layer K, in original order (fast mode gathers it, reference
mode masks the rest, as the official code's indexing does on the text's outputs).

Axis letters as in models/layers.py: B batch, T tokens, D model width, K key/value heads,
h head dim; P pivots.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from tokred_jax.core import tokens
from tokred_jax.methods import prune
from tokred_jax.methods.base import Recipe, check_retention
from tokred_jax.models.config import ConfigError, LlavaConfig

# Presets (official LLaVA-1.5 scripts): prune before layer 2 (scores from layer 1's
# output and keys), 4 image + 4 text pivots, 576 visual tokens; budget 128 by default.
DART_K = 2
DART_BUDGET = 128
DART_IMAGE_PIVOTS = 4
DART_TEXT_PIVOTS = 4
DART_VISUAL_TOKENS = 576
# The paper's LLaVA-1.5 settings: budget (`max_num_trunction`) -> reduction ratio as
# the scripts pass it (the LLaVA-1.5 code path does not read the ratio).
DART_BUDGETS = {192: 0.667, 128: 0.778, 64: 0.889}

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_pivots(num_image_pivots, num_text_pivots) -> None:
  for name, n in (("num_image_pivots", num_image_pivots), ("num_text_pivots", num_text_pivots)):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
      raise ConfigError(f"DART {name} must be an int >= 0, got {n!r}.")
  if num_image_pivots + num_text_pivots < 1:
    raise ConfigError("DART needs at least one pivot: set num_image_pivots or "
                      "num_text_pivots to 1 or more.")


def official_keep_count(budget: int, num_image_pivots: int = DART_IMAGE_PIVOTS,
                        num_text_pivots: int = DART_TEXT_PIVOTS) -> int:
  """Visual tokens the official code keeps for `max_num_trunction` = budget:
  the image pivots plus budget // P per pivot (P = all pivots), e.g. 128 -> 132."""
  _check_pivots(num_image_pivots, num_text_pivots)
  if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)) \
      or budget < 0:
    raise ConfigError(f"DART budget must be an int >= 0, got {budget!r}.")
  pivots = num_image_pivots + num_text_pivots
  return num_image_pivots + pivots * (budget // pivots)


def key_norms(k: jax.Array) -> jax.Array:
  """L1 norm of each token's rotated keys over all heads: k f32[B, T, K, h] -> f32[B, T].
  (Repeating kv heads, as the official Llama does, scales every norm alike.)"""
  return jnp.sum(jnp.abs(k.astype(jnp.float32)), axis=(2, 3))


def _top_slots(norms: jax.Array, ok: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """The n slots with the largest norm among `ok` (ties: lower slot), and whether each
  exists: (i32[B, n], bool[B, n])."""
  b, t = ok.shape
  iota = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  neg = -jnp.where(ok, norms, 0.0)
  _, _, ranked = jax.lax.sort(((~ok).astype(jnp.int32), neg, iota), num_keys=3)
  top = ranked[:, :n]
  return top, jnp.take_along_axis(ok, top, axis=1)


def select_pivots(norms: jax.Array, image_ok: jax.Array, text_ok: jax.Array,
                  num_image_pivots: int, num_text_pivots: int) -> tuple[jax.Array, jax.Array]:
  """Image pivots then text pivots, each by descending key norm.

  norms: f32[B, T] (key_norms); image_ok / text_ok: bool[B, T] the slots that may be
  image / text pivots. Returns (index i32[B, P], ok bool[B, P]), P = num_image_pivots +
  num_text_pivots; ok is False where a row has fewer candidates than pivots asked for.
  """
  _check_pivots(num_image_pivots, num_text_pivots)
  t = norms.shape[1]
  parts = [_top_slots(norms, m, min(n, t))
           for m, n in ((image_ok, num_image_pivots), (text_ok, num_text_pivots)) if n]
  return (jnp.concatenate([p[0] for p in parts], axis=1),
          jnp.concatenate([p[1] for p in parts], axis=1))


def duplication_scores(x: jax.Array, k: jax.Array, visual: jax.Array, valid: jax.Array,
                       count, *, num_image_pivots: int = DART_IMAGE_PIVOTS,
                       num_text_pivots: int = DART_TEXT_PIVOTS,
                       text_ok: jax.Array | None = None,
                       norm_scale: jax.Array | None = None) -> jax.Array:
  """DART as a scorer: the top `count` visual tokens by score are DART's kept set.

  x: f32[B, T, D] output hidden states of layer K−1 (before any norm); k: f32[B, T, K, h]
  that layer's rotated keys; visual, valid: bool[B, T] (live visual = visual & valid);
  count: int, i32[] or i32[B], visual tokens to keep (clamped to the live ones; use
  `official_keep_count` for the official numbers); text_ok: bool[B, T] text slots that
  may be pivots (default: valid text after the row's last live visual slot, as the
  official code takes the text after the image); norm_scale: f32[D] the final RMSNorm's
  scale (default: ones).
  Returns f32[B, T]: image pivots 0, −1, … by pivot order, then each pivot's picks
  continuing downwards in pick order (least similar first), so every kept token
  outranks every other; other live visual tokens −2T − (max cosine to a pivot), below
  all kept ones; −inf for text and invalid slots. Nothing depends on invalid slots.
  """
  b, t, d = x.shape
  _check_pivots(num_image_pivots, num_text_pivots)
  if k.ndim != 4 or k.shape[:2] != (b, t):
    raise ConfigError(f"DART keys {k.shape} do not match the hidden states {x.shape}: "
                      f"expected [{b}, {t}, K, h].")
  if norm_scale is not None and norm_scale.shape != (d,):
    raise ConfigError(f"DART norm_scale must have shape ({d},), got {norm_scale.shape}.")
  c = tokens._static_int(count)
  if c is not None and c < 0:
    raise ConfigError(f"DART count must be >= 0, got {c}.")
  live = visual & valid
  iota = jnp.arange(t, dtype=jnp.int32)
  if text_ok is None:
    last = jnp.max(jnp.where(live, iota, -1), axis=1, keepdims=True)
    text_ok = valid & ~visual & (iota > last)
  text_ok = text_ok & valid & ~visual
  norms = key_norms(k)
  pivot, pivot_ok = select_pivots(norms, live, text_ok, num_image_pivots, num_text_pivots)
  n_img = min(num_image_pivots, t)
  n_piv = pivot.shape[1]

  xs = x.astype(jnp.float32)
  if norm_scale is not None:
    xs = xs * norm_scale.astype(jnp.float32)
  xn = xs / jnp.maximum(jnp.linalg.norm(xs, axis=-1, keepdims=True), 1e-8)
  sim = jnp.einsum("bpd,btd->bpt", jnp.take_along_axis(xn, pivot[..., None], axis=1), xn,
                   precision=_HIGHEST)  # [B, P, T]

  rows = jnp.arange(b)[:, None]
  img_ok = pivot_ok[:, :n_img]
  is_pivot = jnp.zeros((b, t), bool).at[rows, pivot[:, :n_img]].max(img_ok)
  order = jnp.zeros((b, t), jnp.int32).at[rows, pivot[:, :n_img]].max(
      jnp.where(img_ok, jnp.arange(n_img, dtype=jnp.int32), 0))
  # Per-pivot quota: (count − image pivots) over the pivots present, remainder first.
  n_live = jnp.sum(live, axis=1)
  want = jnp.clip(jnp.broadcast_to(jnp.asarray(count, jnp.int32), (b,)), 0, n_live)
  n_img_b = jnp.sum(img_ok, axis=1)
  n_piv_b = jnp.maximum(jnp.sum(pivot_ok, axis=1), 1)
  rest = jnp.maximum(want - n_img_b, 0)
  quota, extra = rest // n_piv_b, rest % n_piv_b
  taken = is_pivot
  base = n_img_b
  for p in range(n_piv):
    avail = live & ~taken
    # Candidates by ascending similarity, ties to the lower slot; rank of each slot.
    key = jnp.where(avail, sim[:, p], jnp.inf)
    _, ranked = jax.lax.sort((key, jnp.broadcast_to(iota, (b, t))), num_keys=2)
    rank = jnp.argsort(ranked, axis=1).astype(jnp.int32)
    # Rank among present pivots decides who gets a remainder token.
    p_rank = jnp.sum(pivot_ok[:, :p], axis=1)
    q = jnp.where(pivot_ok[:, p], quota + (p_rank < extra), 0)
    pick = avail & (rank < q[:, None])
    order = jnp.where(pick, base[:, None] + rank, order)
    taken = taken | pick
    base = base + jnp.sum(pick, axis=1)
  max_sim = jnp.max(jnp.where(pivot_ok[..., None], sim, -1.0), axis=1)
  scores = jnp.where(taken, -order.astype(jnp.float32), -2.0 * t - max_sim)
  return jnp.where(live, scores, -jnp.inf)


def duplication_keep(x: jax.Array, k: jax.Array, visual: jax.Array, valid: jax.Array,
                     capacity: int, count=None, **kwargs) -> tuple[jax.Array, jax.Array]:
  """DART's kept visual slots, in original order: (index i32[B, capacity], kept
  bool[B, capacity]) as `tokens.topk_indices` gives them. count defaults to capacity;
  kwargs go to `duplication_scores`."""
  count = capacity if count is None else count
  scores = duplication_scores(x, k, visual, valid, count, **kwargs)
  return tokens.topk_indices(scores, visual & valid, capacity, count)


def text_after_image(stream) -> jax.Array:
  """bool[B, T]: the live text after the image (question and assistant prefix), by
  prompt index, since fast mode may have moved dead visual slots to the front."""
  last_visual = jnp.max(jnp.where(stream.visual, stream.index, -1), axis=1, keepdims=True)
  return stream.keys_valid & ~stream.visual & (stream.index > last_visual)


@dataclasses.dataclass(frozen=True)
class DuplicationPlan(prune.PrunePlan):
  """The prune stage with DART's scorer; num_image_pivots, num_text_pivots: static."""
  num_image_pivots: int
  num_text_pivots: int
  name: ClassVar[str] = "DART"

  def score(self, run, stream, q, k, count):
    """DART's scores (`duplication_scores`) of the stream after the scoring layer: its
    output `stream.x`, its rotated keys k f32[B, T, K, h], the final norm's scale; count:
    the visual tokens the next layer keeps (i32[] or i32[B]), which the ranking depends
    on. q is not read."""
    del q
    scale = run.model.llm.final_norm.variables["params"]["scale"]
    return duplication_scores(stream.x, k, stream.visual, stream.keys_valid, count,
                              num_image_pivots=self.num_image_pivots,
                              num_text_pivots=self.num_text_pivots,
                              text_ok=text_after_image(stream), norm_scale=scale)

  def scorer_flops(self, cfg, num_tokens):
    # The pivots' cosines with every token: [P, D] x [D, T].
    pivots = self.num_image_pivots + self.num_text_pivots
    return 2 * pivots * num_tokens * cfg.text.hidden_size


@dataclasses.dataclass(frozen=True)
class Duplication(prune.Prune):
  """DART's pruning: layer ℓ keeps ⌊N_v · ratios[ℓ]⌋ visual tokens, those that least
  duplicate the pivots of layer ℓ − 1 (`build` makes the one-step schedule)."""
  num_image_pivots: int = DART_IMAGE_PIVOTS
  num_text_pivots: int = DART_TEXT_PIVOTS
  name: ClassVar[str] = "DART"
  plan_class: ClassVar[type] = DuplicationPlan

  def plan(self, flow):
    _check_pivots(self.num_image_pivots, self.num_text_pivots)
    return super().plan(flow)

  def plan_settings(self) -> dict:
    return dict(num_image_pivots=self.num_image_pivots, num_text_pivots=self.num_text_pivots)


def build(cfg: LlavaConfig, retention: float | None = None, k: int = DART_K,
          budget: int | None = None, num_image_pivots: int = DART_IMAGE_PIVOTS,
          num_text_pivots: int = DART_TEXT_PIVOTS, mode: str = "fast") -> Recipe:
  """DART: layers 0..k−1 see every visual token; layers k.. keep the tokens that least
  duplicate the pivots of layer k−1. The count kept: `official_keep_count(budget)` for
  the official `max_num_trunction` = budget (default DART_BUDGET), or with `retention`
  solved from (k + (L − k) · keep) / L = retention, keep the fraction kept. (After an
  earlier stage that reduces, and on anyres inputs, the budget's count is a fraction of
  the model's N_v, the tokens of one crop, taken of each prompt's own count, as the
  official LLaVA-NeXT code keeps a ratio of the image's tokens.)"""
  n_layers, n_visual = cfg.text.num_layers, cfg.num_image_tokens
  _check_pivots(num_image_pivots, num_text_pivots)
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n_layers:
    raise ConfigError(f"DART needs an int k with 1 <= k < {n_layers} (layers that see every "
                      f"token; layer k-1 scores them), got k={k!r}.")
  if retention is not None and budget is not None:
    raise ConfigError("DART takes a retention level or a token budget, not both; drop one.")
  if retention is not None:
    check_retention(retention)
    keep = (retention * n_layers - k) / (n_layers - k)
    if keep < 0:
      raise ConfigError(f"DART with k={k} keeps every visual token in its first {k} of "
                        f"{n_layers} layers, so it cannot retain less than "
                        f"{k / n_layers:.3f} on average; ask for more or lower k.")
  else:
    budget = DART_BUDGET if budget is None else budget
    count = official_keep_count(budget, num_image_pivots, num_text_pivots)
    if count > n_visual:
      raise ConfigError(f"DART budget {budget} keeps {count} visual tokens, more than the "
                        f"model's {n_visual}; give a smaller budget.")
    keep = count / n_visual
  ratios = tuple(1.0 if layer < k else keep for layer in range(n_layers))
  return Recipe((Duplication(ratios, num_image_pivots, num_text_pivots),), "dart", mode)
