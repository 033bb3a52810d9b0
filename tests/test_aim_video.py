"""AIM on LLaVA-OneVision video, as the official code (LaVi-Lab/AIM) runs it: each frame's
pooled tokens merged by bipartite steps on the projected features (r = n // 2, then
n // 4), never across frames, one newline after the video; PageRank then keeps
⌊N_v · rate⌋ of the sample's own N_v, the post-merge count with the newline. The
official merge and keep counts are restated below from the official code."""

import jax
import numpy as np
import pytest
import torch

from tests.testing import TINY_OV, left_pad, official_aim_keep, random_params
from tokred_jax.core import tokens
from tokred_jax.io import batching
from tokred_jax.methods import aim, base
from tokred_jax.models import llava, llava_onevision, presets

FRAMES = (32, 20)  # the second video fills 20 of the bucket's 32 frames


def official_merge(metric, r, x):
  """`bipartite_soft_matching_merge` of LaVi-Lab/AIM llava/model/token_merge.py."""
  t = metric.shape[1]
  r = min(r, t // 2)
  metric = metric / metric.norm(dim=-1, keepdim=True)
  a, b = metric[..., ::2, :], metric[..., 1::2, :]
  node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
  edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
  unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
  dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
  src, dst = x[..., ::2, :], x[..., 1::2, :]
  n, t1, c = src.shape
  unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
  src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
  dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="mean")
  return torch.cat([unm, dst], dim=1)


def test_merge_equals_the_official_merge_per_frame():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 196, 24)).astype(np.float32)  # three frames' pooled tokens
  stage = aim.MergePlan((98, 49), "features", steps=aim.LLAVA_OV_VIDEO_MERGE_49)
  merge = jax.jit(lambda x, c: stage.after_projector(None, c, tokens.from_features(x)))
  ours = merge(x, stage.traced())
  want = torch.from_numpy(x)
  for r in (196 // 2, 196 // 4):
    want = official_merge(want, r, want)
  assert ours.features.shape == want.shape == (3, 49, 24)
  np.testing.assert_allclose(np.asarray(ours.features), want.numpy(), rtol=1e-5, atol=1e-6)
  assert np.asarray(ours.valid).all()


def test_full_size_plan_keeps_49_per_frame_and_the_official_counts():
  cfg = presets.get("llava-onevision-qwen2-7b-ov")
  plan = base.make_plan(aim.build(cfg), cfg, llava_onevision.Packing(32, cfg.vision.grid))
  merge = plan.find(aim.MergePlan)
  assert merge.steps == aim.LLAVA_OV_VIDEO_MERGE_49 and merge.capacities == (98, 49)
  assert merge.metric == "features"
  assert plan.projector_tokens == 729 and plan.num_visual == plan.exact.visual == 32 * 49 + 1
  assert list(plan.exact.llm_visual) == official_aim_keep(32 * 49 + 1, 28, 14, 22)
  assert plan.exact.llm_visual[15] == 1372 and plan.exact.llm_visual[21] == 196
  assert plan.score_layers == tuple(range(14, 22))


def test_merge_steps_are_capped_as_the_official_code_caps_them():
  cfg = TINY_OV
  packing = llava_onevision.Packing(8, cfg.vision.grid)
  assert base.make_plan(aim.build(cfg), cfg, packing).find(aim.MergePlan).steps == (4, 2)
  with pytest.raises(ValueError, match="merges at most 4"):  # 9 tokens: ⌊9/2⌋
    base.make_plan(aim.build(cfg, merge_r=(5,)), cfg, packing)
  assert aim.merge_steps(9, 1) == (4, 2, 1, 1)


def _prompts(cfg, slots, seed=0):
  """Left-padded prompts: a few words, `slots` video slots, a few more words."""
  rng = np.random.default_rng(seed)
  rows = [np.concatenate([rng.integers(3, 120, 3 + b), np.full(slots, cfg.video_token_id),
                          rng.integers(3, 120, 4)]) for b in range(len(FRAMES))]
  return left_pad(rows, cfg.pad_token_id)


@pytest.fixture(scope="module")
def video_run():
  cfg = TINY_OV
  params = random_params(cfg)
  rng = np.random.default_rng(1)  # every frame its own noise: no two frames alike
  videos = [rng.integers(0, 256, (n, 40, 60, 3), dtype=np.uint8) for n in FRAMES]
  visuals = batching.video_batch(videos, cfg)
  plan = base.make_plan(aim.build(cfg, merge_r=(4, 2)), cfg,
                        batching.packing(visuals.pixels, cfg))
  ids, mask, positions = _prompts(cfg, plan.num_visual)
  forward = jax.jit(lambda p, px: llava.Llava(cfg).apply(
      {"params": p}, ids, px, mask, positions, plan=plan, return_aux=True))
  _, aux = forward(params, visuals.pixels)
  return plan, {k: np.asarray(v) for k, v in aux.items()}


def test_each_frame_keeps_its_count_and_each_sample_its_official_counts(video_run):
  plan, aux = video_run
  assert plan.num_visual == 32 * 3 + 1 and plan.find(aim.MergePlan).capacities == (5, 3)
  per_layer = aux["visual_per_layer"]  # [L, B]
  l1, l2 = aim.default_schedule(TINY_OV.text.num_layers)
  for b, frames in enumerate(FRAMES):
    assert list(per_layer[:, b]) == official_aim_keep(frames * 3 + 1, 8, l1, l2)
  assert per_layer[l1 + 1, 1] < plan.exact.llm_visual[l1 + 1]  # its own N_v, not the bucket's


def test_merges_never_cross_frames(video_run):
  _, aux = video_run
  sources = aux["sources"]  # [B, 32 frames · 9 pooled tokens]: each one's visual slot
  assert sources.shape == (2, 32 * 9)
  frame = np.arange(32 * 9) // 9
  for b, frames in enumerate(FRAMES):
    held = sources[b] >= 0
    np.testing.assert_array_equal(held, frame < frames)  # merged, never dropped
    slots = sources[b][held]
    for slot in np.unique(slots):
      assert len(set(frame[held][slots == slot])) == 1, f"slot {slot} spans frames"
    per_frame = [len(np.unique(slots[frame[held] == f])) for f in range(frames)]
    assert per_frame == [3] * frames
