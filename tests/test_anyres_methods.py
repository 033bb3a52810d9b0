"""Every method on the anyres models: LLaVA-NeXT images, LLaVA-OneVision anyres_max_9 and
multi-image prompts (one bucket), and OneVision video (3 and 4 frames in a 4-frame bucket).

For each method at a retention level where it applies: the plan builds for the input
bucket, the jitted forward runs, the logits of real positions are finite, and the visual
tokens each LLM layer processed are what the plan says. The packed count depends on the
image size, so a plan holds it only for a prompt that fills its bucket; for the others
the count is checked against the rule of the stage (a prune stage keeps ⌊ratio · the
prompt's own count⌋, a router trunc(float32 count · ratio)), and the tokens a stage before
the LLM leaves against the plan's capacity.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.testing import TINY_NEXT, TINY_OV, left_pad, with_routers
from tokred_jax import methods
from tokred_jax.core import sharding
from tokred_jax.engine import budget, cost
from tokred_jax.io import batching
from tokred_jax.core import tokens as tokens_lib
from tokred_jax.methods import aim, base, fastv, mustdrop, pmod, prune
from tokred_jax.models import llava, llava_next
from tokred_jax.models.config import ConfigError

NEXT, OV = with_routers(TINY_NEXT), with_routers(TINY_OV)
KINDS = ("next", "ov_images", "video")
# (kind, recipe, retention, mode, options). Composed recipes test two methods in one
# program (each program costs seconds to compile). Pooling takes a stride that divides
# the grid it pools: NeXT's 4x4 crops (2), OneVision's 5x5 crops (5), its pooled 3x3
# frames (3). MustDrop's key set needs a CLS token (not OneVision's SigLIP); its window
# merge runs per NeXT crop, here with every 2x2 window merging (threshold -1: a cosine
# is never below it); the whole method on NeXT: tests/test_anyres_pipeline.py.
_POOL_PMOD = lambda stride: ("pooling+pmod", None, "fast",
                             {"pooling": {"stride": stride}, "pmod": {"retention": 0.5}})
CASES = [("next", "none", None, "fast", {}), ("next", "tome+fastv", 0.5, "fast", {}),
         ("next", "random+dart", 0.5, "fast", {}), ("next", *_POOL_PMOD(2)),
         ("next", "aim", 0.5, "fast", {}), ("next", "mustdrop.window", None, "fast",
                                             {"window": 2, "threshold": -1.0}),
         ("next", "tome+fastv", 0.5, "reference", {}),
         ("ov_images", "tome+fastv", 0.5, "fast", {}),
         ("ov_images", "random+dart", 0.5, "fast", {}), ("ov_images", *_POOL_PMOD(5)),
         ("ov_images", "aim", 0.5, "fast", {}),
         ("video", "fastv", 0.5, "fast", {}), ("video", "random+dart", 0.5, "fast", {}),
         ("video", *_POOL_PMOD(3)), ("video", "aim", 0.5, "fast", {}),
         ("video", "random+dart", 0.5, "reference", {})]
_ID = lambda c: f"{c[0]}-{c[1]}@{c[2]}-{c[3]}"


def _images(sizes, seed):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]


def _visuals(kind):
  if kind == "next":  # a wide image in a 4-tile bucket, and a square one that fills it
    return batching.image_batch([_images([(37, 90)], 0), _images([(60, 60)], 1)], NEXT)
  if kind == "ov_images":  # a shrunk anyres_max_9 image, and three images of one prompt
    return batching.image_batch([_images([(290, 280)], 2),
                                 _images([(60, 90), (100, 40), (70, 70)], 3)], OV)
  rng = np.random.default_rng(4)
  videos = [rng.integers(0, 256, (n, 40, 60, 3), dtype=np.uint8) for n in (3, 4)]
  return batching.video_batch(videos, OV, ladder=(4, 8))


def _batch(cfg, visuals, slots, token):
  """Left-padded prompts: words, each image's slots (`batching.slot_counts`), words."""
  rng = np.random.default_rng(5)
  rows = []
  for b, counts in enumerate(visuals.counts):
    row = [rng.integers(3, 100, 2 + b)]
    for n in batching.slot_counts(counts, slots):
      row += [np.full(n, token), rng.integers(3, 100, 2)]
    rows.append(np.concatenate(row + [rng.integers(3, 100, 3)]))
  ids, mask, positions = left_pad(rows)
  return dict(input_ids=ids, attention_mask=mask, positions=positions,
              pixel_values=visuals.pixels)


def _params(cfg, seed):
  params = llava.init_params(cfg, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  for l in cfg.text.router_layers:  # trained routers are not all zero (no ties)
    router = params["llm"][f"layers_{l}"]["router"]
    router["kernel"] = jnp.asarray(rng.normal(0, 0.5, router["kernel"].shape), jnp.float32)
  return params


def _forward(cfg, plan):
  return jax.jit(lambda p, b: llava.Llava(cfg).apply(
      {"params": p}, b["input_ids"], b["pixel_values"], b["attention_mask"], b["positions"],
      plan=plan, return_aux=True))


@pytest.fixture(scope="module")
def inputs():
  out = {}
  for kind in KINDS:
    cfg = NEXT if kind == "next" else OV
    visuals = _visuals(kind)
    token = cfg.video_token_id if kind == "video" else cfg.image_token_id
    out[kind] = (cfg, visuals, batching.packing(visuals.pixels, cfg), token)
  return out


@pytest.fixture(scope="module")
def params():
  return {NEXT: _params(NEXT, 0), OV: _params(OV, 1)}


@pytest.fixture(scope="module")
def runs(inputs, params):
  """(plan, batch, logits, aux) of every case, by its id."""
  def one(case):
    kind, name, retention, mode, options = case
    cfg, visuals, packing, token = inputs[kind]
    recipe = methods.get(name, cfg, retention, mode=mode, **options)
    plan = base.make_plan(recipe, cfg, packing)
    batch = _batch(cfg, visuals, plan.num_visual, token)
    logits, aux = _forward(cfg, plan)(params[cfg], batch)
    return plan, batch, np.asarray(logits), jax.tree_util.tree_map(np.asarray, aux)

  return {_ID(case): one(case) for case in CASES}


def _real_counts(visuals):
  """Each prompt's packed visual tokens (newlines included), as the processor counts."""
  return np.asarray([sum(c) for c in visuals.counts])


def test_inputs_cover_every_kind(inputs):
  _, visuals, _, _ = inputs["ov_images"]
  assert (visuals.pixels.weight[0, :, 1] > 0).any(), "the first image should be shrunk"
  assert visuals.counts[1] == [26, 26, 26]
  _, visuals, packing, _ = inputs["video"]
  assert packing.frames == 4 and visuals.pixels.valid.sum(1).tolist() == [3, 4]
  _, visuals, packing, _ = inputs["next"]
  assert _real_counts(visuals).tolist() == [52, packing.slots]  # the second fills it


@pytest.mark.parametrize("case", CASES, ids=_ID)
def test_layers_process_what_the_plan_says(inputs, runs, case):
  kind = case[0]
  _, visuals, packing, token = inputs[kind]
  plan, batch, logits, aux = runs[_ID(case)]
  assert plan.packing == packing
  mask = batch["attention_mask"]
  assert np.isfinite(logits[mask]).all()
  text = mask & (batch["input_ids"] != token)
  assert (np.abs(logits[text]).max(-1) > 0).all(), "a text position lost its logits"
  per_layer = aux["visual_per_layer"].T  # [B, L]
  into_llm = per_layer[:, 0]
  real = _real_counts(visuals)
  in_llm = lambda s: isinstance(s, (prune.PrunePlan, pmod.RoutePlan))
  # AIM's merge takes OneVision's video frames only: on its images it plans no step.
  idle = lambda s: isinstance(s, aim.MergePlan) and not s.capacities
  if all(in_llm(s) or idle(s) for s in plan.stages):
    np.testing.assert_array_equal(into_llm, real)  # nothing reduces before the LLM
  else:
    assert (into_llm <= plan.exact.visual).all() and (into_llm < real).all()
  if kind == "video":
    # Every frame keeps the same count, so it is exact for both prompts.
    per_frame = (plan.exact.visual - 1) // packing.frames
    np.testing.assert_array_equal(into_llm, visuals.pixels.valid.sum(1) * per_frame + 1)
  planned = plan.visual_per_layer
  for b, n in enumerate(into_llm.tolist()):
    want = [n] * len(planned)
    for stage in plan.stages:
      if isinstance(stage, prune.PrunePlan) and stage.relative:  # of the prompt's own
        want = [min(w, math.floor(n * r + 1e-6)) for w, r in zip(want, stage.ratios)]
      elif isinstance(stage, pmod.RoutePlan) and stage.relative:  # likewise, trunc(f32)
        want = [min(w, pmod.kept_counts(n, stage.ratios)[l]) for l, w in enumerate(want)]
      elif in_llm(stage):  # the plan's counts, or what the prompt has
        want = [min(w, p) for w, p in zip(want, planned)]
    assert per_layer[b].tolist() == want, b
    if n == plan.exact.visual:  # a prompt that fills the plan gets its counts
      assert tuple(want) == planned


def test_mustdrop_window_merges_each_crop(runs):
  """Every 2x2 window of every crop merged leaves what 2x2 pooling leaves: the packing
  keeps one token per window wherever the layout reads one of its patches."""
  window = runs[_ID(CASES[5])][3]["visual_per_layer"][0]
  pooled = runs[_ID(CASES[3])][3]["visual_per_layer"][0]
  np.testing.assert_array_equal(window, pooled)


def test_prune_stages_count_from_each_prompts_own_tokens(runs):
  plan, _, _, aux = runs[_ID(CASES[11])]
  stage = plan.find(fastv.LastTokenPlan)
  r = stage.ratios[-1]
  assert stage.relative and plan.exact.visual == 37
  assert plan.visual_per_layer[-1] == math.floor(37 * r + 1e-6)
  # The 3-frame video keeps its share of its own 28 tokens, not of the bucket's 37.
  assert aux["visual_per_layer"][-1].tolist() == [math.floor(28 * r + 1e-6),
                                                  math.floor(37 * r + 1e-6)]


@pytest.mark.parametrize("kind, name", [("next", "tome+fastv"), ("video", "random+dart")])
def test_fast_equals_reference_on_text(inputs, runs, kind, name):
  _, batch, a, aux_a = runs[f"{kind}-{name}@0.5-fast"]
  _, _, b, aux_b = runs[f"{kind}-{name}@0.5-reference"]
  text = batch["attention_mask"] & (batch["input_ids"] != inputs[kind][3])
  np.testing.assert_allclose(a[text], b[text], atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(aux_a["visual_per_layer"], aux_b["visual_per_layer"])


def test_refusals_name_the_problem(inputs):
  cfg, _, packing, _ = inputs["video"]
  for recipe in (methods.get("tome", cfg, 0.5), methods.get("mustdrop.window", cfg, window=5)):
    with pytest.raises(ConfigError, match="pooled on their whole patch grid"):
      base.make_plan(recipe, cfg, packing)
  with pytest.raises(ConfigError, match="CLS token"):
    base.make_plan(methods.get("mustdrop", OV, window=5), OV, inputs["ov_images"][2])
  with pytest.raises(ConfigError, match="pass packing="):
    budget.solve(NEXT, "fastv", 0.6)


@pytest.mark.parametrize("kind", ["next", "video"])
@pytest.mark.parametrize("method", ["aim", "fastv"])
def test_budget_counts_the_packed_bucket(inputs, kind, method):
  cfg, _, packing, _ = inputs[kind]
  sol = budget.solve(cfg, method, 0.6, packing=packing, num_text_tokens=20)
  assert sol.plan.packing == packing
  dense = base.make_plan(base.Recipe(), cfg, packing)
  # The dense plan's LLM sees the packed bucket; its tower runs every crop or frame.
  assert dense.exact.visual == (packing.slots if kind == "next" else
                                packing.frames * 9 + 1)
  flops = lambda p: cost.plan_cost(cfg, p, 20, exact=True)["flops"].total
  # The tower and projector run on every crop (frame), the LLM on the packed sequence.
  by_hand = sum(stage.total for stage in (
      cost.vision_flops(cfg, images_per_sample=packing.crops),
      cost.projector_flops(cfg, packing.crops * cfg.num_image_tokens),
      cost.llm_flops(cfg, 20 + dense.exact.visual), cost.lm_head_flops(cfg)))
  assert flops(dense) == by_hand
  assert sol.achieved == pytest.approx(flops(sol.plan) / flops(dense))
  # The tiny model's steps are coarse (AIM on 9-token frames: 0.58, then 0.62).
  assert sol.achieved == pytest.approx(0.6, abs=0.025)


@pytest.mark.parametrize("kind, name", [("next", "tome+fastv"), ("video", "aim")])
def test_sharded_run_equals_one_device(inputs, params, runs, kind, name):
  """On 8 simulated devices (tests/conftest.py): batch over data (2), heads, MLP and
  vocabulary over tensor (4), as tests/test_sharding.py shards the LLaVA-1.5 forward."""
  cfg = inputs[kind][0]
  plan, batch, want, want_aux = runs[f"{kind}-{name}@0.5-fast"]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  sharded = sharding.shard_params(params[cfg], mesh)
  placed = jax.tree_util.tree_map(
      lambda x: jax.device_put(x, sharding.batch_sharding(mesh, np.ndim(x))), batch)

  def forward(p, b):
    with sharding.activation_sharding(mesh):
      return llava.Llava(cfg).apply({"params": p}, b["input_ids"], b["pixel_values"],
                                    b["attention_mask"], b["positions"], plan=plan,
                                    return_aux=True)

  logits, aux = jax.jit(forward)(sharded, placed)
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux["visual_per_layer"]),
                                want_aux["visual_per_layer"])


def test_mustdrop_key_set_follows_the_crops_into_the_sequence():
  """The key set chosen in each crop marks the packed slots whose tokens it holds."""
  cfg, b, p, g2, d = NEXT, 1, 3, 16, 2
  features = jnp.arange(b * p * g2 * d, dtype=jnp.float32).reshape(b * p, g2, d)
  crops = tokens_lib.from_features(features)
  layout = batching.image_batch([_images([(37, 90)], 0)], cfg).pixels
  assert layout.pixels.shape[1] == p
  key = np.zeros((b * p, g2), bool)
  key[0, [1, 5]] = key[1, [0, 15]] = key[2, 7] = True
  stage = mustdrop.KeyFilterPlan(0.5, (2,), gamma=0.1, alpha=0.1)
  run = types.SimpleNamespace(carry={"mustdrop.key": jnp.asarray(key)},
                              plan=types.SimpleNamespace(packing=batching.packing(layout, cfg)))
  stage.before_projector(run, None, crops)
  packed = llava_next.pack(crops, layout, jnp.zeros(d))
  stage.after_packing(run, None, packed)
  flags = np.asarray(run.carry["mustdrop.key"][0])
  # Each slot's token is crop token (crop, patch) = features' row; key where that was.
  x = np.asarray(packed.features[0])
  want = [bool(v) and key.reshape(-1)[int(row[0]) // d] for row, v in
          zip(x, np.asarray(packed.valid[0]) & ~np.asarray(layout.newline[0]))]
  assert flags.tolist() == want and sum(want) >= 3
