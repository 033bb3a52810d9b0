"""The stages inside the model: every method end to end on a small random
model — no-op exactness, fast vs reference mode, padding invariance, compile counts,
cost accounting and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests import faults
from tests.testing import TINY, make_batch
from tokred_jax import methods
from tokred_jax.engine import cost, generate
from tokred_jax.methods import aim, baselines, fastv, tome
from tokred_jax.methods.base import Recipe
from tokred_jax.models import llava
from tokred_jax.models.config import ConfigError, LlavaConfig, TextConfig, VisionConfig

CFG = TINY
MODEL = llava.Llava(CFG)
QUARTER = [("aim", 0.25), ("fastv", 0.5), ("tome", 0.25), ("random", 0.25),
           ("pooling", 0.25)]


@pytest.fixture(scope="module")
def params():
  p = llava.init_params(CFG, jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(lambda a: a * 3 if a.ndim > 1 else a, p)


def plan_for(name, retention=None, mode="fast", **kw):
  return methods.make_plan(methods.get(name, CFG, retention, mode, **kw), CFG)


def forward(params, batch, plan, aux=False):
  return MODEL.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                     batch["attention_mask"], batch["positions"], plan=plan,
                     counts=plan.counts(), return_aux=aux)


@pytest.mark.parametrize("name", ["aim", "fastv", "random"])
def test_keeping_everything_is_the_plain_model_bit_for_bit(params, name):
  plain_plan = plan_for("none")
  batch = make_batch(plain_plan.num_visual)
  plain = np.asarray(MODEL.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                                 batch["attention_mask"], batch["positions"]))
  kept_all = np.asarray(forward(params, batch, plan_for(name, 1.0)))
  np.testing.assert_array_equal(kept_all, plain)


def text_logits(logits, batch):
  text = batch["attention_mask"] & (batch["input_ids"] != CFG.image_token_id)
  return np.asarray(logits)[text]


def test_fastv_fast_equals_reference_on_text(params):
  fast, ref = plan_for("fastv", 0.5), plan_for("fastv", 0.5, mode="reference")
  batch = make_batch(fast.num_visual)
  a, b = text_logits(forward(params, batch, fast), batch), text_logits(
      forward(params, batch, ref), batch)
  assert fast.score_layers == (1,)
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_aim_fast_and_reference_differ_only_through_the_scores(params):
  """Reference mode keeps pruned tokens as PageRank queries (they still send mass on the
  walk's first step); fast mode removes them. So later layers may keep slightly
  different sets, and only through them do the outputs differ."""
  fast, ref = plan_for("aim", 0.25), plan_for("aim", 0.25, mode="reference")
  batch = make_batch(fast.num_visual)
  (lf, af), (lr, ar) = forward(params, batch, fast, True), forward(params, batch, ref, True)
  live_f, live_r = np.asarray(af["live"]), np.asarray(ar["live"])
  np.testing.assert_array_equal(live_f.sum(-1), live_r.sum(-1))  # same counts per layer
  first_pruned = fast.score_layers[0] + 1
  # The first pruning sees identical streams, so it keeps identical sets.
  np.testing.assert_array_equal(live_f[first_pruned], live_r[first_pruned])
  overlap = (live_f & live_r).sum() / live_r.sum()
  assert overlap >= 0.9, f"kept sets overlap only {overlap:.3f}"
  a, b = text_logits(lf, batch), text_logits(lr, batch)
  rel = np.abs(a - b).max() / np.abs(b).max()
  print(f"AIM fast vs reference: kept-set overlap {overlap:.3f}, text logits rel diff {rel:.3g}")
  assert rel < 0.1


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_outputs_ignore_padding_and_empty_slots(params, seed):
  """Whatever sits in left padding (ids) or empty visual capacity (pixels can't reach
  it, so the ids) does not change the logits of real tokens."""
  plan = plan_for("aim", 0.25)
  batch = make_batch(plan.num_visual)
  rng = np.random.default_rng(seed)
  noisy = dict(batch)
  pad = ~batch["attention_mask"]
  noisy["input_ids"] = np.where(pad, rng.integers(0, 127, pad.shape), batch["input_ids"])
  a, b = forward(params, batch, plan), forward(params, noisy, plan)
  real = batch["attention_mask"]
  np.testing.assert_array_equal(np.asarray(a)[real], np.asarray(b)[real])


def test_batch_samples_keep_different_tokens(params):
  plan = plan_for("aim", 0.25)
  batch = make_batch(plan.num_visual)
  _, aux = forward(params, batch, plan, True)
  live = np.asarray(aux["live"])  # [L, B, N_v]
  layer = plan.score_layers[0] + 1
  assert live[layer, 0].sum() == live[layer, 1].sum() > 0
  assert not np.array_equal(live[layer, 0], live[layer, 1])
  sources = np.asarray(aux["sources"])  # patch -> token slot after the merge
  assert sources.shape == (2, 64) and (sources >= 0).all()
  assert len(np.unique(sources[0])) == plan.exact.visual


def test_retention_and_prompt_length_within_a_bucket_do_not_recompile(params):
  plans = [plan_for("aim", r) for r in (0.25, 0.24, 0.23)]
  assert len(set(plans)) == 1 and len({p.exact for p in plans}) == 3
  gen = generate.Generator(MODEL, generate.SamplingConfig(max_new_tokens=2), plan=plans[0])
  for i, plan in enumerate(plans):
    for lengths in ((3, 9), (7, 1)):
      gen(params, make_batch(plan.num_visual, lengths, seed=i), counts=plan.counts())
  assert gen.trace_counts["prefill"] == 1


def test_counts_shape_the_compiled_work(params):
  """A smaller exact count inside the same capacity drops more tokens at run time."""
  a, b = plan_for("random", 0.25), plan_for("random", 0.22)
  assert a == b
  batch = make_batch(a.num_visual)
  _, aux_a = forward(params, batch, a, True)
  _, aux_b = forward(params, batch, b, True)
  assert np.asarray(aux_a["live"])[0, 0].sum() == a.exact.visual == 16
  assert np.asarray(aux_b["live"])[0, 0].sum() == b.exact.visual == 14


MID = LlavaConfig(
    vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4,
                        image_size=224, patch_size=14),
    text=TextConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_layers=6,
                    num_heads=8, num_kv_heads=4, head_dim=64, max_position_embeddings=1024),
    image_token_id=511, vision_feature_layer=-2)


def xla_prefill_flops(plan) -> float:
  """XLA's FLOP count of the compiled prefill on MID with 32 text tokens."""
  model = llava.Llava(MID)
  shapes = jax.eval_shape(lambda: llava.init_params(MID, jax.random.PRNGKey(0)))
  t = 32 + plan.num_visual
  args = (jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                                         jnp.float32),
          jax.ShapeDtypeStruct((1, t), bool), jax.ShapeDtypeStruct((1, t), jnp.int32))
  fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a, max_new_tokens=1, plan=plan,
                                         method="prefill"))
  return fn.lower(shapes, *args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("name, retention", [("none", None), ("aim", 0.25), ("fastv", 0.5),
                                             ("tome", 0.5), ("random", 0.25),
                                             ("pooling", 0.25)])
def test_flops_match_xla_and_fall_as_planned(name, retention):
  """Analytic matmul FLOPs of the compiled prefill agree with XLA's count within 2%."""
  plan = methods.make_plan(methods.get(name, MID, retention), MID)
  xla = xla_prefill_flops(plan)
  analytic = cost.plan_cost(MID, plan, 32)["flops"].total
  assert abs(xla / analytic - 1) < 0.02, (name, xla, analytic)
  if name != "none":
    full = cost.plan_cost(MID, methods.make_plan(Recipe(), MID), 32)
    assert analytic < full["flops"].total


def test_scoring_inside_a_bucket_is_compiled_and_counted():
  """AIM at 0.98 on MID: its counts drop after layers 2 and 3 inside one bucket (every
  capacity 256), so those layers score although no capacity shrinks. The analytic count
  has their two PageRank scorers, and agrees with XLA better than it would without."""
  plan = methods.make_plan(methods.get("aim", MID, 0.98), MID)
  assert plan.score_layers == (2, 3) and set(plan.llm_visual) == {256}
  assert plan.exact.llm_visual[2:4] == (256, 249)
  analytic = cost.plan_cost(MID, plan, 32)["flops"].total
  pagerank = plan.find(aim.PageRankPlan)
  scorers = sum(pagerank.scorer_flops(MID, 32 + 256) for _ in plan.score_layers)
  xla = xla_prefill_flops(plan)
  assert abs(xla / analytic - 1) < 0.01 < abs(xla / (analytic - scorers) - 1)


plan_of = lambda *stages: methods.make_plan(Recipe(stages), CFG)
CONFIG_MISTAKES = {  # as a user writes them -> the call
    'methods.get("aim", cfg, retention=0.0)': lambda: methods.get("aim", CFG, retention=0.0),
    'methods.get("aim", cfg, retention=0.25, l1=2)':
        lambda: methods.get("aim", CFG, retention=0.25, l1=2),
    'methods.get("fastv", cfg, retention=1.5)': lambda: methods.get("fastv", CFG, retention=1.5),
    'methods.get("pooling", cfg, retention=0.3)':
        lambda: methods.get("pooling", CFG, retention=0.3),
    'methods.get("nonsense", cfg)': lambda: methods.get("nonsense", CFG),
    "aim.Merge((40,))": lambda: plan_of(aim.Merge((40,))),
    "tome.Tome((40, 0))": lambda: plan_of(tome.Tome((40, 0))),
    "tome.Tome((1,))": lambda: plan_of(tome.Tome((1,))),
    "aim.PageRank((1.0,) * 9)": lambda: plan_of(aim.PageRank((1.0,) * 9)),
    "fastv.LastToken((1.0, 0.5, 0.7) + (0.5,) * 5)":
        lambda: plan_of(fastv.LastToken((1.0, 0.5, 0.7) + (0.5,) * 5)),
    "aim.PageRank((1.0, 1.2) + (1.0,) * 6)":
        lambda: plan_of(aim.PageRank((1.0, 1.2) + (1.0,) * 6)),
    "baselines.Random(0)": lambda: plan_of(baselines.Random(0)),
    'Recipe(mode="eager")': lambda: Recipe(mode="eager"),
}


@pytest.mark.parametrize("case", CONFIG_MISTAKES)
def test_config_mistakes_are_named(case):
  with pytest.raises(ConfigError) as e:
    CONFIG_MISTAKES[case]()
  faults.record("methods", case, f"ConfigError: {e.value}", before="compile")
