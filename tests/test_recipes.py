"""Recipes composed of several methods' stages, end to end on the default model: every
layer processes the counts the plan claims, the analytic FLOPs equal XLA's, a recipe
that keeps everything is the plain model bit for bit, a sharded run equals one device,
and stages that cannot meet say why when the recipe is planned."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import faults
from tokred_jax import methods
from tokred_jax.engine import cost
from tokred_jax.engine.generate import SamplingConfig
from tokred_jax.engine.pipeline import DEFAULT_CHECKPOINT, PMOD_CHECKPOINT, Pipeline
from tokred_jax.methods import aim, baselines, fastv, mustdrop, pmod, tome
from tokred_jax.models import llava
from tokred_jax.models.config import ConfigError, LlavaConfig, TextConfig, VisionConfig

# (name, retention, variant): ToMe in the tower + FastV in the LLM; AIM's merge + p-MoD's
# routing; pooling + FastV; a random subset + FastV; MustDrop's window merge + AIM's
# PageRank (its counts depend on the image).
STATIC = [("tome+fastv", 0.25, "default"), ("aim.merge+pmod", 0.5, "pmod"),
          ("pooling-2x2+fastv", 0.5, "default"), ("random+fastv", 0.25, "default")]
QUESTIONS = ["Which digit is red?", "How many shapes are there?"]


@pytest.fixture(scope="module")
def pipes():
  return {"default": Pipeline.load(DEFAULT_CHECKPOINT), "pmod": Pipeline.load(PMOD_CHECKPOINT)}


def images():
  noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8)
  return [os.path.join(DEFAULT_CHECKPOINT, "sample.png"), noise]


def test_recipes_hold_the_stages_of_their_parts(pipes):
  cfg = pipes["pmod"].cfg
  kinds = lambda name, r: [type(s) for s in methods.get(name, cfg, r).stages]
  assert kinds("tome+fastv", 0.25) == [tome.Tome, fastv.LastToken]
  assert kinds("aim.merge+pmod", 0.5) == [aim.Merge, pmod.Route]
  assert kinds("pooling-2x2+fastv", 0.5) == [baselines.Pool, fastv.LastToken]
  assert kinds("mustdrop.window+aim.prune", 0.5) == [mustdrop.Window, aim.PageRank]
  # Written in either order, the stages run as the tokens flow.
  assert methods.get("fastv+tome", cfg, 0.25).stages == methods.get("tome+fastv", cfg,
                                                                    0.25).stages
  # A composed retention multiplies out: ToMe and FastV each keep its square root.
  plan = methods.make_plan(methods.get("tome+fastv", cfg, 0.25), cfg)
  assert plan.exact.visual == 72 and np.mean(plan.visual_per_layer) == pytest.approx(
      0.25 * 144, rel=0.05)


@pytest.mark.parametrize("name, retention, variant", STATIC, ids=lambda v: str(v))
def test_layers_process_exactly_the_planned_tokens(pipes, name, retention, variant):
  pipe = pipes[variant]
  plan = pipe.plan(name, retention)
  batch = pipe.prepare(images(), QUESTIONS, plan=plan)
  _, aux = pipe.forward(batch, plan, return_aux=True)
  for sample in np.asarray(aux["visual_per_layer"]).T:  # [B, L]
    assert tuple(sample.tolist()) == plan.visual_per_layer, name
  for sources in np.asarray(aux["sources"]):
    assert len(np.unique(sources[sources >= 0])) == plan.exact.visual, name


def test_window_merge_then_pagerank_counts_follow_each_image(pipes):
  """The window merge leaves each image its own count; PageRank then keeps
  ⌊count · v_ℓ⌋ of that sample's tokens in layer ℓ (computed in the program), in the
  segmented fast prefill and in one program alike."""
  pipe = pipes["default"]
  plan = pipe.plan("mustdrop.window+aim.prune", 0.75)
  ratios = plan.find(aim.PageRankPlan).ratios
  batch = pipe.prepare(images(), QUESTIONS, plan=plan)
  logits, aux = pipe.forward(batch, plan, return_aux=True)  # segmented
  per_layer = np.asarray(aux["visual_per_layer"])
  merged = np.asarray(aux["vision_tokens"])
  assert merged[0] != merged[1]  # the sample image has flat windows, noise has none
  for b in range(2):
    want = [int(np.floor(merged[b] * r + 1e-6)) for r in ratios]
    assert per_layer[:, b].tolist() == want
  one, aux_one = pipe.model.apply({"params": pipe.params}, batch["input_ids"],
                                  batch["pixel_values"], batch["attention_mask"],
                                  batch["positions"], plan=plan, return_aux=True)
  np.testing.assert_array_equal(np.asarray(aux_one["visual_per_layer"]), per_layer)
  text = batch["attention_mask"] & (batch["input_ids"] != pipe.cfg.image_token_id)
  np.testing.assert_allclose(np.asarray(logits)[text], np.asarray(one)[text], atol=2e-4)


@pytest.mark.parametrize("name, retention", [("pooling-2x2+fastv", 0.5), ("tome+fastv", 0.25)])
def test_fast_equals_reference_on_text(pipes, name, retention):
  """FastV's pruning gives the same text logits whether pruned tokens are removed (fast)
  or masked (reference), after any stage before it, pooling's partly empty image slots
  included (its 6x6 grid fills 36 of the prompt's 48)."""
  pipe = pipes["default"]
  fast, ref = pipe.plan(name, retention), pipe.plan(name, retention, mode="reference")
  batch = pipe.prepare(images(), QUESTIONS, 3, plan=fast)
  text = batch["attention_mask"] & (batch["input_ids"] != pipe.cfg.image_token_id)
  a, b = (np.asarray(pipe.forward(batch, p))[text] for p in (fast, ref))
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  # Generation too: its prefill reads the logits at the stream's last slot.
  sampling = SamplingConfig(max_new_tokens=3)
  (prefill_fast, _), (prefill_ref, _) = (pipe.generator(sampling, p).prefill(
      pipe.params, batch, p.counts()) for p in (fast, ref))
  np.testing.assert_allclose(np.asarray(prefill_fast), np.asarray(prefill_ref), atol=2e-5,
                             rtol=1e-5)


def test_keeping_everything_is_the_plain_model_bit_for_bit(pipes):
  pipe = pipes["default"]
  plan, plain = pipe.plan("random+fastv", 1.0), pipe.plan("none")
  assert [type(s) for s in plan.stages] == [baselines.RandomPlan, fastv.LastTokenPlan]
  batch = pipe.prepare(images(), QUESTIONS, plan=plan)
  np.testing.assert_array_equal(np.asarray(pipe.forward(batch, plan)),
                                np.asarray(pipe.forward(batch, plain)))


# A mid-size model, so that matmuls dominate XLA's count (as in test_reduction.py).
MID = LlavaConfig(
    vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4,
                        image_size=224, patch_size=14),
    text=TextConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_layers=6,
                    num_heads=8, num_kv_heads=4, head_dim=64, max_position_embeddings=1024,
                    router_layers=(2, 3, 4, 5)),
    image_token_id=511, vision_feature_layer=-2)


@pytest.mark.parametrize("name, retention", [(n, r) for n, r, _ in STATIC])
def test_flops_match_xla(name, retention):
  plan = methods.make_plan(methods.get(name, MID, retention), MID)
  model = llava.Llava(MID)
  shapes = jax.eval_shape(lambda: llava.init_params(MID, jax.random.PRNGKey(0)))
  t = 32 + plan.num_visual
  args = (jax.ShapeDtypeStruct((1, t), jnp.int32),
          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
          jax.ShapeDtypeStruct((1, t), bool), jax.ShapeDtypeStruct((1, t), jnp.int32))
  fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a, max_new_tokens=1, plan=plan,
                                         method="prefill"))
  xla = fn.lower(shapes, *args).compile().cost_analysis()["flops"]
  analytic = cost.plan_cost(MID, plan, 32)["flops"].total
  assert abs(xla / analytic - 1) < 0.02, (name, xla, analytic)
  dense = cost.plan_cost(MID, methods.make_plan(methods.Recipe(), MID), 32)["flops"].total
  assert analytic < dense


@pytest.mark.parametrize("name, retention, variant",
                         [STATIC[0], STATIC[1]], ids=lambda v: str(v))
def test_sharded_equals_one_device(pipes, name, retention, variant):
  one = pipes[variant]
  sharded = Pipeline.load(one.path, mesh_shape={"data": 2, "fsdp": 1, "tensor": 4})
  plan = one.plan(name, retention)
  batch = one.prepare(images(), QUESTIONS, plan=plan)
  want, want_aux = one.forward(batch, plan, return_aux=True)
  got, got_aux = sharded.forward(batch, plan, return_aux=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(got_aux["live"]), np.asarray(want_aux["live"]))


MISMATCHES = {  # recipe -> what the error must name
    "tome+mustdrop.window": "whole patch grid",
    "mustdrop.window+tome": "cannot follow",
    "mustdrop.filter+random": "key set",
    "aim.merge+pooling-2x2": "whole grid",
    "aim.prune+pmod": "routes layers",
}


@pytest.mark.parametrize("name", MISMATCHES)
def test_stages_that_cannot_meet_say_why(pipes, name):
  cfg = pipes["pmod"].cfg
  retention = None if "mustdrop.filter" in name else 0.5
  kwargs = {"aim.prune": {"schedule": (2, 5)}} if name == "aim.prune+pmod" else {}
  with pytest.raises(ConfigError, match=MISMATCHES[name]) as e:
    methods.make_plan(methods.get(name, cfg, retention, **kwargs), cfg)
  assert "\n" not in str(e.value)
  faults.record("methods.make_plan", f'methods.get("{name}", cfg, {retention})',
                f"ConfigError: {e.value}", before="compile")


def test_composed_options_go_per_part(pipes):
  cfg = pipes["default"].cfg
  recipe = methods.get("random+fastv", cfg, 0.25, fastv={"k": 1}, random={"seed": 3})
  assert recipe.find(baselines.Random).seed == 3
  assert recipe.find(fastv.LastToken).ratios[1] < 1  # k = 1 prunes after layer 0
  with pytest.raises(ConfigError, match="per part") as e:
    methods.get("random+fastv", cfg, 0.25, k=1)
  faults.record("methods.get", 'methods.get("random+fastv", cfg, 0.25, k=1)',
                f"ConfigError: {e.value}", before="compile")
