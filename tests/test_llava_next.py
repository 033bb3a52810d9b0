"""LLaVA-NeXT and LLaVA-OneVision against transformers on tiny random checkpoints: anyres
images of many sizes and aspect ratios (OneVision's anyres_max_9 downsample included),
several images in one prompt and video. Our inputs come from our own preprocessing
(io/batching.py), transformers' from its PIL image processors; our batches are padded to
a bucket, so the logits are compared at the positions both have."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil)

from tests import hf_fixtures
from tokred_jax.engine import generate
from tokred_jax.io import batching, checkpoint
from tokred_jax.models import llava

# (height, width): wide, tall, square, thin strips, and (OneVision) ones over 9 crops.
NEXT_SIZES = [[(37, 90), (90, 37)], [(60, 60), (20, 120)], [(130, 25), (28, 28)]]
OV_SIZES = [[(140, 150), (290, 280)], [(75, 300), (250, 180)]]


@pytest.fixture(scope="module")
def next_model(llava_next_dir):
  cfg, params = checkpoint.load_checkpoint(str(llava_next_dir))
  hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(
      str(llava_next_dir), dtype=torch.float32).eval()
  processor = LlavaNextImageProcessorPil(
      size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
      image_grid_pinpoints=hf_fixtures.NEXT_PINPOINTS)
  return cfg, params, hf, processor


@pytest.fixture(scope="module")
def ov_model(llava_onevision_dir):
  cfg, params = checkpoint.load_checkpoint(str(llava_onevision_dir))
  hf = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
      str(llava_onevision_dir), dtype=torch.float32).eval()
  processor = LlavaOnevisionImageProcessorPil(
      size={"height": 70, "width": 70}, image_grid_pinpoints=hf_fixtures.OV_PINPOINTS,
      image_mean=[0.5] * 3, image_std=[0.5] * 3)
  return cfg, params, hf, processor


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in sizes]


def _prompts(cfg, counts, slots, token, seed=0):
  """Two left-padded batches of the same prompts, words around each image's slots: ours
  (each prompt `slots` visual slots, `batching.slot_counts`) and transformers' (each
  image its exact count), with `real`, our positions transformers has too."""
  rng = np.random.default_rng(seed)
  special = {cfg.image_token_id, cfg.pad_token_id, cfg.video_token_id, 0, 1, 2}
  words = np.array([t for t in range(3, 290) if t not in special])
  ours, theirs = [], []
  for b, image_counts in enumerate(counts):
    widened = batching.slot_counts(image_counts, slots)
    row = [rng.choice(words, 2 + b)]
    for n, w in zip(image_counts, widened):
      row += [np.full(n, token), np.full(w - n, -1), rng.choice(words, 2)]
    row.append(rng.choice(words, 3))
    row = np.concatenate(row)
    ours.append(row)
    theirs.append(row[row >= 0])

  def pad(rows):
    length = max(map(len, rows))
    ids = np.full((len(rows), length), -2, np.int64)
    for i, r in enumerate(rows):
      ids[i, length - len(r):] = r
    return ids

  ids, hf_ids = pad(ours), pad(theirs)
  real, mask = ids >= 0, ids != -2
  ids = np.where(ids == -1, token, np.where(mask, ids, cfg.pad_token_id)).astype(np.int32)
  batch = dict(input_ids=ids, attention_mask=mask,
               positions=np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32))
  hf_mask = hf_ids != -2
  return batch, real, np.where(hf_mask, hf_ids, 0), hf_mask


def _hf_logits(hf, ids, mask, **visual):
  with torch.no_grad():
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long(),
             position_ids=torch.from_numpy(positions), **visual)
  return out.logits.numpy()


@functools.cache
def _forward(cfg):
  return jax.jit(lambda p, b: llava.Llava(cfg).apply(
      {"params": p}, b["input_ids"], b["pixel_values"], b["attention_mask"], b["positions"]))


def _compare(cfg, params, batch, real, ref, hf_mask):
  ours = np.asarray(_forward(cfg)(params, batch))
  assert np.std(ref[hf_mask]) > 0.1, "logits too flat for a meaningful comparison"
  np.testing.assert_array_less(np.abs(ours[real] - ref[hf_mask]).max(), 1e-4)


def _image_inputs(model, sizes, seed):
  cfg, params, hf, processor = model
  images = _images(sizes, seed)
  prompts = [[image] for image in images]
  visuals = batching.image_batch(prompts, cfg)
  batch, real, hf_ids, hf_mask = _prompts(cfg, visuals.counts,
                                          visuals.pixels.valid.shape[1], cfg.image_token_id,
                                          seed)
  batch["pixel_values"] = visuals.pixels
  hf_in = processor(images, return_tensors="pt")
  return batch, real, hf_ids, hf_mask, hf_in


@pytest.mark.parametrize("sizes", NEXT_SIZES, ids=str)
def test_next_logits_match_transformers(next_model, sizes):
  cfg, params, hf, _ = next_model
  batch, real, hf_ids, hf_mask, hf_in = _image_inputs(next_model, sizes, 0)
  ref = _hf_logits(hf, hf_ids, hf_mask, pixel_values=hf_in["pixel_values"],
                   image_sizes=hf_in["image_sizes"])
  _compare(cfg, params, batch, real, ref, hf_mask)


@pytest.mark.parametrize("sizes", OV_SIZES, ids=str)
def test_onevision_logits_match_transformers(ov_model, sizes):
  cfg, params, hf, _ = ov_model
  batch, real, hf_ids, hf_mask, hf_in = _image_inputs(ov_model, sizes, 1)
  # Some of these images are over 9 crops' worth of tokens: shrunk bilinearly.
  assert (batch["pixel_values"].weight[..., 1] > 0).any()
  ref = _hf_logits(hf, hf_ids, hf_mask, pixel_values=hf_in["pixel_values"],
                   image_sizes=hf_in["image_sizes"])
  _compare(cfg, params, batch, real, ref, hf_mask)


def test_onevision_multi_image_matches_transformers(ov_model):
  cfg, params, hf, processor = ov_model
  per_prompt = [_images([(60, 90), (100, 40), (70, 70)], 2), _images([(90, 60), (50, 50)], 3)]
  visuals = batching.image_batch(per_prompt, cfg)
  assert visuals.counts == [[26, 26, 26], [26, 26]]
  batch, real, hf_ids, hf_mask = _prompts(cfg, visuals.counts,
                                          visuals.pixels.valid.shape[1], cfg.image_token_id)
  batch["pixel_values"] = visuals.pixels
  hf_in = processor(per_prompt, return_tensors="pt")
  ref = _hf_logits(hf, hf_ids, hf_mask, pixel_values=hf_in["pixel_values"],
                   image_sizes=hf_in["image_sizes"], batch_num_images=hf_in["batch_num_images"])
  _compare(cfg, params, batch, real, ref, hf_mask)


def _video_inputs(cfg, frames_per_prompt, seed=4):
  rng = np.random.default_rng(seed)
  videos = [rng.integers(0, 256, (n, 40, 60, 3), dtype=np.uint8) for n in frames_per_prompt]
  visuals = batching.video_batch(videos, cfg, ladder=(4, 8))
  batch, real, hf_ids, hf_mask = _prompts(cfg, visuals.counts,
                                          visuals.pixels.valid.shape[1] * 9 + 1,
                                          cfg.video_token_id, seed)
  batch["pixel_values"] = visuals.pixels
  return batch, real, hf_ids, hf_mask, visuals


def test_onevision_video_matches_transformers(ov_model):
  cfg, params, hf, _ = ov_model
  batch, real, hf_ids, hf_mask, visuals = _video_inputs(cfg, (3, 3))
  assert visuals.pixels.pixels.shape[1] == 4 and visuals.counts == [[28], [28]]
  # Both prompts' real frames, as transformers takes them (the same pixels).
  frames = torch.from_numpy(visuals.pixels.pixels[:, :3]).permute(0, 1, 4, 2, 3).contiguous()
  ref = _hf_logits(hf, hf_ids, hf_mask, pixel_values_videos=frames)
  _compare(cfg, params, batch, real, ref, hf_mask)


def _greedy(cfg, params, batch, n):
  gen = generate.Generator(llava.Llava(cfg), generate.SamplingConfig(max_new_tokens=n),
                           eos_ids=())
  return gen(params, batch)


def _hf_greedy(hf, ids, mask, n, **visual):
  with torch.no_grad():
    out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(
        mask).long(), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
        pad_token_id=0, **visual)
  return out[:, ids.shape[1]:].numpy()


def test_greedy_tokens_match_transformers(next_model, ov_model):
  n = 20
  cfg, params, hf, _ = next_model
  batch, _, hf_ids, hf_mask, hf_in = _image_inputs(next_model, NEXT_SIZES[0], 5)
  ours = _greedy(cfg, params, batch, n)
  assert len(set(ours[0].tolist())) > 1, "degenerate generation proves little"
  np.testing.assert_array_equal(ours, _hf_greedy(
      hf, hf_ids, hf_mask, n, pixel_values=hf_in["pixel_values"],
      image_sizes=hf_in["image_sizes"]))
  cfg, params, hf, _ = ov_model
  batch, _, hf_ids, hf_mask, visuals = _video_inputs(cfg, (3, 3), 6)
  frames = torch.from_numpy(visuals.pixels.pixels[:, :3]).permute(0, 1, 4, 2, 3).contiguous()
  np.testing.assert_array_equal(_greedy(cfg, params, batch, n), _hf_greedy(
      hf, hf_ids, hf_mask, n, pixel_values_videos=frames))
