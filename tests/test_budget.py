"""The budget solver (tokred_jax/engine/budget.py) against a fine grid of every method's settings,
each costed here from `cost.plan_cost` on LLaVA-1.5-7B's config and the default model's.

A solution must meet its target within 2% of the measure recomputed here, or say it is
the nearest feasible point and no setting on the grid be nearer; a ConfigError must
come only where no setting on the grid reaches the target.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest

import infer
import tokred_jax
from tests import faults
from tests.test_infer_faults import _config
from tokred_jax import cli, methods
from tokred_jax.engine import budget, cost, pipeline
from tokred_jax.eval import evaluate
from tokred_jax.io import checkpoint
from tokred_jax.methods import aim, baselines, fastv, tome
from tokred_jax.methods.base import Recipe, make_plan
from tokred_jax.models import presets
from tokred_jax.models.config import ConfigError

TEXT = 64
GRID = np.linspace(0.001, 1.0, 1000)
BUDGETS = (0.75, 0.5, 0.3)
METHODS = ("aim", "fastv", "tome", "random", "pooling", "pmod")


def _with_routers(cfg, layers):
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, router_layers=layers))


def _configs():
  glyph = checkpoint.read_config(pipeline.DEFAULT_CHECKPOINT)
  llava = presets.LLAVA15_7B
  # p-MoD needs routers: the 7B with them on layers 2..31, the default model's p-MoD
  # checkpoint (routers on 2..5).
  return {"llava-1.5-7b": (llava, _with_routers(llava, tuple(range(2, 32)))),
          "glyph-llava": (glyph, checkpoint.read_config(pipeline.PMOD_CHECKPOINT))}


CONFIGS = _configs()


def _measure(cfg, recipe, measure):
  """The measure of a setting, restated from cost.plan_cost and the plan's counts."""
  plan = make_plan(recipe, cfg)
  if measure == "tokens":
    counts = plan.visual_per_layer
    return sum(counts) / len(counts)
  dense, this = (cost.plan_cost(cfg, make_plan(r, cfg), TEXT, exact=True)
                 for r in (Recipe(), recipe))
  key = "flops" if measure == "flops" else "kv_bytes"
  return this[key].total / dense[key].total


def _settings(cfg, method, split=None):
  """Every setting of the method on a fine grid of its parameters (a composed recipe:
  of its retention, at `split`)."""
  out = []
  def add(build):
    try:
      out.append(build())
    except ConfigError:  # a level this method cannot reach on this model
      pass
  if method == "pooling":
    grid = math.isqrt(cfg.num_image_tokens)
    for s in range(1, grid + 1):
      if grid % s == 0:
        add(lambda: methods.get("pooling", cfg, stride=s))
  elif method == "pmod":
    for shift in np.linspace(-1, 2, 1000):
      add(lambda: methods.get("pmod", cfg, schedule="cosine", shift=float(shift)))
  elif "+" in method:
    for r in GRID:
      add(lambda: methods.get(method, cfg, float(r), split=split))
  else:
    for r in GRID:
      for k in ((1, 2) if method == "fastv" else (None,)):
        add(lambda: methods.get(method, cfg, float(r), **({"k": k} if k else {})))
  assert out
  return out


@functools.lru_cache(maxsize=None)
def _grid(name, method, measure, split=None):
  cfg = CONFIGS[name]["pmod" in method.split("+")]
  return cfg, np.asarray([_measure(cfg, r, measure) for r in _settings(cfg, method, split)])


def _check(name, method, target, measure, split=None):
  """Returns the solution, or None where the solver refused a target the grid misses."""
  cfg, values = _grid(name, method, measure, split)
  errors = np.abs(values / target - 1)
  kwargs = {} if split is None else {"split": split}
  try:
    sol = budget.solve(cfg, method, target, measure=measure, num_text_tokens=TEXT, **kwargs)
  except ConfigError as e:
    assert errors.min() > budget.TOLERANCE, (name, method, target, str(e))
    assert not values.min() <= target <= values.max()
    assert f"reaches {values.min():.4g} to" in str(e) or "reaches only" in str(e)
    return None
  achieved = _measure(cfg, sol.recipe, measure)
  assert achieved == pytest.approx(sol.achieved, rel=1e-12)
  assert sol.plan == make_plan(sol.recipe, cfg) and sol.measure == measure
  err = abs(achieved / target - 1)
  if sol.exact:
    assert err <= budget.TOLERANCE
  else:  # nearest: the grid has nothing nearer (nor anything within tolerance)
    assert "nearest feasible" in sol.note
    assert errors.min() >= err - 1e-9 and err > budget.TOLERANCE
  return sol


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("method", METHODS)
def test_flops_budget_is_met_or_nearest(name, method):
  for target in BUDGETS:
    sol = _check(name, method, target, "flops")
    # On the 7B every method meets every budget but pooling (its strides skip them) and
    # p-MoD at 0.3 (PRD's floor of 0.15 in routed layers stops at 0.31).
    if name == "llava-1.5-7b":
      expected = ("nearest" if method == "pooling" else
                  "refused" if (method, target) == ("pmod", 0.3) else "exact")
      got = "refused" if sol is None else "exact" if sol.exact else "nearest"
      assert got == expected, (method, target)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("method", ["aim", "tome", "random", "pooling"])
def test_kv_and_token_budgets(name, method):
  for measure, target in (("kv", 0.6), ("kv", 0.4), ("tokens", 100), ("tokens", 36)):
    sol = _check(name, method, target, measure)
    if sol is not None and measure == "tokens":
      assert sol.achieved == np.mean(sol.plan.visual_per_layer)


def test_solution_reports_the_parameters():
  cfg = presets.LLAVA15_7B
  aim_sol = budget.solve(cfg, "aim", 0.3)
  merge = aim_sol.recipe.find(aim.Merge)
  assert (aim_sol.params["l1"], aim_sol.params["l2"]) == aim.default_schedule(32)
  assert aim_sol.params["merge_r"] == merge.steps and sum(merge.steps) > 0
  moved = budget.solve(cfg, "aim", 0.3, l1=4, l2=10)
  assert (moved.params["l1"], moved.params["l2"]) == (4, 10) and moved.exact
  fast = budget.solve(cfg, "fastv", 0.5)
  assert fast.params["k"] == 2 and 0 < fast.params["r"] < 1
  assert fast.recipe == methods.get("fastv", cfg, fast.params["retention"])
  # The default model: k = 2 cannot go below 0.61 of its FLOPs, so k = 1 is taken.
  glyph = CONFIGS["glyph-llava"][0]
  assert budget.solve(glyph, "fastv", 0.55).params["k"] == 1
  assert budget.solve(glyph, "fastv", 0.8).params["k"] == 2
  pooled = budget.solve(cfg, "pooling", 0.3)
  assert pooled.params == {"stride": 2} and not pooled.exact
  assert pooled.recipe.find(baselines.Pool).stride == 2
  assert budget.solve(cfg, "pooling-2x2", 0.3).recipe.stages == pooled.recipe.stages
  assert budget.solve(cfg, "none", 1.0).recipe == Recipe()
  tokens = budget.solve(cfg, "random", 144, measure="tokens")
  assert tokens.recipe.find(baselines.Random).keep == 144 and tokens.achieved == 144
  assert tokens.params["keep"] == 144
  # A longer prompt: the visual share of the cost is smaller, so more must go.
  keep = lambda sol: sol.recipe.find(baselines.Random).keep
  assert keep(budget.solve(cfg, "random", 0.5, num_text_tokens=512)) < keep(
      budget.solve(cfg, "random", 0.5))


# Composed recipes on the 7B: (name, split, the budgets of BUDGETS out of its reach).
# pooling-2x2 alone is at 0.35 of the FLOPs, so with FastV after it 0.75 and 0.5 are out.
COMPOSED = [("tome+fastv", 0.5, ()), ("tome+fastv", 0.3, ()), ("random+fastv", 0.5, ()),
            ("pooling-2x2+fastv", 0.5, (0.75, 0.5)), ("aim.merge+pmod", 0.5, ())]


def _parts_alone(cfg, name, rho, split):
  """The composed recipe's stages restated: the part before the LLM built alone at
  rho^split, the one in it at rho^(1 - split); a preset at its own counts and then the
  other part at all of rho."""
  first, second = name.split("+")
  if first in methods.PRESETS:
    return methods.get(first, cfg).stages + methods.get(second, cfg, rho).stages
  return (methods.get(first, cfg, rho ** split).stages
          + methods.get(second, cfg, rho ** (1 - split)).stages)


@pytest.mark.parametrize("method, split, out_of_reach", COMPOSED,
                         ids=[f"{m}-split{s}" for m, s, _ in COMPOSED])
def test_composed_recipe_budgets_on_llava15(method, split, out_of_reach):
  """A composed recipe is bisected along its retention with the split fixed: each
  budget met within tolerance (against the grid of retentions), and the parts the
  solution holds are each part built alone at its share of the reported retention."""
  cfg = CONFIGS["llava-1.5-7b"]["pmod" in method]
  for target in BUDGETS:
    sol = _check("llava-1.5-7b", method, target, "flops", split)
    if target in out_of_reach:
      assert sol is None, (method, target)
      continue
    assert sol is not None and sol.exact, (method, target)
    rho = sol.params["retention"]
    assert sol.params["split"] == split and f"split={split:g}" in sol.note
    assert sol.recipe.stages == _parts_alone(cfg, method, rho, split)
    assert sol.recipe.name == method
    prune = sol.recipe.find(fastv.LastToken)
    if prune:
      assert sol.params["fastv.r"] == pytest.approx(1 - prune.ratios[-1])
      assert sol.params["fastv.k"] == fastv.FASTV_K
    if "tome" in method:
      assert sol.params["tome.r"] == sol.recipe.find(tome.Tome).r and sum(sol.params["tome.r"])
    if "random" in method:
      assert sol.params["random.keep"] == sol.recipe.find(baselines.Random).keep < 576
    if "aim.merge" in method:
      assert sol.params["aim.merge.merge_r"] == sol.recipe.find(aim.Merge).steps
      assert len(sol.params["pmod.ratios"]) == 32
  if method == "tome+fastv":  # the split is the parts' share: a lower one merges less
    at = {s: budget.solve(cfg, method, 0.5, split=s) for s in (0.3, 0.7)}
    assert sum(at[0.3].params["tome.r"]) < sum(at[0.7].params["tome.r"])
    assert at[0.3].params["fastv.r"] > at[0.7].params["fastv.r"]


def test_composed_options_pass_through():
  cfg = presets.LLAVA15_7B
  # AIM's merge alone at retention 1 merges nothing (the bisection's top end).
  assert methods.get("aim.merge", cfg, 1.0).stages == ()
  sol = budget.solve(cfg, "tome+fastv", 0.4, fastv={"k": 3})
  assert sol.exact and sol.params["fastv.k"] == 3
  assert sol.recipe == methods.get("tome+fastv", cfg, sol.params["retention"], fastv={"k": 3})
  pipe = tokred_jax.Pipeline.load(pipeline.DEFAULT_CHECKPOINT, weights=False)
  assert pipe.plan("tome+fastv", budget=0.7, split=0.4) == budget.solve(
      pipe.cfg, "tome+fastv", 0.7, split=0.4).plan
  setting, = evaluate.parse_settings("tome+fastv@flops=0.7:split=0.4")
  assert setting.label == "tome+fastv@flops=0.7:split=0.4"
  assert evaluate.setting_plan(pipe.cfg, setting) == budget.solve(
      pipe.cfg, "tome+fastv", 0.7, split=0.4).plan
  for spec, match in [("tome+fastv@flops=0.7:k=1", "takes no options here but split"),
                      ("tome@flops=0.7:split=0.4", "tome is one part"),
                      ("tome+fastv@flops=0.7:split=1", r"split must lie in \(0, 1\)")]:
    with pytest.raises(ConfigError, match=match) as e:
      evaluate.parse_settings(spec)
    faults.record("evaluate.parse_settings", spec, f"ConfigError: {e.value}",
                  before="weights load")


ERRORS = [
    ("aim", 0, {}, r"in \(0, 1\]"), ("aim", 1.5, {}, r"in \(0, 1\]"),
    ("aim", float("nan"), {}, "must be a number"), ("aim", "0.3", {}, "must be a number"),
    ("aim", -3, dict(measure="tokens"), "positive count"),
    ("aim", 0.3, dict(measure="watts"), "unknown budget measure 'watts'"),
    ("aim", 0.05, {}, r"aim reaches 0.135\d to 1 of dense prefill FLOPs .* not 0.05"),
    ("tome", 0.05, {}, r"tome reaches 0.09\d+ to 1 .* not 0.05; ask for a budget in that"),
    ("aim", 1000, dict(measure="tokens"), "reaches .* to 576 equivalent visual tokens"),
    ("mustdrop", 0.3, {}, "depend on the image and the question"),
    ("mustdrop-64", 0.3, {}, "depend on the image and the question"),
    ("none", 0.5, {}, "none reaches only 1 of dense prefill FLOPs"),
    ("aimm", 0.3, {}, "unknown method 'aimm'"),
    ("fastv", 0.3, dict(r=0.5), "fastv's r is what the budget sets"),
    ("aim", 0.3, dict(retention=0.25), "a retention or a budget, not both"),
    ("pmod", 0.5, {}, "no p-MoD routers"),
    ("aim", 0.3, dict(tolerance=-1), "tolerance"),
    ("tome+fastv", 0.3, dict(split=1.5), r"split must lie in \(0, 1\)"),
    ("tome", 0.3, dict(split=0.5), "tome is one part, so drop it"),
    ("tome+fastv", 0.3, dict(fastv={"r": 0.5}), "fastv's r in tome\\+fastv is what the budget"),
    ("tome+mustdrop.filter", 0.3, {}, "depend on the image and the question"),
    ("tome+aimm", 0.3, {}, "unknown method 'aimm' in 'tome\\+aimm'"),
    ("tome+fastv", 0.01, {}, "tome\\+fastv reaches .* not 0.01"),
]


@pytest.mark.parametrize("method, target, kwargs, match", ERRORS,
                         ids=[f"{m}@{t}{k or ''}" for m, t, k, _ in ERRORS])
def test_bad_budgets_are_one_line_config_errors(method, target, kwargs, match):
  with pytest.raises(ConfigError, match=match) as e:
    budget.solve(presets.LLAVA15_7B, method, target, **kwargs)
  args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
  faults.record("budget.solve", f"solve(llava-1.5-7b, {method!r}, {target!r}{args})",
                f"ConfigError: {e.value}", before="any model work")


def test_pipeline_plan_at_a_budget():
  pipe = tokred_jax.Pipeline.load(pipeline.DEFAULT_CHECKPOINT, weights=False)
  plan = pipe.plan("aim", budget=0.5)
  sol = budget.solve(pipe.cfg, "aim", 0.5)
  assert plan == sol.plan and plan.recipe == sol.recipe
  assert pipe.plan("aim", budget=0.5, text_tokens=12) == pipe.solve("aim", 0.5,
                                                                    text_tokens=12).plan
  assert pipe.plan("tome", budget=40, measure="tokens").exact.visual == 40
  for kwargs, match in [(dict(retention=0.25, budget=0.5), "not both"),
                        (dict(text_tokens=12), "give a budget too")]:
    with pytest.raises(ConfigError, match=match) as e:
      pipe.plan("aim", **kwargs)
    faults.record("Pipeline.plan", f"pipe.plan('aim', {kwargs})", f"ConfigError: {e.value}",
                  before="weights load")


@pytest.mark.parametrize("case, fields, match", [
    ("--config.method=aim --config.budget=1.5", dict(method="aim", budget=1.5),
     r"in \(0, 1\]"),
    ("--config.method=aim --config.budget=0.01", dict(method="aim", budget=0.01),
     "aim reaches .* text tokens, not 0.01"),
    ("--config.method=aim --config.budget=0.5 --config.retention=0.25",
     dict(method="aim", budget=0.5, retention=0.25), "not both"),
    ("--config.method=mustdrop-64 --config.budget=0.5", dict(method="mustdrop-64", budget=0.5),
     "no budget can be solved"),
    ("--config.budget=0.5 --config.budget_measure=watts",
     dict(method="aim", budget=0.5, budget_measure="watts"), "unknown budget measure"),
])
def test_infer_refuses_a_bad_budget_before_the_weights(case, fields, match, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the weights were read before the bad budget was refused")
  monkeypatch.setattr(checkpoint, "load_params", refuse)
  with pytest.raises(ValueError, match=match) as e:
    infer.infer(_config(**fields))
  faults.record("infer.py", case, f"infer.py: {cli.one_line(e.value)}", before="weights load")


def test_infer_prints_the_budget_it_met(capsys):
  infer.infer(_config(method="random", budget=0.6))
  out = capsys.readouterr().out
  line, = [l for l in out.splitlines() if l.startswith("budget: ")]
  assert "random at 0.6" in line and "of dense prefill FLOPs (asked 0.6," in line
  assert "answer:" in out


def test_budget_settings_parse_and_label():
  got = evaluate.parse_settings("aim@flops=0.3,fastv@kv=0.5:k=1,tome@tokens=40")
  assert [s.label for s in got] == ["aim@flops=0.3", "fastv@kv=0.5:k=1", "tome@tokens=40"]
  assert (got[1].budget, got[1].measure, got[1].retention) == (0.5, "kv", None)
  cfg = CONFIGS["glyph-llava"][0]
  assert evaluate.setting_plan(cfg, got[2]).exact.visual == 40
  at_half, = evaluate.parse_settings("aim@flops=0.5")
  assert evaluate.setting_plan(cfg, at_half, 12) == budget.solve(cfg, "aim", 0.5,
                                                                 num_text_tokens=12).plan
  assert (evaluate.setting_plan(cfg, at_half).recipe
          != evaluate.setting_plan(cfg, at_half, 12).recipe)  # solved at the length given
  assert [s.label for s in evaluate.budget_settings([0.5], names=("aim", "pooling"))] == [
      "aim@flops=0.5", "pooling@flops=0.5"]
  for spec, match in [("aim@flops=1.5", r"setting aim@flops=1.5: a flops budget .*\(0, 1\]"),
                      ("aim@flops=", "METHOD@MEASURE=BUDGET"),
                      ("aim@watts=0.3", "unknown budget measure 'watts'")]:
    with pytest.raises(ConfigError, match=match) as e:
      evaluate.parse_settings(spec)
    faults.record("evaluate.parse_settings", spec, f"ConfigError: {e.value}",
                  before="weights load")
