"""p-MoD: Mixture-of-Depths for visual tokens, with TanhNorm, STRing and progressive
ratio decay (PRD).

In a MoD layer a router (Linear(D -> 1), zero-initialised, on the layer input x) gives
each visual token a weight w = α·tanh(r) + 1 (TanhNorm; w = 1 at init). The layer
processes the text and its k_ℓ highest-weighted visual tokens, in original order with
their original positions; with h = x + Attn(·) over that set:
  kept visual    h + w·MLP(norm(h))     (only the MLP branch is scaled)
  text           h + MLP(norm(h))
  skipped visual w·x                    (STRing: the router learns from skipped tokens)
Skipped tokens stay in the stream for the next layer, whose router picks again.
k_ℓ = trunc(N_v · R_ℓ) in float32, as the official code computes it, of each sample's own
N_v (an anyres bucket's samples hold different counts below its capacity), chosen
jointly over all of the sample's visual tokens.

Schedules give R_ℓ per layer, or None for an ordinary dense layer (no router). PRD is a
shifted cosine, R̃_ℓ = ½·cos(π·ℓ/(L−1)) + shift; layers with R̃_ℓ > dense_above are
dense, the others keep max(R̃_ℓ, floor) (the official code hard-codes L − 1 = 31).

`Route` is the stage (around every routed decoder layer); `build` makes the recipe from
the ratios a checkpoint was trained at, a schedule, or a retention level.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokred_jax.core import sharding
from tokred_jax.core.stream import keep_chosen, take, top_visual
from tokred_jax.methods.base import Count, Flow, Recipe, Stage, StagePlan, bucket, \
    check_retention
from tokred_jax.models import layers as model_layers
from tokred_jax.models.config import ConfigError, LlavaConfig
from tokred_jax.models.llava import LayerOut

Ratios = tuple[float | None, ...]
SCHEDULES = ("cosine", "linear", "stepped", "constant", "interleaved")


def _thresholded(raw: Sequence[float], dense_above: float, floor: float) -> Ratios:
  return tuple(None if r > dense_above else max(r, floor) for r in raw)


def prd_cosine(num_layers: int, shift: float = 0.5, dense_above: float = 0.85,
               floor: float = 0.15) -> Ratios:
  """p-MoD's default: R̃_ℓ = ½·cos(π·ℓ/(L−1)) + shift, thresholded."""
  _check_layers(num_layers)
  return _thresholded([0.5 * math.cos(math.pi * l / (num_layers - 1)) + shift
                       for l in range(num_layers)], dense_above, floor)


def linear_decay(num_layers: int, shift: float = 0.5, dense_above: float = 0.85,
                 floor: float = 0.15) -> Ratios:
  """R̃_ℓ = 0.5 − ℓ/(L−1) + shift (the official 'shiftedlinear'), thresholded."""
  _check_layers(num_layers)
  return _thresholded([0.5 - l / (num_layers - 1) + shift for l in range(num_layers)],
                      dense_above, floor)


def stepped_decay(num_layers: int, ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25)
                  ) -> Ratios:
  """Equal blocks of layers at decreasing ratios; the first block (ratio 1) is dense."""
  _check_layers(num_layers)
  block = math.ceil(num_layers / len(ratios))
  return tuple(None if ratios[l // block] >= 1 else ratios[l // block]
               for l in range(num_layers))


def constant(num_layers: int, ratio: float = 0.5, first_dense: int = 2,
             last_dense: int = 1) -> Ratios:
  """The same ratio in every layer but the first `first_dense` and the last `last_dense`
  (the official 'deep_all' routes layers 2..L−2)."""
  _check_layers(num_layers)
  return tuple(ratio if first_dense <= l < num_layers - last_dense else None
               for l in range(num_layers))


def interleaved(num_layers: int, ratio: float = 0.5) -> Ratios:
  """Every other layer (1, 3, 5, ...) is a MoD layer (the official 'interleave')."""
  _check_layers(num_layers)
  return tuple(ratio if l % 2 else None for l in range(num_layers))


def schedule(name: str, num_layers: int, **kwargs) -> Ratios:
  """The schedule called `name` (see SCHEDULES) for `num_layers` layers."""
  builders = {"cosine": prd_cosine, "linear": linear_decay, "stepped": stepped_decay,
              "constant": constant, "interleaved": interleaved}
  if name not in builders:
    raise ValueError(f"unknown p-MoD schedule {name!r}; choose from {SCHEDULES}.")
  return builders[name](num_layers, **kwargs)


_schedule = schedule  # for `build`, whose argument has the name


def router_layers(ratios: Ratios) -> tuple[int, ...]:
  """The layers that have a router (a ratio rather than None)."""
  return tuple(l for l, r in enumerate(ratios) if r is not None)


def kept_count(num_visual: int, ratio: float) -> int:
  """k = ⌊N_v · R⌋ as the official code computes it: trunc(float32(N_v) · float32(R))
  (`routed_counts` is the same in the program)."""
  return int(np.trunc(np.float32(num_visual) * np.float32(ratio)))


def routed_counts(num_visual: jax.Array, ratio: jax.Array) -> jax.Array:
  """`kept_count` in the program: num_visual i32[B], ratio f32[] -> i32[B]."""
  return jnp.trunc(num_visual.astype(jnp.float32) * ratio).astype(jnp.int32)


def kept_counts(num_visual: int, ratios: Ratios) -> tuple[int, ...]:
  """k_ℓ = ⌊N_v · R_ℓ⌋ visual tokens per layer (`kept_count`; N_v in dense layers)."""
  return tuple(num_visual if r is None else kept_count(num_visual, r) for r in ratios)


def mean_kept_ratio(num_visual: int, ratios: Ratios) -> float:
  """Mean over all layers of k_ℓ / N_v: the KV-cache fraction p-MoD reports."""
  return sum(kept_counts(num_visual, ratios)) / (len(ratios) * num_visual)


def on_layers(ratios: Ratios, layers: Sequence[int]) -> Ratios:
  """`ratios` restricted to the layers that have routers (others dense), each ≤ 1."""
  return tuple(min(1.0, r if r is not None else 1.0) if l in layers else None
               for l, r in enumerate(ratios))


def fit_mean(name: str, num_layers: int, layers: Sequence[int], num_visual: int,
             target: float, **kwargs) -> Ratios:
  """The schedule `name`, on the routed `layers`, shifted so that its mean kept ratio
  (`mean_kept_ratio`) is as close to `target` as the counts allow: bisection on the
  cosine/linear shift or on the constant/interleaved ratio."""
  knob = "shift" if name in ("cosine", "linear") else "ratio"
  if name == "stepped":
    raise ValueError("the stepped schedule has no knob to fit a mean ratio; pass ratios.")
  make = lambda v: on_layers(schedule(name, num_layers, **{**kwargs, knob: v}), layers)
  lo, hi = -1.0, 2.0
  for _ in range(40):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if mean_kept_ratio(num_visual, make(mid)) < target else (lo, mid)
  best = make(hi)
  closest = mean_kept_ratio(num_visual, best)
  if abs(closest - target) > 0.02 or any(r is not None and not 0 < r <= 1 for r in best):
    raise ValueError(f"a {name} schedule on layers {list(layers)} cannot keep {target} of the "
                     f"visual tokens on average (closest: {closest:.3f}).")
  return best


def tanh_norm(router_logits: jax.Array, alpha: float) -> jax.Array:
  """w = α·tanh(r) + 1, in float32: f32[B, T]."""
  return alpha * jnp.tanh(router_logits.astype(jnp.float32)) + 1.0


def add_routers(cfg, params, layers: Sequence[int]):
  """A dense model made ready for p-MoD fine-tuning: zero-initialised routers (w = 1
  at first, so the model starts as the dense one) in `layers`. Returns (cfg, params)."""
  text = dataclasses.replace(cfg.text, router_layers=tuple(sorted(set(layers))))
  params = jax.tree_util.tree_map(lambda a: a, params)  # a copy of the containers
  for l in text.router_layers:
    params["llm"][f"layers_{l}"] = dict(params["llm"][f"layers_{l}"], router={
        "kernel": np.zeros((cfg.text.hidden_size, 1), np.float32),
        "bias": np.zeros((1,), np.float32)})
  return dataclasses.replace(cfg, text=text), params


def _check_layers(num_layers: int):
  if num_layers < 2:
    raise ValueError(f"a p-MoD schedule needs at least 2 layers, got {num_layers}.")


# --- The stage ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RoutePlan(StagePlan):
  """capacities: visual tokens each layer routes through (static), None: a dense layer;
  relative: the routed counts are `kept_count` of the sample's own visual tokens,
  computed in the program (an anyres bucket, whose samples hold different counts, or
  an earlier stage whose counts depend on the input); counts: the exact routed counts
  for the plan's own N_v (traced); ratios: the R_ℓ they came from (traced, float32)."""
  name: ClassVar[str] = "p-MoD"
  capacities: tuple[int | None, ...]
  relative: bool
  counts: tuple[int | None, ...] = dataclasses.field(compare=False)
  ratios: tuple[float | None, ...] = dataclasses.field(compare=False)

  def traced(self):
    return (jnp.asarray([-1 if k is None else k for k in self.counts], jnp.int32),
            jnp.asarray([0.0 if r is None else r for r in self.ratios], jnp.float32))

  def llm_layer(self, run, c, index, layer, stream, next):
    """The router picks the visual tokens the layer processes (text always is); the
    layer's cache holds the text and those. Skipped visual tokens become w·x (STRing)."""
    capacity = self.capacities[index]
    if capacity is None:
      return next(stream)
    counts, ratios = c
    count = counts[index]
    if self.relative:  # i32[B]: trunc(N_v · R_ℓ) of each sample's own visual tokens
      count = routed_counts(run.carry["visual_in"], ratios[index])
    w = tanh_norm(layer.route(stream.x), run.model.cfg.text.router_alpha)  # [B, T]
    chosen, kept = top_visual(stream, w, capacity, count)
    # Text and the chosen visual slots, in original order (a fixed count per sample).
    order = keep_chosen(stream, chosen, run.visual_slots, capacity)
    sub_visual = take(stream.visual, order)
    sub_valid = take(stream.keys_valid, order) & (~sub_visual | take(kept, order))
    h, cache, q = layer.attention_block(take(stream.x, order), take(stream.positions, order),
                                        model_layers.causal_mask(sub_valid))
    scale = jnp.where(sub_visual, take(w, order), 1.0)[..., None].astype(h.dtype)
    out = h + scale * layer.mlp_branch(h)
    x = jnp.where(stream.visual[..., None], w[..., None].astype(stream.x.dtype) * stream.x,
                  stream.x)
    write = (~sub_visual | take(kept, order))[..., None]
    rows = jnp.arange(x.shape[0])[:, None]
    x = x.at[rows, order].set(jnp.where(write, out, take(x, order)))
    stream = stream._replace(x=sharding.constrain(x, sharding.STREAM))
    return LayerOut(stream, cache, sub_valid, q, kept)

  def extra_flops(self, cfg, num_text, visual_in, processed):
    del processed  # a router reads every token of its layer's input: Linear(D -> 1)
    return {"llm": sum(2 * (num_text + visual_in[l]) * cfg.text.hidden_size
                       for l, k in enumerate(self.capacities) if k is not None)}


@dataclasses.dataclass(frozen=True)
class Route(Stage):
  """Mixture-of-Depths on the visual tokens: a routed layer ℓ processes ⌊N_v · R_ℓ⌋ of
  them (ratios[ℓ]; None: a dense layer). Needs a model trained with routers there."""
  ratios: tuple[float | None, ...]
  point: ClassVar[str] = "llm"
  name: ClassVar[str] = "p-MoD"

  def plan(self, flow: Flow) -> RoutePlan:
    cfg = flow.cfg
    layers = cfg.text.num_layers
    if len(self.ratios) != layers:
      raise ConfigError(f"p-MoD's ratios have {len(self.ratios)} entries for a {layers}-layer "
                        "LLM; give one per layer (None for a dense layer).")
    bad = [r for r in self.ratios if r is not None and not 0 < r <= 1]
    if bad:
      raise ConfigError(f"p-MoD's ratios must lie in (0, 1] (None: a dense layer); got {bad[:3]}.")
    missing = [l for l, r in enumerate(self.ratios)
               if r is not None and l not in cfg.text.router_layers]
    if missing:
      raise ConfigError(f"layers {missing} have no p-MoD router in this model (its routers: "
                        f"{list(cfg.text.router_layers)}); p-MoD needs a model trained with "
                        "routers, e.g. one made with pmod.add_routers and fine-tuned.")
    scored = sorted(l for l in flow.score_layers if self.ratios[l] is not None)
    if scored:
      raise ConfigError(f"p-MoD routes layers {scored}, whose attention a pruning stage reads; "
                        "route other layers or prune after dense ones.")
    visual = flow.visual
    routed = []
    for l, r in enumerate(self.ratios):
      if r is None:
        routed.append(flow.routed[l])
        continue
      exact = min(flow.llm[l].exact, kept_count(visual.exact, r))
      routed.append(Count(exact, min(flow.llm[l].cap, bucket(exact, flow.bucket, visual.cap))))
    flow.routed = routed
    return RoutePlan(tuple(None if k is None else k.cap for k in routed),
                     flow.data_dependent is not None or flow.packing is not None,
                     counts=tuple(None if k is None else k.exact for k in routed),
                     ratios=tuple(self.ratios))


def trained_ratios(plan) -> tuple[float | None, ...] | None:
  """The R_ℓ of a plan's p-MoD stage (what a fine-tuned checkpoint records), or None."""
  stage = plan.find(RoutePlan)
  return None if stage is None else stage.ratios


def build(cfg: LlavaConfig, retention: float | None = None, schedule: str | None = None,
          mode: str = "fast", **schedule_args) -> Recipe:
  """p-MoD routing on the model's router layers with a schedule from SCHEDULES (default:
  PRD's shifted cosine). With `retention`, the schedule is shifted so that the mean kept
  ratio over all layers matches it (the paper's ablations compare schedules at the same
  mean). With neither, the ratios the checkpoint was trained at, if it records them
  (`TextConfig.router_ratios`)."""
  router = cfg.text.router_layers
  if not router:
    raise ConfigError("this model has no p-MoD routers; add them with pmod.add_routers and "
                      "fine-tune (train.py), or load a p-MoD checkpoint.")
  if schedule is None and retention is None and not schedule_args and cfg.text.router_ratios:
    return Recipe((Route(tuple(cfg.text.router_ratios)),), "pmod", mode)
  schedule = schedule or "cosine"
  n_layers = cfg.text.num_layers
  try:
    if retention is not None:
      check_retention(retention)
      ratios = fit_mean(schedule, n_layers, router, cfg.num_image_tokens, retention,
                        **schedule_args)
    else:
      ratios = on_layers(_schedule(schedule, n_layers, **schedule_args), router)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return Recipe((Route(ratios),), "pmod", mode)
