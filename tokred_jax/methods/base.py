"""The stage protocol, recipes, and the static plan a recipe compiles to.

A method is one or more *stages*. A `Stage` is a frozen dataclass of settings (from a
config or a builder); `Stage.plan(flow)` checks it against the model and the tokens
that reach it, records in `flow` what it does to the token counts, and returns a
`StagePlan`: a frozen dataclass whose compared fields are everything that shapes the
compiled program (capacities, static settings) and whose `traced()` values reach the
program as arrays (exact counts, thresholds), so plans that differ only in those share
a program. A `Recipe` is an ordered tuple of stages from one method or several; its
`Plan` is the tuple of stage plans plus the per-layer counts they add up to, and hashes
by its own fields: it is the static argument of every jitted function.

The models call the stage plans at their hook points and know no method (the per-call
state each hook gets is models/hooks.py's `Run`):

  vision_layer(run, c, index, layer, ts, next)   around tower layer `index`
  tower_output(run, c, ts)                       the tower's output, CLS still in
  before_projector(run, c, ts)                   CLS dropped, tower features
  after_projector(run, c, ts)                    projected features (per crop or frame)
  after_packing(run, c, ts)                      anyres crops or frames as one sequence
  llm_layer(run, c, index, layer, stream, next)  around decoder layer `index`
  after_llm_layer(run, c, index, q, k, stream)   after decoder layer `index`
  prefill_caches(run, c, caches)                 the per-layer caches after prefill
  decode_positions(run, c, cache_valid, positions)  the first decoded position per layer
  aux(run, c, aux)                               what a forward reports
`c` is the stage's traced values; an "around" hook calls `next` to run what it wraps.
Every hook's default passes its input through, so a stage overrides only its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

from tokred_jax.core import tokens
from tokred_jax.models.config import ConfigError, LlavaConfig

MODES = ("fast", "reference")
# How fast mode sizes its data-dependent cuts (engine/segmented.py); on the ladder each
# step is LADDER of the one above, so a capacity holds at most 1/LADDER of its count.
SIZINGS = ("learned", "ladder", "host")
LADDER = 0.5
# Where stages act, in data-flow order (a recipe's stages are ordered by it).
POINTS = ("vision", "tower_output", "before_projector", "after_projector", "llm")


class Count(NamedTuple):
  """A token count: the exact number, and the static capacity it is rounded up to."""
  exact: int
  cap: int


def bucket(n: int, size: int, limit: int) -> int:
  """n rounded up to a multiple of `size`, at most `limit`; 0 stays 0."""
  return min(limit, tokens.bucket_up(n, size)) if n > 0 else 0


@dataclasses.dataclass
class Flow:
  """The token counts at the point planning has reached (mutable, planning only).

  vision: per tower layer run, the tokens entering its attention and its MLP;
  visual: visual tokens (CLS excluded) at the current pre-LLM point;
  projector: tokens the projector runs on (set when planning passes it);
  llm: visual tokens each decoder layer processes; routed: p-MoD's routed count of a
  layer (None: the layer is dense); score_layers: layers whose attention a stage reads
  to prune; data_dependent: the stage whose counts depend on the input (None: all are
  exact); locked: a stage that needs the visual tokens unchanged until the LLM;
  changed: the first stage that changed the visual tokens after the tower;
  packing: how an anyres model packs crops or frames into one sequence per prompt
  (models.llava_next.Packing, models.llava_onevision.Packing; None: one image, one
  crop): the counts before the LLM are per crop, the LLM's per prompt.
  """
  cfg: LlavaConfig
  mode: str
  bucket: int
  packing: Any = None
  point: int = 0
  vision: list = dataclasses.field(default_factory=list)
  visual: Count | None = None
  projector: Count | None = None
  llm: list = dataclasses.field(default_factory=list)
  routed: list = dataclasses.field(default_factory=list)
  score_layers: set = dataclasses.field(default_factory=set)
  data_dependent: str | None = None
  locked: str | None = None
  changed: str | None = None

  def __post_init__(self):
    n = Count(self.cfg.vision.seq_len, self.cfg.vision.seq_len)
    self.vision = [(n, n) for _ in range(self.cfg.vision_layers_used)]

  @property
  def tower_tokens(self) -> Count:
    """Tokens leaving the tower (CLS included): what the last layer's MLP ran on."""
    return self.vision[-1][1]

  def bucket_to(self, n: int, limit: int) -> Count:
    size = self.bucket if self.packing is None else self.packing.crop_bucket(self.bucket)
    return Count(n, bucket(n, size, limit))

  def advance(self, point: str, stage: str):
    """Moves planning on to `point` (a stage of `stage` acts there)."""
    target = POINTS.index(point)
    if target < self.point:
      raise ConfigError(f"{stage} acts at {point!r}, before a stage already planned at "
                        f"{POINTS[self.point]!r}: order the recipe's stages as the tokens "
                        f"flow ({' -> '.join(POINTS)}).")
    while self.point < target:
      self.point += 1
      now = POINTS[self.point]
      if now == "before_projector":
        tower, cls = self.tower_tokens, int(self.cfg.drops_cls)
        self.visual = Count(tower.exact - cls, tower.cap - cls)
      elif now == "after_projector":
        self.projector = self.visual
        if self.packing is not None:  # e.g. video frames pooled after the projector
          self.visual = Count(*self.packing.after_projector(tuple(self.visual),
                                                            self.cfg.num_image_tokens))
      elif now == "llm":
        if self.packing is not None:  # crops or frames into one sequence per prompt
          self.visual = Count(*self.packing.visual(tuple(self.visual),
                                                   self.cfg.num_image_tokens))
        self.llm = [self.visual] * self.cfg.text.num_layers
        self.routed = [None] * self.cfg.text.num_layers

  def change_visual(self, stage: str):
    """A stage that changes the visual tokens before the LLM checks nothing forbids it."""
    if self.locked:
      raise ConfigError(f"{stage} changes the visual tokens after {self.locked}, which needs "
                        "them unchanged until the LLM; put it earlier or drop one of them.")
    self.changed = self.changed or stage


class StagePlan:
  """A planned stage: compared fields shape the program, `traced()` values do not.

  Subclasses are frozen dataclasses; exact counts that travel as traced values are
  fields with compare=False. `name` labels the stage in errors and tables.
  """
  name: ClassVar[str] = "stage"
  # Set by stages whose counts depend on the input: the segmented prefill cuts the
  # program at these places, ("vision", i) after tower layer i or ("llm", l) after
  # decoder layer l, and compacts to the largest count over the batch.
  cuts: ClassVar[tuple] = ()
  # Layers from this one on keep, for decoding, only the tokens that survive the whole
  # prefill (MustDrop's output-aware cache); None: every layer keeps what it processed.
  trim_caches_from: ClassVar[int | None] = None

  def traced(self) -> Any:
    return ()

  # --- hooks (each passes its input through unless a stage overrides it) ---
  def vision_layer(self, run, c, index, layer, ts, next):
    return next(ts)

  def tower_output(self, run, c, ts):
    return ts

  def before_projector(self, run, c, ts):
    return ts

  def after_projector(self, run, c, ts):
    return ts

  def after_packing(self, run, c, ts):
    """The anyres models' crops (or frames) packed into one sequence per prompt; its
    `sources` map each crop patch (crop · g² + patch) to its slot."""
    return ts

  def llm_layer(self, run, c, index, layer, stream, next):
    return next(stream)

  def after_llm_layer(self, run, c, index, q, k, stream):
    return stream

  def prefill_caches(self, run, c, caches):
    return caches

  def decode_positions(self, run, c, cache_valid, positions):
    return positions

  def aux(self, run, c, aux):
    return aux

  # --- cost (matmul FLOPs the stage adds beyond the layers it shortens) ---
  def extra_flops(self, cfg: LlavaConfig, num_text: int, visual_in: Sequence[int],
                  processed: Sequence[int]) -> dict[str, int]:
    """FLOPs per sample by cost stage ("vision", "llm"), e.g. a scorer's logits, given
    the prompt's text tokens, the visual tokens entering each decoder layer and the
    tokens each layer processes (text included)."""
    del cfg, num_text, visual_in, processed
    return {}


class Stage:
  """A stage's settings. Subclasses are frozen dataclasses with `point` (where the stage
  first acts, one of POINTS) and `plan(flow) -> StagePlan`."""
  point: ClassVar[str] = "llm"
  name: ClassVar[str] = "stage"

  def plan(self, flow: Flow) -> StagePlan:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An ordered tuple of stages, from one method or several (empty: no reduction).

  name: the method or recipe name, for tables; mode: "fast" gathers kept tokens into
  shorter arrays (real savings), "reference" reproduces the official code, which masks;
  token_bucket: capacities are counts rounded up to a multiple of it;
  sizing: where counts depend on the input (MustDrop, fast mode), how the prefill sizes
  each cut (engine/segmented.py): "learned" runs one program at the capacities earlier
  prompts of the shape needed, checking on the device that none overflows (if one does,
  that prompt reruns on the host path and the capacities grow); "ladder" picks on the
  device the smallest step of a ladder whose steps shrink by `ladder`; "host" reads each
  count and runs the next segment at exactly its bucket (a read and a launch per cut).
  """
  stages: tuple[Stage, ...] = ()
  name: str = "none"
  mode: str = "fast"
  token_bucket: int = 16
  sizing: str = SIZINGS[0]
  ladder: float = LADDER

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f"mode {self.mode!r} is not one of {MODES}.")
    if isinstance(self.token_bucket, bool) or not isinstance(self.token_bucket, int) \
        or self.token_bucket < 1:
      raise ConfigError(f"token_bucket must be an int >= 1, got {self.token_bucket!r}.")
    if self.sizing not in SIZINGS:
      raise ConfigError(f"sizing {self.sizing!r} is not one of {SIZINGS}.")
    if isinstance(self.ladder, bool) or not isinstance(self.ladder, (int, float)) \
        or not 0 < self.ladder < 1:
      raise ConfigError(f"ladder must be a ratio in (0, 1), got {self.ladder!r}.")
    object.__setattr__(self, "stages", tuple(self.stages))

  def find(self, kind: type) -> Stage | None:
    """The recipe's first stage of class `kind`, or None."""
    return next((s for s in self.stages if isinstance(s, kind)), None)

  def __add__(self, other: "Recipe") -> "Recipe":
    """The two recipes' stages in one, in data-flow order (stable for equal points)."""
    stages = sorted(self.stages + other.stages, key=lambda s: POINTS.index(s.point))
    name = "+".join(n for n in (self.name, other.name) if n != "none") or "none"
    # A part's own sizing wins over the default; the finer ladder of the two.
    sizing = self.sizing if self.sizing != SIZINGS[0] else other.sizing
    return Recipe(tuple(stages), name, self.mode, min(self.token_bucket, other.token_bucket),
                  sizing, max(self.ladder, other.ladder))


class Exact(NamedTuple):
  """A plan's exact counts (Python ints), which its capacities were rounded up from."""
  vision_tokens: tuple[int, ...]
  visual: int
  llm_visual: tuple[int, ...]
  mod_visual: tuple[int | None, ...]
  vision_mlp: tuple[int, ...]
  projector: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static capacities for one model and one recipe (hashable: a jit static arg).

  Two plans are equal (and hash alike) when they compile to the same program: every
  field but `recipe` and `exact` is compared; the stage plans leave out their traced
  values, which reach the program as `counts()`.

  stages: the stage plans; mode, token_bucket: the recipe's;
  vision_tokens: tower tokens (CLS included) entering each layer run (capacity);
  vision_mlp: tokens entering each layer's MLP (ToMe merges in between);
  projector_tokens: tokens the projector runs on; num_visual: visual-token capacity
  spliced into the prompt; llm_visual: visual-token capacity of each LLM layer;
  mod_visual: visual tokens each p-MoD layer processes (capacity), None: not routed;
  score_layers: layers whose attention ranks the visual tokens for the next layer,
    those after which the EXACT count drops; data_dependent: the stage whose counts
    depend on the input (None: every count is exact); packing: the input bucket of an
    anyres model (see `Flow`), None for one crop per prompt; sizing, ladder: the recipe's.
  """
  recipe: Recipe = dataclasses.field(compare=False)
  stages: tuple[StagePlan, ...]
  mode: str
  token_bucket: int
  vision_tokens: tuple[int, ...]
  vision_mlp: tuple[int, ...]
  projector_tokens: int
  num_visual: int
  llm_visual: tuple[int, ...]
  mod_visual: tuple[int | None, ...]
  score_layers: tuple[int, ...]
  data_dependent: str | None
  exact: Exact = dataclasses.field(compare=False, hash=False)
  packing: Any = None
  sizing: str = SIZINGS[0]
  ladder: float = LADDER

  @property
  def name(self) -> str:
    return self.recipe.name

  @property
  def visual_per_layer(self) -> tuple[int, ...]:
    """Exact visual tokens each LLM layer processes (p-MoD's routed ones where routed)."""
    return tuple(l if m is None else m for l, m in zip(self.exact.llm_visual,
                                                      self.exact.mod_visual))

  def counts(self) -> tuple:
    """The traced values of every stage, in stage order (an argument of the program)."""
    return tuple(s.traced() for s in self.stages)

  def find(self, kind: type) -> StagePlan | None:
    """The plan's first stage plan of class `kind`, or None."""
    return next((s for s in self.stages if isinstance(s, kind)), None)

  @property
  def cuts(self) -> tuple:
    """Where the segmented prefill cuts the program (see `StagePlan.cuts`), in order."""
    order = lambda cut: (cut[0] == "llm", cut[1])
    return tuple(sorted({c for s in self.stages for c in s.cuts}, key=order))


def make_plan(recipe: Recipe, cfg: LlavaConfig, packing: Any = None) -> Plan:
  """Plans every stage of `recipe` for the model, in order; checks each against what
  reaches it (a ConfigError names the stage and the fix). packing: the input bucket of
  an anyres model (see `Flow`)."""
  if not isinstance(recipe, Recipe):
    raise TypeError(f"make_plan needs a Recipe (methods.get(name, cfg)), got {recipe!r}.")
  if (packing is None) != (cfg.arch == "llava"):
    raise ConfigError(f"{cfg.arch} plans are made per input bucket: pass packing= (from "
                      "the prepared batch)." if packing is None else
                      "packing is for the anyres models; a llava model takes one crop.")
  flow = Flow(cfg, recipe.mode, recipe.token_bucket, packing)
  stages = []
  for stage in recipe.stages:
    flow.advance(stage.point, stage.name)
    stages.append(stage.plan(flow))
  flow.advance("llm", "the LLM")
  llm = flow.llm
  # Score wherever the exact count drops, whether or not its capacity does.
  score_layers = tuple(sorted(l for l in flow.score_layers if llm[l + 1].exact < llm[l].exact))
  return Plan(
      recipe, tuple(stages), recipe.mode, recipe.token_bucket,
      vision_tokens=tuple(a.cap for a, _ in flow.vision),
      vision_mlp=tuple(m.cap for _, m in flow.vision),
      projector_tokens=flow.projector.cap, num_visual=flow.visual.cap,
      llm_visual=tuple(c.cap for c in llm),
      mod_visual=tuple(None if r is None else r.cap for r in flow.routed),
      score_layers=score_layers, data_dependent=flow.data_dependent,
      exact=Exact(tuple(a.exact for a, _ in flow.vision), flow.visual.exact,
                  tuple(c.exact for c in llm),
                  tuple(None if r is None else r.exact for r in flow.routed),
                  tuple(m.exact for _, m in flow.vision), flow.projector.exact),
      packing=packing, sizing=recipe.sizing, ladder=recipe.ladder)


def check_retention(retention: float):
  if isinstance(retention, bool) or not isinstance(retention, (int, float)) \
      or not 0 < retention <= 1:
    raise ConfigError(f"retention must be in (0, 1] (the fraction of visual tokens kept "
                      f"on average), got {retention!r}.")


def floor_count(n: int, ratio: float) -> int:
  """⌊n · ratio⌋; the epsilon keeps float noise such as 3 · (1 − 1/3) = 1.999... from
  losing a token."""
  return int(math.floor(n * ratio + 1e-9))
