"""Token-reduction methods as stages, one file per method, and their registry.

  recipe = methods.get("aim", cfg)                    # AIM's preset for the model
  recipe = methods.get("fastv", cfg, retention=0.25)  # FastV keeping 25% on average
  plan = methods.make_plan(recipe, cfg)               # the static plan: a jit argument

base.py holds the stage protocol, recipes and plans; registry.py the names.
"""

from tokred_jax.methods.base import Plan, Recipe, make_plan
from tokred_jax.methods.registry import METHODS, PARTS, PRESETS, get

__all__ = ["METHODS", "PARTS", "PRESETS", "Plan", "Recipe", "get", "make_plan"]
