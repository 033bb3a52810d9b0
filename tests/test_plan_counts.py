"""Plans are what they claim: the visual tokens each LLM layer really processes are the
plan's exact counts, for every method and preset at retention levels from 0.05 to 0.99;
on full-size configs every layer where the exact count drops scores and prunes (AIM's
official counts on LLaVA-1.5-7B); and the plan's compile key holds everything that
shapes the compiled program."""

import collections
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.testing import VISION_112, with_routers
from tokred_jax import methods
from tokred_jax.core.stream import Stream
from tokred_jax.engine.pipeline import DEFAULT_CHECKPOINT, PMOD_CHECKPOINT, Pipeline
from tokred_jax.io import checkpoint
from tokred_jax.methods import aim, base, baselines, dart, fastv, mustdrop, pmod, tome
from tokred_jax.methods.base import Recipe
from tokred_jax.models import llava, presets
from tokred_jax.models.config import ConfigError, LlavaConfig, TextConfig, VisionConfig

RETENTIONS = tuple(i / 100 for i in range(5, 100))
# MustDrop is left out of every count property here: its counts depend on the image and
# the question, so its plan claims no exact per-layer counts (it keeps full capacities;
# test_mustdrop_model.py checks the counts it really gets).
STATIC_METHODS = ("aim", "fastv", "tome", "random", "pooling", "dart")
STATIC_PRESETS = tuple(p for p, (m, _) in methods.PRESETS.items() if m != "mustdrop")

# LLaVA-1.5-7B (test_cost.py checks it equals the published config.json) and a
# LLaVA-OneVision-like model: SigLIP-so400m's 27x27 patch grid (729 tokens; 384 px in the
# published tower, whose convolution drops the remainder: 378 = 27 · 14 here) and
# 28-layer Qwen2-7B.
LLAVA15 = presets.LLAVA15_7B
QWEN2_OV = LlavaConfig(
    vision=VisionConfig(kind="siglip", hidden_size=1152, intermediate_size=4304,
                        num_layers=27, num_heads=16, image_size=378, patch_size=14,
                        layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    text=TextConfig(kind="qwen2", vocab_size=152064, hidden_size=3584,
                    intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                    head_dim=128, rope_theta=1e6, max_position_embeddings=32768,
                    attention_bias=True, bos_token_id=None, eos_token_id=151645),
    image_token_id=151646, vision_feature_layer=-1, vision_feature_select="full")


def all_plans(cfg: LlavaConfig):
  """(label, plan) for every static method at RETENTIONS, FastV also with k = 1, p-MoD
  where the model has routers, and every static preset; those the model rejects
  (ConfigError: e.g. FastV below k/L, pooling off 1/s²) are left out."""
  builds = [(p, None, {}) for p in STATIC_PRESETS]
  names = STATIC_METHODS + (("pmod",) if cfg.text.router_layers else ())
  builds += [(m, r, {}) for m in names for r in RETENTIONS]
  builds += [("fastv", r, {"k": 1}) for r in RETENTIONS]
  builds += [("pooling", 1 / s**2, {}) for s in (3, 4)]  # the levels pooling can take
  out = []
  for name, retention, kwargs in builds:
    try:
      plan = methods.make_plan(methods.get(name, cfg, retention, **kwargs), cfg)
    except ConfigError:
      continue
    out.append((f"{name}@{retention}{kwargs or ''}", plan))
  return out


def check_plan(label: str, plan: base.Plan):
  """A layer scores (and the next one prunes) exactly where the exact count drops, and
  every capacity holds its exact count."""
  exact = plan.exact.llm_visual
  drops = tuple(l for l in range(len(exact) - 1) if exact[l + 1] < exact[l])
  assert plan.score_layers == drops, label
  assert plan.num_visual >= plan.exact.visual, label
  assert all(c >= e for c, e in zip(plan.llm_visual, exact)), label
  assert all(c is None and e is None or c >= e
             for c, e in zip(plan.mod_visual, plan.exact.mod_visual)), label
  want = tuple(e if m is None else m for e, m in zip(exact, plan.exact.mod_visual))
  assert plan.visual_per_layer == want, label


@pytest.mark.parametrize("model", ["llava15-7b", "llava15-7b-routers", "qwen2-ov",
                                   "qwen2-ov-routers", "default", "default-pmod"])
def test_plans_prune_wherever_the_exact_count_drops(model):
  cfg = {"llava15-7b": LLAVA15, "llava15-7b-routers": with_routers(LLAVA15),
         "qwen2-ov": QWEN2_OV, "qwen2-ov-routers": with_routers(QWEN2_OV),
         "default": checkpoint.read_config(DEFAULT_CHECKPOINT),
         "default-pmod": checkpoint.read_config(PMOD_CHECKPOINT)}[model]
  plans = all_plans(cfg)
  for label, plan in plans:
    check_plan(label, plan)
  names = {label.split("@")[0] for label, _ in plans}
  assert set(STATIC_METHODS) <= names
  # The cases counting by capacities missed: a layer scores although its next capacity
  # is its own (the count drops inside one bucket).
  inside_a_bucket = [label for label, p in plans
                     if any(p.llm_visual[l + 1] == p.llm_visual[l] for l in p.score_layers)]
  assert inside_a_bucket


def official_aim_counts(num_visual: int, num_layers: int, l1: int, l2: int) -> tuple:
  """AIM's official rule, restated in integers: layer l keeps floor(N_v · v_l) of the
  post-merge visual tokens, v_l = 1 for l <= l1, 1 − (l − l1)/(l2 − l1) for l1 < l < l2
  and 0 for l >= l2 (METHODS.md 1b)."""
  return tuple(num_visual if l <= l1 else 0 if l >= l2 else
               num_visual * (l2 - l) // (l2 - l1) for l in range(num_layers))


@pytest.mark.parametrize("name, kept, counts", [
    ("aim-72", 72, (72, 63, 54, 45, 36, 27, 18, 9, 0)),
    ("aim-252", 252, (252, 220, 189, 157, 126, 94, 63, 31, 0)),
    ("aim", 252, (252, 220, 189, 157, 126, 94, 63, 31, 0)),
])
def test_aim_presets_on_llava15_7b_prune_at_every_layer_13_to_20(name, kept, counts):
  plan = methods.make_plan(methods.get(name, LLAVA15), LLAVA15)
  assert plan.exact.visual == kept
  assert plan.visual_per_layer == official_aim_counts(kept, 32, 13, 21)
  assert plan.visual_per_layer[13:22] == counts
  assert plan.score_layers == tuple(range(13, 21))


def test_aim_on_a_28_layer_qwen2_prunes_at_every_layer_14_to_21():
  """The (14, 22) schedule AIM publishes for 28 layers, on 729 − 288 − 36 = 405 tokens."""
  plan = methods.make_plan(methods.get("aim", QWEN2_OV), QWEN2_OV)
  assert plan.exact.visual == 405
  assert plan.visual_per_layer == official_aim_counts(405, 28, 14, 22)
  assert plan.score_layers == tuple(range(14, 22))


def test_aim_72_program_on_llava15_7b_walks_pagerank_at_every_score_layer():
  """The traced LLM of aim-72 at full size (shapes only) runs one PageRank walk (its
  power iteration is the program's only loop) after each of layers 13-20."""
  cfg = LLAVA15
  plan = methods.make_plan(methods.get("aim-72", cfg), cfg)
  model = llava.Llava(cfg)
  params = jax.eval_shape(lambda: llava.init_params(cfg, jax.random.PRNGKey(0)))
  b, t = 1, 40 + plan.num_visual
  spec = lambda dtype, *shape: jax.ShapeDtypeStruct((b, t) + shape, dtype)
  stream = Stream(spec(jnp.float32, cfg.text.hidden_size), spec(jnp.int32), spec(bool),
                  spec(bool), spec(bool), spec(jnp.int32), spec(jnp.int32))
  layers = cfg.text.num_layers

  def llm(module, s, c):
    hooks = module.run(plan, c)
    hooks.num_visual = hooks.visual_slots = plan.num_visual
    hooks.carry["visual_in"] = jnp.full((b,), plan.exact.visual, jnp.int32)
    return module.run_layers(s, hooks, 0, layers)

  run = lambda p, s, c: model.apply({"params": p}, s, c, method=llm)
  jaxpr = jax.make_jaxpr(run)(params, stream, plan.counts())
  loops = collections.Counter(e.primitive.name for e in jaxpr.jaxpr.eqns)
  assert loops["scan"] + loops["while"] == len(plan.score_layers) == 8


# --- The property at run time, on the default model ------------------------------------

# Each group shares one compiled program (asserted); every member runs through it. A few
# programs, as each costs seconds to compile; the plan-level checks above take every level.
GROUPS = [
    [("aim", 0.05), ("aim", 0.06)],  # plans (12, 12, 12, 6, 0, 0): 6 inside a bucket of 16
    [("fastv", r) for r in (0.94, 0.95, 0.96, 0.97, 0.98, 0.99)],  # 144 -> 139..143
    [("fastv", r) for r in (0.64, 0.65, 0.67, 0.7)] + [("fastv-k2-r50", None)],
    [("tome", r) for r in (0.13, 0.15, 0.17, 0.2, 0.22)],
    [("random", r) for r in (0.05, 0.07, 0.09, 0.11)],
    [("pooling", 0.25), ("pooling-2x2", None)],
    [("dart", r) for r in (0.95, 0.96, 0.97)] + [("dart-128", None)],  # 144 -> 132..137
    [("dart", 0.7), ("dart-64", None)],  # 144 -> 79, 68: one bucket of 16
]
PMOD_GROUPS = [
    [("pmod", None), ("pmod", 0.49), ("pmod", 0.5)],  # trained ratios and two levels
]


@pytest.fixture(scope="module")
def pipes():
  return {"default": Pipeline.load(DEFAULT_CHECKPOINT), "pmod": Pipeline.load(PMOD_CHECKPOINT)}


def test_groups_cover_every_static_method_and_preset():
  named = {name for group in GROUPS + PMOD_GROUPS for name, _ in group}
  # AIM's need 576 visual tokens, dart-192 keeps 196: more than the default model's 144.
  runnable = {p for p in STATIC_PRESETS if not p.startswith("aim-") and p != "dart-192"}
  assert set(STATIC_METHODS) | {"pmod"} | runnable <= named


@pytest.mark.parametrize("variant, group",
                         [("default", g) for g in GROUPS] + [("pmod", g) for g in PMOD_GROUPS],
                         ids=lambda v: v if isinstance(v, str) else f"{v[0][0]}@{v[0][1]}")
def test_layers_process_exactly_the_planned_visual_tokens(pipes, variant, group):
  pipe = pipes[variant]
  plans = [(f"{n}@{r}", pipe.plan(n, r)) for n, r in group]
  assert len({p for _, p in plans}) == 1, "the group should share one program"
  image = os.path.join(DEFAULT_CHECKPOINT, "sample.png")
  noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8)
  batch = pipe.prepare([image, noise], ["Which digit is red?", "How many shapes are there?"],
                       plan=plans[0][1])
  for label, plan in plans:
    check_plan(label, plan)
    _, aux = pipe.forward(batch, plan, return_aux=True)
    per_layer = np.asarray(aux["visual_per_layer"])  # [L, B]
    for sample in per_layer.T:
      assert tuple(sample.tolist()) == plan.visual_per_layer, label
    # The vision stage: distinct tokens the patches map to (merged, pooled, kept).
    for sources in np.asarray(aux["sources"]):
      assert len(np.unique(sources[sources >= 0])) == plan.exact.visual, label


# --- The compile key ---------------------------------------------------------------------

KEY_CFG = LlavaConfig(
    vision=VISION_112,
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                    router_layers=(1, 2, 3)),
    image_token_id=127, pad_token_id=0)
BASES = {
    "none": lambda: Recipe(),
    "aim": lambda: methods.get("aim", KEY_CFG, 0.25),
    "fastv": lambda: methods.get("fastv", KEY_CFG, 0.75),
    "tome": lambda: methods.get("tome", KEY_CFG, 0.5),
    "random": lambda: methods.get("random", KEY_CFG, 0.25),
    "pooling": lambda: methods.get("pooling", KEY_CFG, 0.25),
    "pmod": lambda: methods.get("pmod", KEY_CFG, 0.75),
    "mustdrop": lambda: methods.get("mustdrop", KEY_CFG, window=2),
    "dart": lambda: methods.get("dart", KEY_CFG, 0.75),
}
# Every stage a method is made of (the concrete Stage classes).
STAGES = (aim.Merge, aim.PageRank, fastv.LastToken, tome.Tome, baselines.Random,
          baselines.Pool, pmod.Route, mustdrop.Window, mustdrop.KeyFilter, dart.Duplication)
# For each field of a recipe and of every stage: a recipe where it is in effect, and
# another valid value.
PERTURB = {
    "Recipe.name": ("none", lambda v: "renamed"),
    "Recipe.mode": ("aim", lambda v: "reference"),
    "Recipe.token_bucket": ("mustdrop", lambda v: 8),
    "Recipe.sizing": ("mustdrop", lambda v: "host"),
    "Recipe.ladder": ("mustdrop", lambda v: 0.7),
    "Tome.r": ("tome", lambda v: v[:-1] + (v[-1] + 1,)),
    "Merge.steps": ("aim", lambda v: v[:-1] + (v[-1] - 1,)),
    "Merge.metric": ("aim", lambda v: "features"),
    "Merge.frames_only": ("aim", lambda v: True),  # no video here: no merge at all
    "Pool.stride": ("pooling", lambda v: 4),  # 16 tokens or 4: one bucket
    "Random.keep": ("random", lambda v: v - 2),
    "Random.seed": ("random", lambda v: 1),
    "LastToken.ratios": ("fastv", lambda v: tuple(r if r in (0, 1) else r * 0.9 for r in v)),
    "PageRank.ratios": ("aim", lambda v: v[:-1] + (0.5,)),  # (1, 1, 1, 0) before
    "PageRank.tau": ("aim", lambda v: 0.2),
    "PageRank.iterations": ("aim", lambda v: 3),
    "PageRank.damping": ("aim", lambda v: 0.15),
    "Route.ratios": ("pmod", lambda v: tuple(None if r is None else r * 0.95 for r in v)),
    "Window.window": ("mustdrop", lambda v: 4),
    "Window.threshold": ("mustdrop", lambda v: 0.7),
    "KeyFilter.key_ratio": ("mustdrop", lambda v: 0.2),
    "KeyFilter.filter_layers": ("mustdrop", lambda v: (1,)),
    "KeyFilter.gamma": ("mustdrop", lambda v: 0.01),
    "KeyFilter.alpha": ("mustdrop", lambda v: 0.02),
    "Duplication.ratios": ("dart", lambda v: tuple(r if r in (0, 1) else r * 0.9 for r in v)),
    "Duplication.num_image_pivots": ("dart", lambda v: 2),
    "Duplication.num_text_pivots": ("dart", lambda v: 2),
}
# The fields that reach the program only as traced values: these perturbations keep
# the capacities and pruning layers, so one program serves both.
TRACED = {"Tome.r", "Merge.steps", "Random.keep", "LastToken.ratios", "Route.ratios",
          "Window.threshold", "KeyFilter.gamma", "KeyFilter.alpha", "Duplication.ratios"}
# Read outside the one-program forward, so its jaxpr does not show them, yet a plan must
# not stand for one with another value: the segmented prefill (one per plan) buckets
# its cuts by them.
HOST_READ = {"Recipe.token_bucket", "Recipe.sizing", "Recipe.ladder"}
_PROGRAMS = {}


def perturbed(field: str) -> tuple[Recipe, Recipe]:
  """The base recipe of `field` and the same recipe with that one value changed."""
  base_name, change = PERTURB[field]
  recipe = BASES[base_name]()
  owner, name = field.split(".")
  if owner == "Recipe":
    return recipe, dataclasses.replace(recipe, **{name: change(getattr(recipe, name))})
  kind = next(k for k in STAGES if k.__name__ == owner)
  stages = tuple(dataclasses.replace(s, **{name: change(getattr(s, name))})
                 if isinstance(s, kind) else s for s in recipe.stages)
  assert stages != recipe.stages, f"{base_name} has no {owner} stage"
  return recipe, dataclasses.replace(recipe, stages=stages)


def program(plan: base.Plan, counts: tuple) -> tuple:
  """The traced forward (aux included) of `plan` on KEY_CFG with `counts` as arguments:
  its jaxpr text and constants, i.e. everything the compiled program is made from."""
  key = (plan.recipe, plan.exact)
  if key not in _PROGRAMS:
    model = llava.Llava(KEY_CFG)
    params = jax.eval_shape(lambda: llava.init_params(KEY_CFG, jax.random.PRNGKey(0)))
    t = plan.num_visual + 8
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    inputs = (spec((1, t), jnp.int32), spec((1, 112, 112, 3), jnp.float32),
              spec((1, t), bool), spec((1, t), jnp.int32))
    forward = lambda p, c, *a: model.apply({"params": p}, *a, plan=plan, counts=c,
                                           return_aux=True)
    closed = jax.make_jaxpr(forward)(params, counts, *inputs)
    _PROGRAMS[key] = (str(closed), [np.asarray(c) for c in closed.consts])
  return _PROGRAMS[key]


def same_program(a: base.Plan, b: base.Plan) -> bool:
  (text_a, consts_a), (text_b, consts_b) = program(a, a.counts()), program(b, a.counts())
  return text_a == text_b and len(consts_a) == len(consts_b) and all(
      x.shape == y.shape and np.array_equal(x, y) for x, y in zip(consts_a, consts_b))


def test_every_field_has_a_perturbation():
  stage_classes = set()
  todo = [base.Stage]
  while todo:
    for sub in todo.pop().__subclasses__():
      todo.append(sub)
      if sub.__module__.startswith("tokred_jax.methods") and sub.__name__ != "Prune":
        stage_classes.add(sub)
  assert stage_classes == set(STAGES)
  fields = {f"Recipe.{f.name}" for f in dataclasses.fields(Recipe) if f.name != "stages"}
  fields |= {f"{k.__name__}.{f.name}" for k in STAGES for f in dataclasses.fields(k)}
  assert set(PERTURB) == fields
  assert TRACED <= set(PERTURB)
  # The plan compares every field but these, whose static parts are in the stage plans
  # and whose values travel as counts. (The model config is not in the key: every
  # compiled function belongs to one model.)
  assert {f.name for f in dataclasses.fields(base.Plan) if not f.compare} == {
      "recipe", "exact"}


@pytest.mark.parametrize("field", sorted(PERTURB))
def test_equal_plans_trace_the_same_program(field):
  """Perturb one field: if the plans compare equal (one compiled program serves both),
  the programs traced for them must be identical. A field the key leaves out that the
  program reads fails here."""
  base_recipe, changed = perturbed(field)
  assert changed != base_recipe
  a, b = methods.make_plan(base_recipe, KEY_CFG), methods.make_plan(changed, KEY_CFG)
  if field in TRACED:
    # These perturbations keep the capacities and pruning layers: one program for both,
    # run with other counts.
    assert a == b
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a.counts()),
                                                       jax.tree_util.tree_leaves(b.counts())))
  if field in HOST_READ:
    assert a != b
  if a == b:
    assert hash(a) == hash(b)
    assert same_program(a, b), f"{field} changes the program but not the plan's key"


def test_pruning_layers_are_part_of_the_key():
  """Two FastV plans with the same capacities, one pruning after layer 1 and one not."""
  cfg = KEY_CFG
  keeps_all, prunes = (methods.make_plan(methods.get("fastv", cfg, r), cfg)
                       for r in (1.0, 0.99))
  assert keeps_all.llm_visual == prunes.llm_visual
  assert (keeps_all.score_layers, prunes.score_layers) == ((), (1,))
  assert keeps_all != prunes
  assert not same_program(keeps_all, prunes)


def test_a_tower_that_runs_no_layer_is_refused():
  """vision_feature_layer 0 (or -(n+1)) selects the embeddings: one line, not an
  IndexError in planning."""
  for layer in (0, -(KEY_CFG.vision.num_layers + 1)):
    with pytest.raises(ConfigError, match="embeddings, so none of its"):
      dataclasses.replace(KEY_CFG, vision_feature_layer=layer)
