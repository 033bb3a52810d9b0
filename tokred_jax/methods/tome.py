"""ToMe: token merging inside the vision tower.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv 2210.09461);
official code facebookresearch/ToMe. METHODS.md §4 states the semantics.

In every tower layer run, between the attention and the MLP, r token pairs merge by
bipartite soft matching on the head-mean keys (`tokens.bipartite_merge`, size-weighted
means); attention adds log(size) to each key's logits (proportional attention). The
CLS token never merges. The tower's output is the merged set, so fewer tokens reach the
projector and the LLM.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from tokred_jax.core import sharding, tokens
from tokred_jax.methods.base import Count, Flow, Recipe, Stage, StagePlan, check_retention
from tokred_jax.models.config import ConfigError, LlavaConfig


@dataclasses.dataclass(frozen=True)
class TomePlan(StagePlan):
  """capacities[i]: tokens leaving layer i's merge (static); protect_first: the tower has
  a CLS token, which never merges; merges: pairs merged per layer (traced)."""
  name: ClassVar[str] = "ToMe"
  capacities: tuple[int, ...]
  protect_first: bool
  merges: tuple[int, ...] = dataclasses.field(compare=False)

  def traced(self):
    return jnp.asarray(self.merges, jnp.int32).reshape(-1)

  def vision_layer(self, run, c, index, layer, ts, next):
    del next  # ToMe runs the layer itself: it merges between attention and MLP
    x, k = layer.attention_block(ts.features,
                                 tokens.proportional_attention_bias(ts.sizes, ts.valid))
    metric = jnp.mean(k.astype(jnp.float32), axis=2)
    merged = tokens.bipartite_merge(ts._replace(features=x), metric, c[index],
                                    weighted=True, protect_first=self.protect_first)
    ts = tokens.compact(merged, self.capacities[index])
    return ts._replace(features=sharding.constrain(layer.mlp_block(ts.features),
                                                   sharding.STREAM))


@dataclasses.dataclass(frozen=True)
class Tome(Stage):
  """r[i] token pairs merge in tower layer i (one entry per layer run)."""
  r: tuple[int, ...]
  point: ClassVar[str] = "vision"
  name: ClassVar[str] = "ToMe"

  def plan(self, flow: Flow) -> TomePlan:
    cfg = flow.cfg
    layers_run = cfg.vision_layers_used
    if len(self.r) != layers_run:
      raise ConfigError(f"ToMe's r has {len(self.r)} entries but the tower runs {layers_run} "
                        "layers; give one merge count per layer run.")
    if flow.data_dependent:
      raise ConfigError(f"ToMe's counts are static; it cannot follow {flow.data_dependent}, "
                        "whose counts depend on the input.")
    has_cls, drop = int(cfg.vision.has_cls), int(cfg.drops_cls)
    n, exact = cfg.vision.seq_len, []
    for layer, r in enumerate(self.r):
      if r < 0:
        raise ConfigError(f"merge counts must be >= 0, got {r}.")
      if r > (n - has_cls) // 2:
        raise ConfigError(f"ToMe's r[{layer}] = {r} is more than half of the {n - has_cls} "
                          "tokens that layer can merge.")
      exact.append(n)
      n -= r
    seq = cfg.vision.seq_len
    visual = flow.bucket_to(n - drop, cfg.num_image_tokens)
    caps = [seq] + [flow.bucket_to(t, seq).cap for t in exact[1:]] + [visual.cap + drop]
    # A merge compacts into at most the slots it got: rounding the visual count up (CLS
    # added back) may pass the capacity of the layer before it.
    for i in range(1, len(caps)):
      caps[i] = min(caps[i], caps[i - 1])
    flow.vision = [(Count(e, caps[i]), Count((exact[1:] + [n])[i], caps[i + 1]))
                   for i, e in enumerate(exact)]
    return TomePlan(tuple(caps[1:]), bool(has_cls), merges=tuple(self.r))


def _spread(movable: int, wanted: list[int], greedy: bool = False) -> list[int] | None:
  """Per-layer merge counts: `wanted` if each fits (at most half the tokens left), else
  None; with greedy, each layer merges as much of what is left as it can."""
  out, n, left = [], movable, sum(wanted)
  for r in wanted:
    r = min(n // 2, left) if greedy else r
    if r > n // 2:
      return None
    out.append(r)
    n, left = n - r, left - r
  return out


def build(cfg: LlavaConfig, retention: float | None = None, r: int | None = None,
          mode: str = "fast") -> Recipe:
  """ToMe in the vision tower: r merges per layer run (or enough to reach retention)."""
  layers_run = cfg.vision_layers_used
  if retention is not None:
    check_retention(retention)
    total = cfg.num_image_tokens - max(1, math.floor(retention * cfg.num_image_tokens))
    # An even spread if the layers allow it (a layer merges at most half its tokens),
    # else as many as possible as early as possible.
    movable = cfg.vision.seq_len - int(cfg.vision.has_cls)
    even = [total // layers_run + (i < total % layers_run) for i in range(layers_run)]
    tome_r = _spread(movable, even) or _spread(movable, [total] + [0] * (layers_run - 1),
                                               greedy=True)
    if sum(tome_r) < total:
      raise ConfigError(f"ToMe over {layers_run} tower layers cannot merge down to "
                        f"{retention} of the tokens (each layer merges at most half).")
    tome_r = tuple(tome_r)
  else:
    tome_r = (r if r is not None else 0,) * layers_run
  return Recipe((Tome(tome_r),), "tome", mode)
