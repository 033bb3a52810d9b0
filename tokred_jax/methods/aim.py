"""AIM: token merging before the LLM and PageRank pruning inside it.

Zhong, Liu, Li, Wang, "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and
Pruning", ICCV 2025 (arXiv 2412.03248); official code LaVi-Lab/AIM. METHODS.md §1 states
the semantics implemented here.

Two stages: `Merge`, chained bipartite steps on the visual tokens before the LLM
(similarity of the tower's last-layer keys, or of the projected features), and
`PageRank`, pruning inside the LLM on the (l1, l2) schedule, scored by PageRank over
each head's attention graph. The scorer sees one scoring layer's post-RoPE queries and
keys and builds the attention rows it needs in float32 (the whole matrix for short
prompts, blocks of query rows for long ones); the layer's own output still comes from
the fused attention path. `build` makes the recipe from a preset or a retention level.

Axis letters as in layers.py: B batch, T tokens (queries and keys alike: prefill
self-attention), H query heads, K key/value heads, h head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from tokred_jax.core import attention, tokens
from tokred_jax.methods import prune
from tokred_jax.methods.base import Flow, Recipe, Stage, StagePlan, check_retention
from tokred_jax.models import llava_onevision
from tokred_jax.models.config import ConfigError, LlavaConfig

# Presets (METHODS.md §1, the official scripts).
# Bipartite merge steps: the r tokens removed by each step, chained.
LLAVA15_MERGE_252 = (288, 36)  # 576 -> 288 -> 252 tokens per image (43.75%).
LLAVA15_MERGE_72 = (288, 144, 72)  # 576 -> 288 -> 144 -> 72 tokens per image (12.5%).
# LLaVA-OneVision video, per frame after the projector and 2x2 pooling (196 tokens): the
# official code's r = 196 // 2 then 196 // 4 (25%), and its commented-out variants.
LLAVA_OV_VIDEO_MERGE_49 = (98, 49)  # 196 -> 98 -> 49 tokens per frame (25%).
LLAVA_OV_VIDEO_MERGE_25 = (98, 49, 24)  # -> 25 per frame (12.8%).
LLAVA_OV_VIDEO_MERGE_74 = (98, 24)  # -> 74 per frame (37.8%).
# Pruning schedules (l1, l2): layers <= l1 see every visual token, layers >= l2 none.
SCHEDULE_LLAMA_32 = (13, 21)  # 32-layer Vicuna / Llama (LLaVA-1.5, LLaVA-NeXT).
SCHEDULE_QWEN2_28 = (14, 22)  # 28-layer Qwen2-7B (LLaVA-OneVision).
# PageRank over each head's sharpened attention graph.
PAGERANK_TAU = 0.1
PAGERANK_ITERATIONS = 5
PAGERANK_DAMPING = 0.0

_HIGHEST = jax.lax.Precision.HIGHEST


# Above this many tokens the scorer walks by blocks of query rows: the full per-head
# T x T matrix of a 32-frame video (~6,300 tokens, 28 heads) is 4.4 GB per sample.
FULL_MATRIX_MAX_TOKENS = 1024
BLOCK_TARGET = 512


def pagerank_scores(q: jax.Array, k: jax.Array, query_valid: jax.Array,
                    key_valid: jax.Array, *, tau: float = PAGERANK_TAU,
                    iterations: int = PAGERANK_ITERATIONS,
                    damping: float = PAGERANK_DAMPING,
                    block_size: int | None = None) -> jax.Array:
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

  Memory: with blocks, each step recomputes M_h one block of query rows at a time (rows
  are complete within a block, so each row's softmax is exact) and accumulates π M_h,
  holding f32[B, H, block, T] instead of f32[B, H, T, T], at `iterations` times the
  logit FLOPs.

  Args:
    q: f32[B, T, H, h] post-RoPE queries (any float dtype; computed in float32).
    k: f32[B, T, K, h] post-RoPE keys, H % K == 0.
    query_valid: bool[B, T] tokens whose attention row carries PageRank mass.
    key_valid: bool[B, T] tokens that may be attended to (and can be ranked).
    tau: softmax temperature (> 0), applied on top of the 1/√h scaling.
    iterations: power-iteration steps (>= 0).
    damping: teleport probability in [0, 1]; the official code uses 0.
    block_size: query rows per block (>= 1; T is padded up to a multiple of it with
      invalid rows), or None: the full matrix for T <= FULL_MATRIX_MAX_TOKENS, else
      blocks of about BLOCK_TARGET rows (`auto_block_size`).
    (tau, iterations, damping and block_size are Python numbers: settings, not traced
    values.)

  Returns:
    f32[B, T]: scores >= 0 for valid keys and -inf for invalid ones, so a top-k over
    the result never picks a masked slot. Scores are not normalised across the batch.
  """
  b, t, num_heads, head_dim = q.shape
  attention.check_grouped_heads(q, k)
  if not tau > 0:
    raise ValueError(f"tau must be > 0, got {tau}.")
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}.")
  if not 0 <= damping <= 1:
    raise ValueError(f"damping must lie in [0, 1], got {damping}.")
  if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
    raise ValueError(f"block_size must be an int >= 1 or None, got {block_size!r}.")
  if block_size is None:
    block_size = auto_block_size(t)

  # At HIGHEST precision: τ = 0.1 multiplies logit errors by 10.
  scale = 1.0 / (math.sqrt(head_dim) * tau)
  n_valid = jnp.maximum(jnp.sum(query_valid, axis=-1), 1).astype(jnp.float32)
  n_valid = n_valid[:, None, None]  # [B, 1, 1]; the max avoids 0/0 with no valid query.
  start = query_valid.astype(jnp.float32)[:, None, :] / n_valid  # [B, 1, T]
  pi = jnp.broadcast_to(start, (b, num_heads, t))

  if block_size >= t:
    walk = _transition(q, k, jnp.arange(t), query_valid, key_valid, scale)  # [B, H, T, T]
    moved = lambda pi: jnp.einsum("bhi,bhij->bhj", pi, walk, precision=_HIGHEST)
  else:
    moved = functools.partial(_blocked_step, q=q, k=k, query_valid=query_valid,
                              key_valid=key_valid, scale=scale, block_size=block_size)

  def step(_, pi):
    return moved(pi) * (1.0 - damping) + damping / n_valid

  pi = jax.lax.fori_loop(0, iterations, step, pi)
  scores = jnp.sqrt(jnp.mean(jnp.square(pi), axis=1))
  return jnp.where(key_valid, scores, -jnp.inf)


def auto_block_size(num_tokens: int) -> int:
  """`pagerank_scores`' default: T itself (the full matrix) up to FULL_MATRIX_MAX_TOKENS,
  else ceil(T / n) for the fewest n blocks of at most BLOCK_TARGET rows, rounded up to a
  multiple of 8, so that little padding is walked (6,300 tokens: 13 blocks of 488)."""
  if num_tokens <= FULL_MATRIX_MAX_TOKENS:
    return max(num_tokens, 1)
  blocks = -(-num_tokens // BLOCK_TARGET)
  rows = -(-num_tokens // blocks)
  return -(-rows // 8) * 8


def _transition(q_rows, k, rows, rows_valid, key_valid, scale):
  """M_h for some query rows: q_rows f32[B, Q, H, h] at positions rows i32[Q], valid
  rows_valid bool[B, Q], over every key k f32[B, T, K, h]. Returns f32[B, H, Q, T]."""
  logits = attention.grouped_logits(q_rows, k) * scale
  causal = rows[:, None] >= jnp.arange(k.shape[1])[None]
  visible = causal[None] & rows_valid[:, :, None] & key_valid[:, None, :]  # [B, Q, T]
  # `where` leaves masked entries at exactly 0 and fully masked rows all 0, so the
  # contents of invalid slots (even inf/NaN) never reach the walk.
  return jax.nn.softmax(logits, axis=-1, where=visible[:, None])


def _blocked_step(pi, *, q, k, query_valid, key_valid, scale, block_size):
  """π M_h (pi: f32[B, H, T]) by a scan over blocks of query rows, each block's rows of
  M_h recomputed: the compiled loop holds one f32[B, H, block_size, T] at a time."""
  b, t, num_heads, _ = q.shape
  blocks = -(-t // block_size)
  pad = blocks * block_size - t  # Padded rows are invalid queries: all-zero rows of M.
  split = lambda x: jnp.moveaxis(x.reshape((b, blocks, block_size) + x.shape[2:]), 1, 0)
  xs = (split(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))),
        split(jnp.pad(query_valid, ((0, 0), (0, pad)))),
        split(jnp.pad(jnp.moveaxis(pi, 2, 1), ((0, 0), (0, pad), (0, 0)))),  # [n, B, Q, H]
        jnp.arange(blocks * block_size).reshape(blocks, block_size))

  def block(acc, x):
    q_rows, rows_valid, pi_rows, rows = x
    walk = _transition(q_rows, k, rows, rows_valid, key_valid, scale)
    return acc + jnp.einsum("bih,bhij->bhj", pi_rows, walk, precision=_HIGHEST), None

  acc, _ = jax.lax.scan(block, jnp.zeros((b, num_heads, t), jnp.float32), xs)
  return acc


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


# --- The stages ---------------------------------------------------------------------

METRICS = ("keys", "features")


def last_layer_metric(cfg: LlavaConfig) -> bool:
  """Whether the tower's last layer follows the feature layer (LLaVA's −2), so that its
  keys, AIM's default similarity, can be computed."""
  return cfg.vision_feature_layer % (cfg.vision.num_layers + 1) == cfg.vision.num_layers - 1


@dataclasses.dataclass(frozen=True)
class MergePlan(StagePlan):
  """capacities: visual tokens after each step (static); metric: "keys" or "features";
  steps: the tokens each step removes (traced)."""
  name: ClassVar[str] = "AIM's merge"
  capacities: tuple[int, ...]
  metric: str
  steps: tuple[int, ...] = dataclasses.field(compare=False)

  def traced(self):
    return jnp.asarray(self.steps, jnp.int32).reshape(-1)

  def tower_output(self, run, c, ts):
    if self.metric == "keys":  # the keys the last layer computes, CLS still in the set
      k = run.model.vision.layers[-1].keys(ts.features)
      run.carry["aim.keys"] = k.reshape(k.shape[:2] + (-1,))
    return ts

  def before_projector(self, run, c, ts):
    if self.metric != "keys" or not self.capacities:
      return ts
    keys = run.carry["aim.keys"]
    return self._merge(ts, keys[:, keys.shape[1] - ts.features.shape[1]:], c)

  def after_projector(self, run, c, ts):
    if self.metric != "features" or not self.capacities:
      return ts
    return self._merge(ts, ts.features, c)

  def _merge(self, ts, metric, steps):
    """The chained bipartite steps (plain means), the metric merged alongside: one
    matching, one mean for both."""
    d = ts.features.shape[-1]
    ts = ts._replace(features=jnp.concatenate([ts.features, metric.astype(ts.features.dtype)],
                                              axis=-1))
    for step, capacity in enumerate(self.capacities):
      merged = tokens.bipartite_merge(ts, ts.features[..., d:], steps[step], weighted=False)
      ts = tokens.compact(merged, capacity)
    return ts._replace(features=ts.features[..., :d])

  def extra_flops(self, cfg, num_text, visual_in, processed):
    if self.metric != "keys" or not self.capacities:
      return {}
    d = cfg.vision.hidden_size  # the last layer's key projection on every tower token
    return {"vision": 2 * cfg.num_image_tokens * d * d}


@dataclasses.dataclass(frozen=True)
class Merge(Stage):
  """Chained bipartite merge steps before the LLM: step i removes steps[i] tokens.
  metric: "keys" (the tower's last-layer keys, the official choice) or "features"
  (the projected features, after the projector). frames_only: merge video frames only
  (LLaVA-OneVision, whose still images AIM leaves whole)."""
  steps: tuple[int, ...]
  metric: str = "keys"
  frames_only: bool = False
  name: ClassVar[str] = "AIM's merge"

  @property
  def point(self) -> str:
    """The keys are read at the tower's output; features after the projector."""
    return "tower_output" if self.metric == "keys" else "after_projector"

  def plan(self, flow: Flow) -> MergePlan:
    if self.metric not in METRICS:
      raise ConfigError(f"merge_metric {self.metric!r} is not one of {METRICS}.")
    if self.metric == "keys" and not last_layer_metric(flow.cfg):
      raise ConfigError("merge_metric='keys' uses the keys of the tower's last layer, which "
                        "needs vision_feature_layer -2; use merge_metric='features'.")
    if self.metric == "keys" and flow.changed:
      raise ConfigError(f"AIM's key metric is the tower's last-layer keys of its output "
                        f"tokens, which {flow.changed} changed first; use "
                        "merge_metric='features'.")
    if self.metric == "keys" and flow.data_dependent:
      raise ConfigError(f"AIM's key metric is computed on the tower's output, whose count "
                        f"{flow.data_dependent} makes data-dependent; use "
                        "merge_metric='features'.")
    flow.advance("before_projector" if self.metric == "keys" else "after_projector",
                 self.name)
    if self.frames_only and not isinstance(flow.packing, llava_onevision.Packing):
      return MergePlan((), self.metric, steps=())
    flow.change_visual(self.name)
    limit = flow.cfg.num_image_tokens if flow.packing is None else flow.visual.cap
    n, caps = flow.visual.exact, []
    for step, r in enumerate(self.steps):
      if r < 0:
        raise ConfigError(f"merge counts must be >= 0, got {r}.")
      if r > n // 2:  # the official code silently merges ⌊n/2⌋ instead
        raise ConfigError(f"merge_r[{step}] = {r} is more than half of the {n} tokens it "
                          f"merges (AIM's bipartite step merges at most {n // 2}).")
      n -= r
      caps.append(flow.bucket_to(n, limit).cap)
    flow.visual = flow.bucket_to(n, limit)
    return MergePlan(tuple(caps), self.metric, steps=tuple(self.steps))


@dataclasses.dataclass(frozen=True)
class PageRankPlan(prune.PrunePlan):
  name: ClassVar[str] = "AIM's PageRank"
  tau: float = PAGERANK_TAU
  iterations: int = PAGERANK_ITERATIONS
  damping: float = PAGERANK_DAMPING

  def score(self, run, stream, q, k, count):
    # Reference mode: every query row carries mass, as the official code (which masks).
    query_valid = stream.valid if run.mode == "reference" else stream.keys_valid
    return pagerank_scores(q, k, query_valid, stream.keys_valid, tau=self.tau,
                           iterations=self.iterations, damping=self.damping)

  def scorer_flops(self, cfg, num_tokens):
    """The full matrix: the logits once, then one walk over them per iteration. Blocks
    (`auto_block_size`): every iteration recomputes the logits of every block, padded
    rows included, and walks them."""
    t, n = cfg.text, num_tokens
    logits = lambda rows: 2 * rows * n * t.num_heads * t.head_dim
    walk = lambda rows: 2 * t.num_heads * rows * n
    block = auto_block_size(n)
    if block >= n:
      return logits(n) + self.iterations * walk(n)
    rows = -(-n // block) * block
    return self.iterations * (logits(rows) + walk(rows))


@dataclasses.dataclass(frozen=True)
class PageRank(prune.Prune):
  """PageRank pruning inside the LLM: layer ℓ keeps ⌊N_v · ratios[ℓ]⌋ visual tokens
  (`layer_ratios` makes AIM's schedule)."""
  tau: float = PAGERANK_TAU
  iterations: int = PAGERANK_ITERATIONS
  damping: float = PAGERANK_DAMPING
  name: ClassVar[str] = "AIM's PageRank"
  plan_class: ClassVar[type] = PageRankPlan

  def plan_settings(self):
    if not self.tau > 0 or self.iterations < 0 or not 0 <= self.damping <= 1:
      raise ConfigError(f"PageRank needs tau > 0, iterations >= 0 and damping in [0, 1]; "
                        f"got {self.tau}, {self.iterations}, {self.damping}.")
    return dict(tau=self.tau, iterations=self.iterations, damping=self.damping)


# --- Presets and retention levels ----------------------------------------------------

def default_schedule(num_layers: int) -> tuple[int, int]:
  """AIM's (l1, l2): the published ones for 32 and 28 layers, scaled for other depths."""
  published = {32: SCHEDULE_LLAMA_32, 28: SCHEDULE_QWEN2_28}
  if num_layers in published:
    return published[num_layers]
  l1 = max(0, round(num_layers * 13 / 32))
  return l1, max(l1 + 1, round(num_layers * 21 / 32))


def merge_steps(num_visual: int, target: int) -> tuple[int, ...]:
  """Bipartite steps that take num_visual tokens down to target, each as large as it
  can be (the official code merges at most ⌊n/2⌋ tokens in a step)."""
  steps, n = [], num_visual
  while n > target:
    r = min(n - target, n // 2)
    if r == 0:
      break
    steps.append(r)
    n -= r
  return tuple(steps)


def _steepen(ratios: tuple[float, ...], retention: float) -> tuple[float, ...]:
  """v ← max(0, 1 − c·(1 − v)) with c >= 1 found by bisection so that the mean is
  `retention`: layers that see every token still do, the others drop faster."""
  scaled = lambda c: tuple(max(0.0, 1 - (1 - v) * c) for v in ratios)
  mean = lambda c: sum(scaled(c)) / len(ratios)
  floor = sum(v == 1 for v in ratios) / len(ratios)
  if retention < floor:
    raise ConfigError(f"AIM's PageRank alone keeps every token in {floor:.3f} of the layers "
                      f"(up to l1), so it cannot retain {retention}; lower l1 or add the "
                      "merge.")
  lo, hi = 1.0, 1e6
  for _ in range(100):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if mean(mid) > retention else (lo, mid)
  return scaled(hi)


def build(cfg: LlavaConfig, retention: float | None = None,
          merge_r: tuple[int, ...] | None = None, schedule=None, mode: str = "fast",
          l1: int | None = None, l2: int | None = None, parts=("merge", "prune")) -> Recipe:
  """AIM: merge before the LLM, then PageRank pruning on the (l1, l2) schedule
  (`schedule`, or `l1` and `l2` given one by one, e.g. as evaluation options; default
  the published one for the depth, `default_schedule`). merge_r: the merge steps
  (default: LLAVA15_MERGE_252 on LLaVA-1.5 and LLaVA-NeXT; on LLaVA-OneVision, per video
  frame of n pooled tokens, the official n // 2 then n // 4, i.e. LLAVA_OV_VIDEO_MERGE_49).

  With `retention`, the merge target M is chosen so that M times the schedule's mean
  ratio gives retention·N_v; if that needs no merging at all (retention above the
  schedule's mean), the schedule is relaxed instead: v ← 1 − (1 − v)(1 − ρ)/(1 − mean).
  parts: "merge" and/or "prune", for recipes that take one half (with one part, a
  retention level is that part's own).
  """
  n_layers = cfg.text.num_layers
  if (l1 is None) != (l2 is None):
    raise ConfigError(f"AIM's schedule needs both l1 and l2; got l1={l1}, l2={l2}.")
  if l1 is not None:
    schedule = (l1, l2)
  l1, l2 = schedule or default_schedule(n_layers)
  try:
    ratios = layer_ratios(n_layers, l1, l2)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  video = cfg.arch == "llava_onevision"  # AIM merges its video frames after pooling
  n_v = llava_onevision.pooled_grid(cfg.vision.grid) ** 2 if video else cfg.num_image_tokens
  if merge_r is None:  # the official video steps are r = n // 2, then n // 4 (98, 49)
    merge_r = (n_v // 2, n_v // 4) if video else LLAVA15_MERGE_252
  mean = sum(ratios) / n_layers if "prune" in parts else 1.0
  if retention is not None:
    check_retention(retention)
    if retention >= mean:
      merge_r = ()
      if mean < 1:  # the merge alone (mean 1) at retention 1 has nothing to relax
        ratios = tuple(1 - (1 - v) * (1 - retention) / (1 - mean) for v in ratios)
    elif "merge" not in parts:  # PageRank alone, below its schedule's mean
      merge_r = ()
      ratios = _steepen(ratios, retention)
    else:
      merge_r = merge_steps(n_v, max(1, round(retention * n_v / mean)))
  elif "merge" in parts and sum(merge_r) >= n_v:
    raise ConfigError(f"AIM merge steps {merge_r} remove {sum(merge_r)} of the model's "
                      f"{n_v} visual tokens.")
  stages = []
  if "merge" in parts and merge_r:
    metric = "keys" if last_layer_metric(cfg) and not video else "features"
    stages.append(Merge(tuple(merge_r), metric, frames_only=video))
  if "prune" in parts:
    stages.append(PageRank(tuple(ratios)))
  return Recipe(tuple(stages), "aim", mode)
