"""Per-sample keep counts in an anyres bucket: two LLaVA-NeXT images of different sizes
share one bucket, so their real visual counts differ below its capacity. Each sample keeps
the official count of its OWN visual tokens (base crop, unpadded tiles and newlines):
p-MoD trunc(N · R_ℓ) in float32, restated with torch as the official code writes it;
AIM ⌊N_v · rate⌋ of the post-merge count."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from tests.testing import TINY_NEXT, left_pad, official_aim_keep, random_params
from tokred_jax.io import batching
from tokred_jax.methods import aim, base, pmod, prune
from tokred_jax.models import llava

SIZES = [(56, 56), (37, 90)]  # one crop's tile grid unpadded in full, one cut to a strip
# TINY_NEXT with a 4-layer LLM (p-MoD routers on layers 1-3), to compile fast.
NEXT_4 = dataclasses.replace(TINY_NEXT, text=dataclasses.replace(
    TINY_NEXT.text, num_layers=4, router_layers=(1, 2, 3)))


def _run(cfg, params, recipe):
  rng = np.random.default_rng(0)
  images = [[rng.integers(0, 256, (*size, 3), dtype=np.uint8)] for size in SIZES]
  visuals = batching.image_batch(images, cfg)
  plan = base.make_plan(recipe, cfg, batching.packing(visuals.pixels, cfg))
  rows = []
  for b, counts in enumerate(visuals.counts):
    slots = sum(batching.slot_counts(counts, plan.num_visual))
    rows.append(np.concatenate([rng.integers(3, 120, 2 + b),
                                np.full(slots, cfg.image_token_id), rng.integers(3, 120, 3)]))
  ids, mask, positions = left_pad(rows, cfg.pad_token_id)
  _, aux = jax.jit(lambda p, px: llava.Llava(cfg).apply(
      {"params": p}, ids, px, mask, positions, plan=plan, return_aux=True))(
          params, visuals.pixels)
  return plan, [c[0] for c in visuals.counts], np.asarray(aux["visual_per_layer"])


def test_pmod_routes_trunc_of_each_samples_own_count():
  cfg = NEXT_4
  params = random_params(cfg, seed=1)  # random routers: w differs between tokens
  recipe = pmod.build(cfg)
  plan, counts, per_layer = _run(cfg, params, recipe)
  assert counts[0] != counts[1] and max(counts) <= plan.num_visual
  ratios = recipe.stages[0].ratios
  assert ratios[0] is None and all(r is not None for r in ratios[1:])
  for b, n in enumerate(counts):
    n_v = torch.tensor([n], dtype=torch.int32)
    want = [n if r is None else int(torch.trunc(n_v * r).int()) for r in ratios]
    assert list(per_layer[:, b]) == want
  # The bucket's own count (what plans used to route for every sample) is larger.
  small = int(np.argmin(counts))
  assert per_layer[-1, small] < plan.exact.mod_visual[-1]


def test_aim_prunes_each_samples_own_post_merge_count():
  cfg = NEXT_4  # layers 2 and 3 keep 2/3 and 1/3 of the visual tokens
  _, counts, per_layer = _run(cfg, random_params(cfg), aim.build(cfg, merge_r=(8,), l1=1, l2=4))
  merged = per_layer[0]  # what the LLM gets: merged crops packed, newlines included
  assert merged[0] != merged[1] and all(merged < counts)
  for b in range(2):
    assert list(per_layer[:, b]) == official_aim_keep(int(merged[b]), 4, 1, 4)


@pytest.mark.parametrize("n,r", [(2365, 0.7644820051634812), (576, 0.15), (2880, 0.5)])
def test_pmod_counts_round_as_the_official_float32_product(n, r):
  want = int(torch.trunc(torch.tensor([n], dtype=torch.int32) * r).int())
  assert pmod.kept_count(n, r) == want
  got = pmod.routed_counts(np.asarray([n], np.int32), np.float32(r))
  assert int(got[0]) == want


def test_traced_floor_counts_equal_the_planned_ones():
  """The program's ⌊n · r⌋ (`prune.floor_scaled`) against the plan's `floor_count` for
  every count a bucket can hold, at the schedules' ratios and at arbitrary ones."""
  n = np.arange(1 << 13, dtype=np.int32)
  ratios = sorted(set(aim.layer_ratios(28, 14, 22) + aim.layer_ratios(8, 3, 5)
                      + (1 / 3, 2 / 3, 0.65, 0.7, 0.999, 0.0)
                      + tuple(np.random.default_rng(0).uniform(size=20))))
  for r in ratios:
    got = np.asarray(prune.floor_scaled(n, np.int32(prune.fixed_ratio(r))))
    want = np.asarray([base.floor_count(int(i), r) for i in n])
    np.testing.assert_array_equal(got, want, err_msg=f"ratio {r}")
