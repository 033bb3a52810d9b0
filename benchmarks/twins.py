"""Twins of a reduction plan: the same token capacities in every tower and LLM layer,
with a trivial selection, so that timing both isolates what choosing the tokens costs.

  twin = twins.twin_plan(plan, cfg)     # None where no twin has the plan's capacities

In-LLM pruning (AIM's PageRank, FastV, DART) keeps the first live visual tokens on the
same per-layer ratios; ToMe's per-layer merges become drops of as many tokens (the first
ones kept), at the same place in the layer; AIM's merge and pooling become a random
subset of the count they leave (`baselines.Random`, before the projector: pooling's
projector then runs on fewer tokens). MustDrop's counts depend on the input, so its twin
is made from the capacities its segments ran at (`capacities`): the window merge after
tower layer 0 becomes a drop in that layer (its MLP then runs on fewer tokens), the
filters first-token pruning, all in one program. Random is the trivial selection
itself, and p-MoD's router (one Linear(D, 1) per layer) has no trivial counterpart:
neither has a twin.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from tokred_jax.core import tokens
from tokred_jax.methods import aim, baselines, prune, tome
from tokred_jax.methods.base import Plan, Recipe, make_plan
from tokred_jax.models.config import ConfigError, LlavaConfig


@dataclasses.dataclass(frozen=True)
class _FirstPlan(prune.PrunePlan):
  name: ClassVar[str] = "first tokens"

  def score(self, run, stream, q, k, count):
    return jnp.zeros(stream.visual.shape, jnp.float32)  # ties keep the lower slots

  def scorer_flops(self, cfg, num_tokens):
    return 0


@dataclasses.dataclass(frozen=True)
class _First(prune.Prune):
  """In-LLM pruning on `ratios` that keeps the first live visual tokens."""
  name: ClassVar[str] = "first tokens"
  plan_class: ClassVar[type] = _FirstPlan


@dataclasses.dataclass(frozen=True)
class _DropPlan(tome.TomePlan):
  name: ClassVar[str] = "drop"

  def vision_layer(self, run, c, index, layer, ts, next):
    del next  # where ToMe merges, between attention and MLP, with no matching
    x, _ = layer.attention_block(ts.features,
                                 tokens.proportional_attention_bias(ts.sizes, ts.valid))
    count = jnp.sum(ts.valid, axis=1, dtype=jnp.int32) - c[index]
    zeros = jnp.zeros(ts.valid.shape, jnp.float32)  # ties keep the lower slots
    ts = tokens.keep_topk(ts._replace(features=x), zeros, self.capacities[index], count)
    return ts._replace(features=layer.mlp_block(ts.features))


@dataclasses.dataclass(frozen=True)
class _Drop(tome.Tome):
  """r[i] tower tokens dropped in layer i run (the first ones kept): ToMe's counts."""
  name: ClassVar[str] = "drop"

  def plan(self, flow):
    p = super().plan(flow)
    return _DropPlan(p.capacities, p.protect_first, merges=p.merges)


def twin_plan(plan: Plan, cfg: LlavaConfig, capacities=None) -> Plan | None:
  """The twin of `plan` (see the module docstring), or None. capacities: for MustDrop,
  the visual capacity of each LLM layer as its segments ran, the first one also the
  tower's after the window merge (CLS aside); its twin plans them exactly (bucket 1) and
  its prompt holds the first one's image slots."""
  seq, run = cfg.vision.seq_len, cfg.vision_layers_used
  if capacities is not None:
    first, bucket = capacities[0], 1
    # (c + ½) / first: ⌊first · ratio⌋ = c whatever the float rounding.
    stages = [_Drop((seq - int(cfg.vision.has_cls) - first,) + (0,) * (run - 1)),
              _First(tuple(min(1.0, (c + 0.5) / first) for c in capacities))]
    want = ((seq,) + (seq - stages[0].r[0],) * (run - 1), first, tuple(capacities))
  else:
    stages, bucket = [], plan.token_bucket
    want = (plan.vision_tokens, plan.num_visual, plan.llm_visual)
    for stage in plan.recipe.stages:
      if isinstance(stage, prune.Prune):
        stages.append(_First(stage.ratios))
      elif isinstance(stage, tome.Tome):
        stages.append(_Drop(stage.r))
      elif isinstance(stage, (aim.Merge, baselines.Pool)):
        stages.append(baselines.Random(plan.exact.visual))
      else:
        return None
  try:
    twin = make_plan(Recipe(tuple(stages), "twin", plan.mode, bucket), cfg)
  except ConfigError:  # e.g. a drop of more than half the tower's tokens in one layer
    return None
  return twin if (twin.vision_tokens, twin.num_visual, twin.llm_visual) == want else None
