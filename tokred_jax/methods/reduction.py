"""What a token-reduction method does at each stage, and the static plan it compiles to.

A `Reduction` names a method's stage settings (hashable, from a config). Given the
model config it becomes a `Plan`: the static CAPACITY of every stage and LLM layer
(shapes; part of the compile key), the layers that score and prune (wherever the EXACT
count drops; part of the key) and the exact COUNTS (traced int32 arrays; not part of the
key). Capacities are counts rounded up to `token_bucket`, so changing a retention level
within a bucket reuses the compiled program as long as the same layers prune: the slots
above the exact count are masked out.

Stages (see the data-flow figure in DESIGN.md):
  vision   ToMe merging inside the ViT layers (`tome_r`, per layer run)
  pre-LLM  AIM bipartite merging (`merge_r`), s×s pooling (`pool_stride`) or a random
           subset (`keep_visual`)
  prune    after LLM layer ℓ a scorer ranks the visual tokens and layer ℓ+1 keeps
           `layer_ratios[ℓ+1]` of them (text tokens are never pruned)
MustDrop (`window`, `filter_layers`; mustdrop.py) is the one method whose counts are
data-dependent: its plan keeps the full capacities, one program masks, and the
segmented prefill (segmented.py) compacts to bucketed capacities between programs.
Modes: "fast" gathers kept tokens into shorter arrays (real savings); "reference"
reproduces the official implementations, which only mask pruned tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tokred_jax.core import tokens
from tokred_jax.methods import mustdrop
from tokred_jax.models.config import ConfigError, LlavaConfig

SCORERS = ("pagerank", "fastv")
MODES = ("fast", "reference")
MERGE_METRICS = ("keys", "features")


@dataclasses.dataclass(frozen=True)
class Reduction:
  """A method's settings for every stage. The default reduces nothing."""
  name: str = "none"
  mode: str = "fast"
  tome_r: tuple[int, ...] = ()
  merge_r: tuple[int, ...] = ()
  merge_metric: str = "keys"
  pool_stride: int = 1
  keep_visual: int | None = None
  seed: int = 0
  scorer: str | None = None
  layer_ratios: tuple[float, ...] | None = None
  pagerank_tau: float = 0.1
  pagerank_iterations: int = 5
  pagerank_damping: float = 0.0
  mod_ratios: tuple[float | None, ...] | None = None
  window: int = 0
  merge_threshold: float = 0.8
  key_ratio: float = 0.08
  filter_layers: tuple[int, ...] = ()
  gamma: float = 0.0
  alpha: float = 0.0
  token_bucket: int = 16

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f"mode {self.mode!r} is not one of {MODES}.")
    if self.merge_metric not in MERGE_METRICS:
      raise ConfigError(f"merge_metric {self.merge_metric!r} is not one of {MERGE_METRICS}.")
    if self.scorer is not None and self.scorer not in SCORERS:
      raise ConfigError(f"scorer {self.scorer!r} is not one of {SCORERS}.")
    if (self.scorer is None) != (self.layer_ratios is None):
      raise ConfigError("in-LLM pruning needs both a scorer and layer_ratios (or neither).")
    for r in self.tome_r + self.merge_r:
      if r < 0:
        raise ConfigError(f"merge counts must be >= 0, got {r}.")
    if self.pool_stride < 1:
      raise ConfigError(f"pool_stride must be >= 1, got {self.pool_stride}.")
    if self.keep_visual is not None and self.keep_visual < 1:
      raise ConfigError(f"keep_visual must be >= 1, got {self.keep_visual}.")
    if self.layer_ratios is not None:
      bad = [r for r in self.layer_ratios if not 0 <= r <= 1]
      if bad:
        raise ConfigError(f"layer_ratios must lie in [0, 1]; got {bad[:3]}.")
      if any(b > a for a, b in zip(self.layer_ratios, self.layer_ratios[1:])):
        raise ConfigError("layer_ratios must not increase with depth: pruned tokens "
                          "never come back.")
    if self.mod_ratios is not None:
      bad = [r for r in self.mod_ratios if r is not None and not 0 < r <= 1]
      if bad:
        raise ConfigError(f"mod_ratios must lie in (0, 1] (None: a dense layer); got {bad[:3]}.")
    if self.token_bucket < 1:
      raise ConfigError(f"token_bucket must be >= 1, got {self.token_bucket}.")
    if self.window < 0 or self.window == 1:
      raise ConfigError(f"window must be 0 (no window merge) or >= 2, got {self.window}.")
    if not 0 < self.key_ratio <= 1:
      raise ConfigError(f"key_ratio must lie in (0, 1], got {self.key_ratio}.")
    if list(self.filter_layers) != sorted(set(self.filter_layers)):
      raise ConfigError(f"filter_layers must increase strictly, got {self.filter_layers}.")
    if self.gamma < 0 or self.alpha < 0:
      raise ConfigError(f"gamma and alpha must be >= 0, got {self.gamma}, {self.alpha}.")
    if self.data_dependent and (self.tome_r or self.merge_r or self.pool_stride > 1 or
                                self.keep_visual is not None or self.scorer or
                                self.mod_ratios is not None):
      raise ConfigError("MustDrop's stages (window, filter_layers) do not combine with "
                        "other reductions.")
    stages = sum([bool(self.merge_r), self.pool_stride > 1, self.keep_visual is not None])
    if stages > 1:
      raise ConfigError("choose one pre-LLM reduction: merge_r, pool_stride or keep_visual.")

  @property
  def data_dependent(self) -> bool:
    """Whether counts depend on the data (MustDrop): then only masks are traced."""
    return self.window > 0 or bool(self.filter_layers)

  @property
  def is_noop(self) -> bool:
    return self == Reduction(name=self.name, mode=self.mode, seed=self.seed,
                             token_bucket=self.token_bucket)


# The Reduction fields whose values reach the compiled program only through `Counts`
# (Plan.counts), each with the part of it that is static: the compile key holds that
# part instead of the value. Every other field is in the key as it is, so a new field
# recompiles until it is listed here (tests/test_plan_counts.py checks this table).
TRACED_FIELDS = {
    "tome_r": len,  # Counts.tome_r; the per-layer capacities are in the key
    "merge_r": len,  # Counts.merge_r; the per-step capacities are in the key
    "keep_visual": lambda k: k is not None,  # Counts.keep_visual
    "layer_ratios": lambda r: r is not None,  # Counts.llm_visual; capacities, score layers
    "mod_ratios": lambda r: None if r is None else tuple(x is not None for x in r),
    "merge_threshold": lambda _: None,  # Counts.thresholds[0]
    "gamma": lambda _: None,  # Counts.thresholds[1]
    "alpha": lambda _: None,  # Counts.thresholds[2]
}


def static_settings(red: "Reduction") -> tuple:
  """The part of `red` that shapes the compiled program: (field, value) for every field,
  the TRACED_FIELDS ones reduced to their static part."""
  return tuple((f.name, TRACED_FIELDS.get(f.name, lambda v: v)(getattr(red, f.name)))
               for f in dataclasses.fields(red))


class Counts(NamedTuple):
  """Exact counts, traced (changing them does not recompile).

  tome_r: i32[layers run]; merge_r: i32[steps]; keep_visual: i32[];
  llm_visual: i32[L], visual tokens each LLM layer processes; mod_visual: i32[L], of
  those, how many a p-MoD layer routes through itself; thresholds: f32[3], MustDrop's
  (merge threshold, gamma, alpha).
  """
  tome_r: jax.Array
  merge_r: jax.Array
  keep_visual: jax.Array
  llm_visual: jax.Array
  mod_visual: jax.Array
  thresholds: jax.Array


class Exact(NamedTuple):
  """A plan's exact counts (Python ints), which its capacities were rounded up from."""
  tome_r: tuple[int, ...]
  merge_r: tuple[int, ...]
  visual: int
  llm_visual: tuple[int, ...]
  mod_visual: tuple[int | None, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static capacities for one model and one reduction (hashable: a jit static arg).

  Two plans are equal (and hash alike) when they compile to the same program: every
  field but `reduction` and `exact` is compared, and of those two only the traced
  values are left out (`settings` holds the rest of the reduction; the exact counts
  reach the program as `Counts`). So two retention levels share a program when their
  counts round up to the same capacities and drop at the same layers.

  settings: `static_settings(reduction)`;
  vision_tokens: tower tokens (CLS included) entering each layer run;
  merge_tokens: visual tokens after each pre-LLM merge step;
  num_visual: visual-token capacity spliced into the prompt;
  llm_visual: visual-token capacity of each LLM layer;
  mod_visual: visual tokens each p-MoD layer processes (capacity), None: not routed;
  score_layers: layers whose attention ranks the visual tokens for the next layer,
    those after which the EXACT count drops (the capacity may not: the slots above
    the count are then masked);
  exact: the exact counts (Python ints) the capacities were rounded up from.
  """
  reduction: Reduction = dataclasses.field(compare=False)
  settings: tuple
  vision_tokens: tuple[int, ...]
  merge_tokens: tuple[int, ...]
  num_visual: int
  llm_visual: tuple[int, ...]
  mod_visual: tuple[int | None, ...]
  score_layers: tuple[int, ...]
  exact: Exact = dataclasses.field(compare=False, hash=False)

  @property
  def visual_per_layer(self) -> tuple[int, ...]:
    """Exact visual tokens each LLM layer processes (p-MoD's routed ones where routed)."""
    return tuple(l if m is None else m for l, m in zip(self.exact.llm_visual,
                                                      self.exact.mod_visual))

  def counts(self) -> Counts:
    tome_r, merge_r, keep, llm, mod = self.exact
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    red = self.reduction
    thresholds = jnp.asarray([red.merge_threshold, red.gamma, red.alpha], jnp.float32)
    return Counts(i32(tome_r).reshape(-1), i32(merge_r).reshape(-1), i32(keep), i32(llm),
                  i32([-1 if m is None else m for m in mod]), thresholds)


def _bucket(n: int, bucket: int, limit: int) -> int:
  """n rounded up to a multiple of `bucket`, at most `limit`; 0 stays 0."""
  return min(limit, tokens.bucket_up(n, bucket)) if n > 0 else 0


def make_plan(reduction: Reduction, cfg: LlavaConfig) -> Plan:
  """Checks `reduction` against the model and derives capacities and exact counts."""
  red = reduction
  bucket = red.token_bucket
  has_cls = cfg.vision.has_cls and cfg.vision_feature_select == "default"
  layers_run = cfg.vision_layers_used

  # Vision stage: ToMe removes r tokens in each layer it runs (CLS is never merged).
  tome_r = red.tome_r
  if tome_r and len(tome_r) != layers_run:
    raise ConfigError(f"tome_r has {len(tome_r)} entries but the tower runs {layers_run} "
                      "layers; give one merge count per layer run.")
  vision_tokens, n = [], cfg.vision.seq_len
  for layer, r in enumerate(tome_r):
    vision_tokens.append(n)
    movable = n - int(cfg.vision.has_cls)
    if r > movable // 2:
      raise ConfigError(f"tome_r[{layer}] = {r} is more than half of the {movable} tokens "
                        "that layer can merge.")
    n -= r
  num_visual = n - int(has_cls) if tome_r else cfg.num_image_tokens
  if tome_r:
    vision_cap = [vision_tokens[0]] + [_bucket(t, bucket, cfg.vision.seq_len)
                                      for t in vision_tokens[1:]]
  else:
    vision_cap = []

  # Pre-LLM stage.
  merge_tokens = []
  if red.merge_r:
    if red.merge_metric == "keys" and cfg.vision_feature_layer % (cfg.vision.num_layers + 1) \
        != cfg.vision.num_layers - 1:
      raise ConfigError("merge_metric='keys' uses the keys of the tower's last layer, which "
                        "needs vision_feature_layer -2; use merge_metric='features'.")
    for step, r in enumerate(red.merge_r):
      if r > (num_visual + 1) // 2:
        raise ConfigError(f"merge_r[{step}] = {r} is more than half of the {num_visual} "
                          "tokens it merges (a bipartite step merges at most the even half).")
      num_visual -= r
      merge_tokens.append(num_visual)
  if red.pool_stride > 1:
    grid = math.isqrt(num_visual)
    if grid * grid != num_visual or grid % red.pool_stride:
      raise ConfigError(f"pool_stride {red.pool_stride} does not divide the "
                        f"{grid}x{grid} token grid.")
    num_visual = (grid // red.pool_stride) ** 2
  if red.keep_visual is not None:
    if red.keep_visual > num_visual:
      raise ConfigError(f"keep_visual {red.keep_visual} is more than the {num_visual} "
                        "visual tokens available.")
    num_visual = red.keep_visual
  exact_visual = num_visual
  visual_cap = _bucket(num_visual, bucket, cfg.num_image_tokens)
  merge_cap = tuple(_bucket(t, bucket, cfg.num_image_tokens) for t in merge_tokens)

  # In-LLM pruning: layer l processes floor(N_v * ratio_l) of the post-merge tokens.
  layers = cfg.text.num_layers
  if red.layer_ratios is not None:
    if len(red.layer_ratios) != layers:
      raise ConfigError(f"layer_ratios has {len(red.layer_ratios)} entries for a "
                        f"{layers}-layer LLM; give one per layer.")
    if red.layer_ratios[0] != 1:
      raise ConfigError("layer_ratios[0] must be 1: pruning needs a layer's attention to "
                        "score tokens, so layer 0 sees them all.")
    llm_exact = tuple(int(math.floor(exact_visual * r + 1e-9)) for r in red.layer_ratios)
  else:
    llm_exact = (exact_visual,) * layers
  llm_cap = tuple(visual_cap if k == exact_visual else _bucket(k, bucket, visual_cap)
                  for k in llm_exact)

  # p-MoD: a routed layer processes floor(N_v * R_l) of the visual tokens it is given.
  mod_exact, mod_cap = (None,) * layers, (None,) * layers
  if red.mod_ratios is not None:
    if len(red.mod_ratios) != layers:
      raise ConfigError(f"mod_ratios has {len(red.mod_ratios)} entries for a {layers}-layer "
                        "LLM; give one per layer (None for a dense layer).")
    missing = [l for l, r in enumerate(red.mod_ratios)
               if r is not None and l not in cfg.text.router_layers]
    if missing:
      raise ConfigError(f"layers {missing} have no p-MoD router in this model (its routers: "
                        f"{list(cfg.text.router_layers)}); p-MoD needs a model trained with "
                        "routers, e.g. one made with methods.add_routers and fine-tuned.")
    mod_exact = tuple(None if r is None else min(llm_exact[l], int(math.floor(
        exact_visual * r + 1e-9))) for l, r in enumerate(red.mod_ratios))
    mod_cap = tuple(None if k is None else min(llm_cap[l], _bucket(k, bucket, visual_cap))
                    for l, k in enumerate(mod_exact))
  if red.data_dependent:
    _check_mustdrop(red, cfg)
  # Score wherever the exact count drops, whether or not its capacity does.
  score_layers = () if red.scorer is None else tuple(
      l for l in range(layers - 1) if llm_exact[l + 1] < llm_exact[l])
  return Plan(red, static_settings(red), tuple(vision_cap), merge_cap, visual_cap, llm_cap,
              mod_cap, score_layers, exact=Exact(tuple(tome_r), tuple(red.merge_r),
                                                 exact_visual, llm_exact, mod_exact))


def _check_mustdrop(red: Reduction, cfg: LlavaConfig):
  """MustDrop's stages against the model (its counts are checked while running)."""
  if red.window:
    v = cfg.vision
    if not (v.has_cls and cfg.vision_feature_select == "default"):
      raise ConfigError("MustDrop's key set is the CLS token's attention: it needs a tower "
                        "with a CLS token (CLIP) and vision_feature_select 'default'.")
    if cfg.vision_layers_used != v.num_layers - 1:
      raise ConfigError("MustDrop reads the CLS attention of the tower's last layer on the "
                        "feature layer's output; it needs vision_feature_layer -2.")
    grid = math.isqrt(v.num_patches)
    if grid % red.window:
      raise ConfigError(f"window {red.window} does not divide the {grid}x{grid} patch grid.")
  bad = [l for l in red.filter_layers if not 0 <= l < cfg.text.num_layers - 1]
  if bad:
    raise ConfigError(f"filter layers {bad} are outside [0, {cfg.text.num_layers - 1}) for a "
                      f"{cfg.text.num_layers}-layer LLM (a filter needs a later layer).")


class Stream(NamedTuple):
  """The LLM's token stream during prefill, one row per sample, static length T_ℓ.

  x: f32[B, T, D] hidden states; positions: i32[B, T] original position ids;
  valid: bool[B, T] real tokens (False: padding, empty capacity, pruned in fast mode);
  alive: bool[B, T] not pruned (reference mode masks instead of removing);
  visual: bool[B, T] visual tokens (text is never pruned);
  vslot: i32[B, T] the visual token's slot in the spliced TokenSet (-1 for text);
  index: i32[B, T] the token's index in the prompt as given.
  """
  x: jax.Array
  positions: jax.Array
  valid: jax.Array
  alive: jax.Array
  visual: jax.Array
  vslot: jax.Array
  index: jax.Array

  @property
  def keys_valid(self) -> jax.Array:
    return self.valid & self.alive


def score_visual(plan: Plan, stream: Stream, q: jax.Array, k: jax.Array) -> jax.Array:
  """The plan's scorer on one layer's rotated queries f32[B, T, H, h] and keys
  f32[B, T, K, h] -> f32[B, T] (only visual entries are read)."""
  from tokred_jax.methods import aim, fastv  # the methods import this module
  red = plan.reduction
  if red.scorer == "pagerank":
    query_valid = stream.valid if red.mode == "reference" else stream.keys_valid
    return aim.pagerank_scores(q, k, query_valid, stream.keys_valid, tau=red.pagerank_tau,
                               iterations=red.pagerank_iterations,
                               damping=red.pagerank_damping)
  return fastv.last_token_scores(q[:, -1], k, stream.keys_valid)


def prune(plan: Plan, layer: int, stream: Stream, scores: jax.Array,
          counts: Counts) -> Stream:
  """After `layer`: keep the `counts.llm_visual[layer + 1]` best-scoring live visual
  tokens. Fast mode gathers the stream down to the next layer's capacity, in original
  order; reference mode only marks the others dead."""
  capacity = plan.llm_visual[layer + 1]
  count = counts.llm_visual[layer + 1]
  live = stream.visual & stream.keys_valid
  # Rank the visual slots: live ones by score, then empty/dead ones; text never.
  rank_key = jnp.where(live, scores.astype(jnp.float32), -1e30)
  rank_key = jnp.where(stream.visual, rank_key, -jnp.inf)
  b, t = live.shape
  rows = jnp.arange(b)[:, None]
  if capacity:
    _, top = jax.lax.top_k(rank_key, capacity)
    kept_top = (jnp.arange(capacity)[None] < count) & jnp.take_along_axis(live, top, 1)
    chosen = jnp.zeros((b, t), bool).at[rows, top].set(True)
    kept = jnp.zeros((b, t), bool).at[rows, top].set(kept_top)
  else:
    chosen = kept = jnp.zeros((b, t), bool)
  if plan.reduction.mode == "reference":
    return stream._replace(alive=stream.alive & (~stream.visual | kept))
  # Every sample has the same number of visual slots, so it keeps the same number of
  # slots: the text, and the `capacity` chosen visual slots.
  new_len = t - (plan.llm_visual[layer] - capacity)
  order = jnp.argsort(stream.visual & ~chosen, axis=1, stable=True)[:, :new_len]
  take = lambda a: jnp.take_along_axis(a, order[(...,) + (None,) * (a.ndim - 2)], axis=1)
  out = Stream(*(take(a) for a in stream))
  return out._replace(valid=out.valid & (~out.visual | take(kept)))


def mustdrop_filter(plan: Plan, stream: Stream, key: jax.Array, q: jax.Array, k: jax.Array,
                    counts: Counts, visual_slots: int) -> Stream:
  """MustDrop's dual-attention filter after a filter layer (mustdrop.dual_attention_drop).

  key: bool[B, N_v] key tokens by visual slot; q, k: the layer's rotated queries
  f32[B, T, H, h] and keys f32[B, T, K, h]; visual_slots: how many of the T slots are
  visual in every sample (static), so the text rows fit T − visual_slots. Dropped
  tokens are marked dead in both modes (fast mode removes them between segments, see
  `front_load`); reference mode then renumbers the live tokens' positions
  contiguously, as the official code does.
  """
  key_token = stream.visual & jnp.take_along_axis(key, jnp.maximum(stream.vslot, 0), axis=1)
  # The text after the image (question and assistant prefix), by prompt index: fast
  # mode moves dead visual slots to the front of the stream.
  last_visual = jnp.max(jnp.where(stream.visual, stream.index, -1), axis=1, keepdims=True)
  text_query = stream.keys_valid & ~stream.visual & (stream.index > last_visual)
  text_capacity = stream.visual.shape[1] - visual_slots
  _, gamma, alpha = counts.thresholds[0], counts.thresholds[1], counts.thresholds[2]
  survive = mustdrop.dual_attention_drop(q, k, text_query, stream.visual & stream.alive,
                                         stream.keys_valid, key_token, gamma, alpha,
                                         max(text_capacity, 1))
  stream = stream._replace(alive=stream.alive & (~stream.visual | survive))
  if plan.reduction.mode == "reference":
    stream = stream._replace(positions=mustdrop.renumber_positions(stream.keys_valid))
  return stream


def front_load(stream: Stream, caches: Sequence[Any] = ()) -> tuple[Stream, tuple]:
  """Moves every visual slot holding no live token to the front, the rest keeping their
  order, so that cutting the stream to a smaller capacity is a static slice `[:, c:]`.

  caches: arrays [B, T, ...] aligned with the stream's slots (carried KV caches), which
  get the same permutation. Causality is by index among live tokens, whose order is
  unchanged, so no output depends on where dead slots sit.
  """
  removable = stream.visual & ~stream.keys_valid
  order = jnp.argsort(~removable, axis=1, stable=True)
  take = lambda a: jnp.take_along_axis(a, order[(...,) + (None,) * (a.ndim - 2)], axis=1)
  return Stream(*(take(a) for a in stream)), jax.tree_util.tree_map(take, tuple(caches))


def cut(stream: Stream, caches: Sequence[Any], drop: int) -> tuple[Stream, tuple]:
  """The stream and aligned caches without their first `drop` slots (static)."""
  return (Stream(*(a[:, drop:] for a in stream)),
          jax.tree_util.tree_map(lambda a: a[:, drop:], tuple(caches)))
