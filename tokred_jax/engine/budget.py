"""A method's parameters that meet a cost budget, for one model and prompt length.

  sol = budget.solve(cfg, "aim", 0.3)                       # 30% of dense prefill FLOPs
  sol = budget.solve(cfg, "fastv", 0.5, measure="kv")       # half the dense KV cache
  sol = budget.solve(cfg, "tome", 64, measure="tokens")     # 64 equivalent visual tokens
  sol = budget.solve(cfg, "tome+fastv", 0.3, split=0.4)     # a composed recipe
  sol.plan, sol.params, sol.achieved, sol.exact; print(sol.note)
  pipe.plan("aim", budget=0.3)                              # the plan, from a Pipeline

Measures, from `cost.plan_cost(cfg, plan, num_text_tokens, exact=True)` (the cost model
the FLOPs tests check against XLA) at the method's exact counts:
  flops   prefill matmul FLOPs, every stage, as a fraction of the dense plan's
  kv      KV-cache bytes after prefill, as a fraction of the dense plan's
  tokens  equivalent visual tokens (mean over LLM layers of `Plan.visual_per_layer`)

How. Each method is a family of settings along one knob x in (0, 1] (its retention
level; p-MoD's schedule shift or ratio; pooling's largest 1/s² <= x), along which the
measure does not decrease, step-wise. A composed recipe ("tome+fastv", "aim.merge+pmod",
parts joined with "+") or a single part ("aim.merge") is one family along its retention
level with the recipe's `split` fixed (default ½: `methods.get` gives the parts that
reduce before the LLM ρ^split of it and the rest ρ^(1−split)); its parameters are the
retention, the split and each stage's own (e.g. "tome.r", "fastv.r"), and presets in it
keep their counts. `search` bisects any `make(x) -> Plan` for any
`measure(plan) -> float`: first for the smallest x the builder accepts, then for the
step the measure crosses the target at, whose two sides are the candidates. A target
met within `tolerance` (relative) is `exact`; one inside the reachable range but between
two steps gets the nearest step, `exact=False`; one outside it is a ConfigError naming
the range. FastV alone without `k` tries k = 2, then 1 (the published k where it reaches
the budget, fewer dense layers below that, as the evaluation's sweep does); in a recipe it
keeps its k (2, or fastv={"k": 1}). MustDrop's counts depend on the data, so no budget
can be solved for it, alone or in a recipe.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

from tokred_jax import methods
from tokred_jax.engine import cost
from tokred_jax.methods import aim, baselines, fastv, pmod, tome
from tokred_jax.methods.base import Plan, Recipe, make_plan
from tokred_jax.models.config import ConfigError, LlavaConfig

MEASURES = ("flops", "kv", "tokens")
TEXT_TOKENS = 64  # the prompt length budgets are solved at when none is given
TOLERANCE = 0.02
_UNITS = {"flops": "of dense prefill FLOPs", "kv": "of the dense KV cache",
          "tokens": "equivalent visual tokens"}
_SMALLEST = 1e-6  # the knob's low end (the knob is in (0, 1])
_STEPS = 60


@dataclasses.dataclass(frozen=True)
class Point:
  x: float  # the knob
  value: float  # the measure there
  plan: Plan


@dataclasses.dataclass(frozen=True)
class Span:
  """A family's reachable range (its lowest and highest points) and the points either
  side of the target: `below` the highest under it, `above` the lowest at or over it
  (None where the target is outside the range)."""
  lowest: Point
  highest: Point
  below: Point | None
  above: Point | None


def search(make: Callable[[float], Plan], measure: Callable[[Plan], float],
           target: float) -> Span:
  """Bisects the knob x in (0, 1] of `make` (a ConfigError where the builder cannot
  reach x; what it accepts an interval up to 1) for where `measure` crosses `target`.
  make(1) raising is the method not running on this model at all: that error is kept."""
  def at(x: float) -> Point | None:
    try:
      plan = make(x)
    except ConfigError:
      return None
    return Point(x, measure(plan), plan)

  plan = make(1.0)
  highest = Point(1.0, measure(plan), plan)
  lowest = at(_SMALLEST)
  if lowest is None:
    bad, lowest = _SMALLEST, highest
    for _ in range(_STEPS):
      mid = (bad + lowest.x) / 2
      bad, lowest = (mid, lowest) if (p := at(mid)) is None else (bad, p)
  if target <= lowest.value:
    return Span(lowest, highest, None, lowest)
  if target > highest.value:
    return Span(lowest, highest, highest, None)
  below, above = lowest, highest
  while above.x - below.x > 1e-12:
    p = at((below.x + above.x) / 2)
    if p is None:  # not an interval after all: keep the bracket found so far
      break
    below, above = (p, above) if p.value < target else (below, p)
  return Span(lowest, highest, below, above)


@dataclasses.dataclass(frozen=True)
class Family:
  """Settings along one knob: make(x) -> Recipe, and params(x, recipe) -> the method's
  parameters there, by name."""
  make: Callable[[float], Recipe]
  params: Callable[[float, Recipe], dict[str, Any]]


def _aim(cfg, mode, kw):
  l1, l2 = kw["schedule"] if kw.get("schedule") else (kw.get("l1"), kw.get("l2"))
  if l1 is None and l2 is None:
    l1, l2 = aim.default_schedule(cfg.text.num_layers)
  def params(x, recipe):
    merge = recipe.find(aim.Merge)
    return dict(retention=x, merge_r=merge.steps if merge else (), l1=l1, l2=l2)
  return [Family(lambda x: methods.get("aim", cfg, x, mode, **kw), params)]


def _fastv(cfg, mode, kw):
  ks = [kw.pop("k")] if "k" in kw else range(min(fastv.FASTV_K, cfg.text.num_layers - 1), 0, -1)
  return [Family(lambda x, k=k: methods.get("fastv", cfg, x, mode, k=k, **kw),
                 lambda x, recipe, k=k: dict(retention=x, k=k,
                                             r=1 - recipe.find(fastv.LastToken).ratios[-1]))
          for k in ks]


def _by_retention(name: str, kind: type, field: str):
  """A method whose knob is its builder's retention, reported with one field of its
  stage."""
  return lambda cfg, mode, kw: [Family(lambda x: methods.get(name, cfg, x, mode, **kw),
                                       lambda x, recipe: {"retention": x, field: getattr(
                                           recipe.find(kind), field)})]


def _pooling(cfg, mode, kw):
  grid = math.isqrt(cfg.num_image_tokens)
  strides = [s for s in range(1, grid + 1) if grid % s == 0]
  stride = lambda x: next((s for s in strides if s ** -2 <= x + 1e-12), strides[-1])
  def params(x, recipe):
    pool = recipe.find(baselines.Pool)
    return dict(stride=pool.stride if pool else 1)  # stride 1 is no stage at all
  return [Family(lambda x: methods.get("pooling", cfg, None, mode, stride=stride(x), **kw),
                 params)]


def _pmod(cfg, mode, kw):
  schedule = kw.pop("schedule", None) or "cosine"
  if schedule == "stepped":
    raise ConfigError("the p-MoD stepped schedule has no knob a budget can set; use the "
                      "cosine, linear, constant or interleaved schedule.")
  # cosine/linear: the shift over [-1, 2], which takes every layer from the floor to
  # dense (as pmod.fit_mean bisects it); constant/interleaved: the ratio itself.
  knob, value = (("ratio", lambda x: x) if schedule in ("constant", "interleaved")
                 else ("shift", lambda x: 3 * x - 1))
  return [Family(lambda x: methods.get("pmod", cfg, None, mode, schedule=schedule,
                                       **{knob: value(x)}, **kw),
                 lambda x, recipe: {"schedule": schedule, knob: value(x),
                                    "ratios": recipe.find(pmod.Route).ratios})]


def _none(cfg, mode, kw):
  return [Family(lambda x: methods.get("none", cfg, None, mode, **kw), lambda x, recipe: {})]


def _fastv_params(ratios) -> dict[str, Any]:
  """FastV's k (the layers before the drop; none where nothing drops) and r."""
  r = 1 - ratios[-1]
  return {"k": ratios.index(ratios[-1]), "r": r} if r > 0 else {"r": r}


# What each stage reports of itself in a composed recipe's parameters, under its key.
_STAGE_PARAMS = {
    aim.Merge: ("aim.merge", lambda s: {"merge_r": s.steps}),
    aim.PageRank: ("aim.prune", lambda s: {"ratios": s.ratios}),
    fastv.LastToken: ("fastv", lambda s: _fastv_params(s.ratios)),
    tome.Tome: ("tome", lambda s: {"r": s.r}),
    baselines.Random: ("random", lambda s: {"keep": s.keep}),
    baselines.Pool: ("pooling", lambda s: {"stride": s.stride}),
    pmod.Route: ("pmod", lambda s: {"ratios": s.ratios}),
}


def _recipe(name: str):
  """A composed recipe or a single part: one family along the retention level, the
  split (composed only) fixed."""
  def families(cfg, mode, kw):
    split = {"split": kw.pop("split", 0.5)} if "+" in name else {}
    def params(x, recipe):
      out = {"retention": x, **split}
      for stage in recipe.stages:
        key, of = _STAGE_PARAMS.get(type(stage), (stage.name, lambda s: {}))
        out.update({f"{key}.{k}": v for k, v in of(stage).items()})
      return out
    return [Family(lambda x: methods.get(name, cfg, x, mode, **split, **kw), params)]
  return families


# Per method: its families, and the builder arguments the budget sets (not to be given).
FAMILIES = {"aim": _aim, "fastv": _fastv, "tome": _by_retention("tome", tome.Tome, "r"),
            "random": _by_retention("random", baselines.Random, "keep"), "pooling": _pooling,
            "pmod": _pmod, "none": _none}
SOLVED = {"aim": ("merge_r",), "fastv": ("r",), "tome": ("r",), "random": (),
          "pooling": ("stride",), "pmod": ("shift", "ratio"), "none": (), "mustdrop": ()}


def _base(part: str) -> str:
  """The method a name of METHODS, PRESETS or PARTS belongs to."""
  if part in methods.PRESETS:
    return methods.PRESETS[part][0]
  return methods.PARTS[part][0] if part in methods.PARTS else part


@dataclasses.dataclass(frozen=True)
class Solution:
  """The setting a budget asked for. `params`: the method's parameters chosen (e.g.
  retention, merge_r, l1, l2 for AIM; stride for pooling; retention, split, tome.r,
  fastv.k, fastv.r for "tome+fastv"); `achieved`: the measure at them; `exact`: within
  the tolerance of `target`, else the nearest feasible point; `reachable`: the
  measure's range for this method, model and prompt length."""
  recipe: Recipe
  plan: Plan = dataclasses.field(repr=False)
  measure: str
  target: float
  achieved: float
  exact: bool
  params: dict[str, Any] = dataclasses.field(hash=False)
  reachable: tuple[float, float]
  num_text_tokens: int
  note: str


def _fmt(value) -> str:
  if isinstance(value, tuple):
    items = [_fmt(v) for v in value]
    return "(" + ", ".join(items if len(items) <= 6 else items[:3] + ["..."] + items[-2:]) + ")"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def check(method: str, target: float, measure: str = "flops", tolerance: float = TOLERANCE,
          num_text_tokens: int = TEXT_TOKENS, method_kwargs: dict | None = None):
  """One-line ConfigErrors for every malformed input to `solve`, from the input alone
  (no model needed)."""
  kwargs = method_kwargs or {}
  if measure not in MEASURES:
    raise ConfigError(f"unknown budget measure {measure!r}; choose flops (fraction of dense "
                      "prefill FLOPs), kv (of the dense KV cache) or tokens (equivalent "
                      "visual tokens).")
  if (isinstance(target, bool) or not isinstance(target, numbers.Real)
      or not math.isfinite(target)):
    raise ConfigError(f"budget must be a number, got {target!r}; e.g. 0.3 for 30% of dense.")
  if measure != "tokens" and not 0 < target <= 1:
    raise ConfigError(f"a {measure} budget is a fraction of the dense model's in (0, 1], got "
                      f"{target}; e.g. 0.3 for 30%.")
  if measure == "tokens" and target <= 0:
    raise ConfigError(f"a tokens budget is a positive count of equivalent visual tokens, got "
                      f"{target}.")
  if not 0 <= tolerance < 1:
    raise ConfigError(f"tolerance is relative and must be in [0, 1), got {tolerance}.")
  if isinstance(num_text_tokens, bool) or not isinstance(num_text_tokens, int) or \
      num_text_tokens < 0:
    raise ConfigError(f"num_text_tokens must be a count >= 0, got {num_text_tokens!r}.")
  if "retention" in kwargs:
    raise ConfigError("give a retention or a budget, not both: the budget sets the retention.")
  parts = method.split("+") if isinstance(method, str) else [method]
  known = methods.METHODS + tuple(methods.PRESETS) + tuple(methods.PARTS)
  bad = next((p for p in parts if p not in known), None)
  if bad is not None:
    where = f" in {method!r}" if len(parts) > 1 else ""
    raise ConfigError(f"unknown method {bad!r}{where}; choose from {methods.METHODS}, the presets "
                      f"{sorted(methods.PRESETS)} or the parts {sorted(methods.PARTS)} "
                      "(joined with '+').")
  if "mustdrop" in map(_base, parts):
    raise ConfigError("MustDrop's token counts depend on the image and the question, so no "
                      "budget can be solved for it; run a preset (mustdrop-192, -128, -64) "
                      "and read its measured cost.")
  if "split" in kwargs:
    split = kwargs["split"]
    if len(parts) == 1:
      raise ConfigError(f"split shares a composed recipe's retention between its parts (e.g. "
                        f"'tome+fastv'); {method} is one part, so drop it.")
    if (isinstance(split, bool) or not isinstance(split, numbers.Real)
        or not 0 < split < 1):
      raise ConfigError(f"split must lie in (0, 1) (the share of the retention's exponent "
                        f"the parts before the LLM take), got {split!r}.")
  for part in parts if len(parts) > 1 else ():
    options = kwargs.get(part, {})
    given = [k for k in SOLVED.get(_base(part), ()) + ("retention",) if k in options]
    if given and part not in methods.PRESETS:
      raise ConfigError(f"{part}'s {given[0]} in {method} is what the budget sets; drop it, "
                        "or drop the budget.")


def measure_of(cfg: LlavaConfig, measure: str, num_text_tokens: int = TEXT_TOKENS,
               packing: Any = None) -> Callable[[Plan], float]:
  """plan -> its value of `measure` (see the module docstring) for a model of `cfg` and
  a prompt of `num_text_tokens` text tokens (packing: the input bucket of an anyres
  model, against whose dense plan fractions are taken)."""
  if measure == "tokens":
    return lambda plan: cost.equivalent_visual_tokens(plan.visual_per_layer)
  of = (lambda c: c["flops"].total) if measure == "flops" else (lambda c: c["kv_bytes"].total)
  dense = of(cost.plan_cost(cfg, make_plan(Recipe(), cfg, packing), num_text_tokens,
                            exact=True))
  return lambda plan: of(cost.plan_cost(cfg, plan, num_text_tokens, exact=True)) / dense


def _nearest(spans, target: float, tolerance: float):
  """(family, span, point): the first family whose point nearest `target` is within
  `tolerance` (relative), else the nearest point of any (the first of equals)."""
  err = lambda p: abs(p.value / target - 1)
  best = None
  for family, span in spans:
    point = min((p for p in (span.below, span.above) if p), key=err)
    if err(point) <= tolerance:
      return family, span, point
    if best is None or err(point) < err(best[2]) - 1e-12:
      best = (family, span, point)
  return best


def solve(cfg: LlavaConfig, method: str, budget: float, *, measure: str = "flops",
          num_text_tokens: int = TEXT_TOKENS, mode: str = "fast",
          tolerance: float = TOLERANCE, packing: Any = None, **method_kwargs) -> Solution:
  """The parameters of `method` (a name of methods.METHODS or PRESETS; a preset solves
  with its method, keeping what the budget does not set, e.g. FastV's k; a part of
  methods.PARTS or several names joined with "+") whose `measure` is `budget` for a
  model of `cfg` and a prompt of `num_text_tokens` text tokens (see the module
  docstring). method_kwargs go to the method's builder (AIM's l1 and l2, FastV's k,
  p-MoD's schedule, ...; for a composed recipe `split` and a dict per part, e.g.
  fastv={"k": 1}); those the budget sets are refused. packing: the input bucket of an
  anyres model (`io.batching.packing`, required there, as for `make_plan`): its packed
  visual count, crops and frames are what the measure counts.

  Raises ConfigError for malformed input, a method without a budget (MustDrop), and a
  budget outside what the method reaches here (the message names the range)."""
  check(method, budget, measure, tolerance, num_text_tokens, method_kwargs)
  name, kwargs = method, dict(method_kwargs)
  if name in methods.PRESETS:
    name, preset = methods.PRESETS[name]
    kwargs = {**{k: v for k, v in preset.items() if k not in SOLVED.get(name, ())}, **kwargs}
  given = [k for k in SOLVED.get(_base(name), ()) if k in kwargs]
  if given:
    raise ConfigError(f"{name}'s {given[0]} is what the budget sets; drop it, or drop the "
                      "budget.")
  unit = _UNITS[measure]
  of = measure_of(cfg, measure, num_text_tokens, packing)
  spans = []
  for family in FAMILIES.get(name, _recipe(name))(cfg, mode, kwargs):
    span = search(lambda x, f=family: make_plan(f.make(x), cfg, packing), of, budget)
    spans.append((family, span))
  family, span, point = _nearest(spans, budget, tolerance)
  low = min(s.lowest.value for _, s in spans)
  high = max(s.highest.value for _, s in spans)
  exact = abs(point.value / budget - 1) <= tolerance
  if not exact and not low <= budget <= high:
    where = (f"only {_fmt(low)}" if math.isclose(low, high) else
             f"{_fmt(low)} to {_fmt(high)}")
    raise ConfigError(f"{method} reaches {where} {unit} on this model at {num_text_tokens} "
                      f"text tokens, not {budget:g}; ask for a budget in that range.")
  params = family.params(point.x, point.plan.recipe)
  shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
  note = (f"{method} at {point.value:.4g} {unit} (asked {budget:g}, {num_text_tokens} text "
          f"tokens)" + (f": {shown}" if shown else ""))
  if not exact:
    sides = " and ".join(f"{p.value:.4g}" for p in (span.below, span.above) if p)
    note = f"nearest feasible: {note}; no setting between {sides}"
  return Solution(point.plan.recipe, point.plan, measure, float(budget), point.value, exact,
                  params, (low, high), num_text_tokens, note)
