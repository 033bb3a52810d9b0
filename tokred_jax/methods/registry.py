"""The token-reduction methods by name, at their published presets or at a retention
level, and recipes composed of several methods' stages.

  recipe = methods.get("aim", cfg)                     # AIM's preset for the model
  recipe = methods.get("fastv", cfg, retention=0.25)   # FastV keeping 25% on average
  recipe = methods.get("tome+fastv", cfg, retention=0.25)  # ToMe in the tower, FastV after
  plan = base.make_plan(recipe, cfg)
  plan = base.make_plan(recipe, cfg, batching.packing(visuals.pixels, cfg))  # anyres

On LLaVA-NeXT and OneVision, stages before the LLM act per crop (per frame) and counts
derived from `cfg.num_image_tokens` are per crop; FastV and DART keep their ratio of
each prompt's own packed visual tokens (the bucket's count only bounds them).

A retention level ρ asks for ρ·N_v "equivalent tokens": the mean number of visual
tokens over the LLM layers, the field's measure (METHODS.md section 5). Every method
can be asked for any ρ in (0, 1]; pooling only for ρ = 1/s² with s dividing the grid.

A composed name joins parts with "+", each a method, a preset or a method's part
("aim.merge", "aim.prune", "mustdrop.window", "mustdrop.filter"); its stages run in
data-flow order. At a retention level ρ every part that reduces before the LLM keeps
ρ^s and the rest ρ^(1−s) (`split` s, default ½; parts in one group share theirs
equally), so the equivalent tokens multiply to ρ; presets and MustDrop's parts, whose
counts depend on the input, keep their own.
Options of one part go in a dict under its name, e.g. `fastv={"k": 3}`.
"""

from __future__ import annotations

import dataclasses

from tokred_jax.methods import aim, baselines, dart, fastv, mustdrop, pmod, tome
from tokred_jax.methods.base import Recipe, check_retention
from tokred_jax.models.config import ConfigError, LlavaConfig

BUILDERS = {"aim": aim.build, "fastv": fastv.build, "tome": tome.build,
            "random": baselines.build_random, "pooling": baselines.build_pooling,
            "pmod": pmod.build, "mustdrop": mustdrop.build, "dart": dart.build}
METHODS = ("none",) + tuple(BUILDERS)
# Presets by name: (method, keyword arguments of the method's builder).
PRESETS = {
    "aim-252": ("aim", dict(merge_r=aim.LLAVA15_MERGE_252)),
    "aim-72": ("aim", dict(merge_r=aim.LLAVA15_MERGE_72)),
    # LLaVA-OneVision video: tokens per frame after the merge.
    "aim-74": ("aim", dict(merge_r=aim.LLAVA_OV_VIDEO_MERGE_74)),
    "aim-49": ("aim", dict(merge_r=aim.LLAVA_OV_VIDEO_MERGE_49)),
    "aim-25": ("aim", dict(merge_r=aim.LLAVA_OV_VIDEO_MERGE_25)),
    "fastv-k2-r50": ("fastv", dict(k=fastv.FASTV_K, r=fastv.FASTV_R)),
    "pooling-2x2": ("pooling", dict(stride=2)),
    **{f"mustdrop-{label}": ("mustdrop", dict(gamma=g, alpha=a))
       for label, (g, a) in mustdrop.PRESETS.items()},
    **{f"dart-{b}": ("dart", dict(budget=b)) for b in sorted(dart.DART_BUDGETS, reverse=True)},
}
# Parts of a method a recipe can take alone: name -> (method, builder options).
PARTS = {
    "aim.merge": ("aim", dict(parts=("merge",))),
    "aim.prune": ("aim", dict(parts=("prune",))),
    "mustdrop.window": ("mustdrop", dict(parts=("window",))),
    "mustdrop.filter": ("mustdrop", dict(parts=("filter",))),
}
# Parts that reduce before the LLM (they take ρ^split of a composed retention), and
# those that take no retention level (their counts depend on the input).
_EARLY = {"tome", "random", "pooling", "aim.merge"}
_UNTUNED = {"mustdrop", "mustdrop.window", "mustdrop.filter"}


def _one(name: str, cfg: LlavaConfig, retention, mode: str, kwargs: dict) -> Recipe:
  base = name
  if name in PRESETS:
    base, preset = PRESETS[name]
    kwargs = {**preset, **kwargs}
  elif name in PARTS:
    base, part = PARTS[name]
    kwargs = {**part, **kwargs}
  if base == "none":
    if retention not in (None, 1, 1.0):
      raise ConfigError("method 'none' keeps every token; pick a method to reduce them.")
    return Recipe(mode=mode)
  if base not in BUILDERS:
    raise ConfigError(f"unknown method {name!r}; choose from {METHODS}, the presets "
                      f"{sorted(PRESETS)} or the parts {sorted(PARTS)} (joined with '+').")
  if retention is not None:
    kwargs["retention"] = retention
  recipe = BUILDERS[base](cfg, mode=mode, **kwargs)
  return dataclasses.replace(recipe, name=name, mode=mode)


def get(name: str, cfg: LlavaConfig, retention: float | None = None, mode: str = "fast",
        split: float = 0.5, **kwargs) -> Recipe:
  """A method (METHODS), a preset (PRESETS), a part (PARTS) or several joined with "+",
  optionally at a retention level. kwargs go to the method's builder; for a composed
  name, each part's options are a dict under its name."""
  if not isinstance(name, str) or not name:
    raise ConfigError(f"a method name must be a non-empty string, got {name!r}.")
  names = name.split("+")
  if len(names) == 1:
    return _one(name, cfg, retention, mode, kwargs)
  unknown = set(kwargs) - set(names)
  if unknown:
    raise ConfigError(f"options {sorted(unknown)} of a composed recipe must be given per "
                      f"part, e.g. {names[0]}={{...}}.")
  if retention is not None:
    check_retention(retention)
    if not 0 < split < 1:
      raise ConfigError(f"split must lie in (0, 1), got {split}.")
  tunable = [n for n in names if n not in PRESETS and n not in _UNTUNED]
  early = [n for n in tunable if n in _EARLY]
  late = [n for n in tunable if n not in _EARLY]

  def share(part):
    if retention is None or part not in tunable:
      return None
    group = early if part in early else late
    total = retention ** (split if part in early else 1 - split) if early and late \
        else retention
    return total ** (1 / len(group))

  recipe = Recipe(mode=mode)
  for part in names:
    recipe = recipe + _one(part, cfg, share(part), mode, dict(kwargs.get(part, {})))
  return dataclasses.replace(recipe, name=name, mode=mode)
