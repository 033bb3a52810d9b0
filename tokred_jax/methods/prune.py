"""In-LLM pruning on a per-layer schedule: the stage AIM, FastV and DART share.

After LLM layer ℓ a scorer ranks the live visual tokens and layer ℓ+1 keeps
⌊N_v · ratios[ℓ+1]⌋ of them (N_v: the visual tokens entering the LLM; text is never
pruned). N_v is each sample's own where the input decides it (an anyres bucket, whose
samples hold different counts below its capacity; an earlier data-dependent stage): the
program computes the counts from it, as the official codes do per prompt. A method
subclasses `PrunePlan` with its scorer (`score`) and the scorer's matmul FLOPs, and
builds `Prune(ratios)` with its own plan class.

Fast mode gathers the stream down to the next layer's capacity, in original order, so
later layers really run on fewer tokens; reference mode only marks the others dead, as
the official implementations do. Layers score only where the exact count drops.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from tokred_jax.core.stream import Stream, keep_chosen, take_all, top_visual
from tokred_jax.methods.base import Count, Flow, Stage, StagePlan, bucket, floor_count
from tokred_jax.models.config import ConfigError, LlavaConfig


def check_ratios(ratios: Sequence[float], num_layers: int, what: str):
  """One ratio per layer, in [0, 1], non-increasing, starting at 1."""
  if len(ratios) != num_layers:
    raise ConfigError(f"{what} has {len(ratios)} entries for a {num_layers}-layer LLM; give "
                      "one per layer.")
  bad = [r for r in ratios if not 0 <= r <= 1]
  if bad:
    raise ConfigError(f"{what} must lie in [0, 1]; got {bad[:3]}.")
  if any(b > a for a, b in zip(ratios, ratios[1:])):
    raise ConfigError(f"{what} must not increase with depth: pruned tokens never come back.")
  if ratios[0] != 1:
    raise ConfigError(f"{what}[0] must be 1: pruning needs a layer's attention to score "
                      "tokens, so layer 0 sees them all.")


# ⌊n · r⌋ in the program in 32-bit integers, r as ⌈r · 2^30⌉ / 2^30: for n < 2^16 that
# adds less than 2^-14 to n · r, so it equals the plan's `floor_count` (float64) unless
# n · r lies within 2^-14 below an integer, which no ratio p/q with q <= 2^14 can do.
# (float32 is not: 0.65 · 180 = 117 comes out 116.99999.)
FIXED_BITS = 30


def fixed_ratio(ratio: float) -> int:
  """r in [0, 1] as the int32 ⌈r · 2^30⌉ that `floor_scaled` reads."""
  return math.ceil(ratio * (1 << FIXED_BITS))


def floor_scaled(n: jax.Array, fixed) -> jax.Array:
  """⌊n · fixed / 2^30⌋, exactly, for n: i32[...] in [0, 2^16) and fixed in [0, 2^30]:
  the product split in two 15-bit halves so that no step leaves int32."""
  half = FIXED_BITS // 2
  hi, lo = fixed >> half, fixed & ((1 << half) - 1)
  return (n * hi + ((n * lo) >> half)) >> half


def prune(run, stream: Stream, scores, capacity: int, count) -> Stream:
  """Keeps the `count` best-scoring live visual tokens (scores f32[B, T]) in `capacity`
  visual slots. Fast mode gathers the stream down, in original order (and sets
  `run.visual_slots`); reference mode only marks the others dead."""
  chosen, kept = top_visual(stream, scores, capacity, count)
  if run.mode == "reference":
    return stream._replace(alive=stream.alive & (~stream.visual | kept))
  # Every sample has the same number of visual slots, so it keeps the same number of
  # slots: the text, and the `capacity` chosen visual slots.
  order = keep_chosen(stream, chosen, run.visual_slots, capacity)
  run.visual_slots = capacity
  out, kept = take_all((stream, kept), order)
  return out._replace(valid=out.valid & (~out.visual | kept))


@dataclasses.dataclass(frozen=True)
class PrunePlan(StagePlan):
  """capacities: visual-token capacity of each layer; score_layers: the layers after
  which this stage scores; relative: the counts are ⌊ratio · the sample's own visual
  count⌋, computed in the program (an anyres bucket, or an earlier stage whose counts
  depend on the input); counts, ratios: the exact per-layer counts for the plan's own
  N_v and the ratios (traced; the ratios as `fixed_ratio`)."""
  capacities: tuple[int, ...]
  score_layers: tuple[int, ...]
  relative: bool
  counts: tuple[int, ...] = dataclasses.field(compare=False)
  ratios: tuple[float, ...] = dataclasses.field(compare=False)

  def traced(self):
    return (jnp.asarray(self.counts, jnp.int32),
            jnp.asarray([fixed_ratio(r) for r in self.ratios], jnp.int32))

  def score(self, run, stream: Stream, q, k, count):
    """f32[B, T] (higher: keep) from the layer's rotated queries f32[B, T, H, h] and keys
    f32[B, T, K, h]; only live visual entries are read. count: how many the next layer
    keeps (i32[] or i32[B]), for scorers whose ranking depends on it."""
    raise NotImplementedError

  def scorer_flops(self, cfg: LlavaConfig, num_tokens: int) -> int:
    """Matmul FLOPs of one scoring pass over `num_tokens` tokens."""
    raise NotImplementedError

  def after_llm_layer(self, run, c, index, q, k, stream):
    if index not in self.score_layers:
      return stream
    counts, ratios = c
    count = counts[index + 1]
    if self.relative:  # i32[B]: each sample's ⌊N_v · r⌋
      count = floor_scaled(run.carry["visual_in"], ratios[index + 1])
    scores = self.score(run, stream, q, k, count)
    return prune(run, stream, scores, self.capacities[index + 1], count)

  def extra_flops(self, cfg, num_text, visual_in, processed):
    del num_text, visual_in
    return {"llm": sum(self.scorer_flops(cfg, processed[l]) for l in self.score_layers)}


@dataclasses.dataclass(frozen=True)
class Prune(Stage):
  """Pruning inside the LLM: layer ℓ keeps ⌊N_v · ratios[ℓ]⌋ visual tokens, ranked by
  the scores of layer ℓ − 1. Subclasses set `plan_class` (their scorer)."""
  ratios: tuple[float, ...]
  point: ClassVar[str] = "llm"
  plan_class: ClassVar[type] = PrunePlan

  def plan(self, flow: Flow) -> PrunePlan:
    cfg = flow.cfg
    layers = cfg.text.num_layers
    check_ratios(self.ratios, layers, f"{self.name}'s layer ratios")
    visual = flow.visual
    llm = []
    for l, r in enumerate(self.ratios):
      exact = min(flow.llm[l].exact, floor_count(visual.exact, r))
      cap = visual.cap if exact == visual.exact else bucket(exact, flow.bucket, visual.cap)
      llm.append(Count(exact, min(cap, flow.llm[l].cap)))
    flow.llm = llm
    score = tuple(l for l in range(layers - 1) if llm[l + 1].exact < llm[l].exact)
    flow.score_layers |= set(score)
    relative = flow.data_dependent is not None or flow.packing is not None
    if relative and visual.cap >= 1 << 16:
      raise ConfigError(f"{self.name} counts up to 65,535 visual tokens per prompt; this "
                        f"bucket holds {visual.cap}: give fewer or smaller images.")
    return self.plan_class(tuple(c.cap for c in llm), score, relative,
                           counts=tuple(c.exact for c in llm), ratios=tuple(self.ratios),
                           **self.plan_settings())

  def plan_settings(self) -> dict:
    """The scorer's own static settings, passed to its plan class."""
    return {}
