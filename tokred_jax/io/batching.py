"""Batches of anyres images and videos for LLaVA-NeXT and LLaVA-OneVision.

A prompt takes any number of images, or one video. Each image of a prompt becomes its
crops and a token layout (io/anyres.py): with tiles (the base image first) when it is the
prompt's only image or the model is LLaVA-NeXT, as one padded-to-square crop when it is one
of several images for OneVision (transformers' `batch_num_images` rule). A video becomes
its frames. The batch is padded to a bucket (crops and visual slots for images, a rung of
the frame ladder for videos), so that every batch of a bucket runs the same program;
`Visuals.counts` says how many visual tokens each image or video really has, which is
how many slots its placeholder in the prompt is widened into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from tokred_jax.io import anyres, processing, video
from tokred_jax.models import llava_next, llava_onevision
from tokred_jax.models.config import LlavaConfig

# Images per multi-image OneVision prompt, rounded up to a rung: one crop each.
IMAGE_LADDER = (2, 4, 8, 16, 32)
FRAME_LADDER = (8, 16, 32, 48, 64)


class Visuals(NamedTuple):
  """The visual input of B prompts: `pixels`, a `llava_next.Crops` or
  `llava_onevision.Frames` of numpy arrays; `counts`, per prompt the visual tokens of
  each of its images (of its video: one entry); `waste`, the fractions of crops (or
  frames) and of visual slots that are padding."""
  pixels: llava_next.Crops | llava_onevision.Frames
  counts: list[list[int]]
  waste: tuple[float, float]


def spec_for(cfg: LlavaConfig) -> anyres.AnyresSpec:
  """How the model's images are cut and packed."""
  v = cfg.vision
  if cfg.arch == "llava":
    raise ValueError("a llava model takes one crop per image; anyres inputs are for "
                     "llava_next and llava_onevision checkpoints.")
  return anyres.AnyresSpec(v.image_size, v.patch_size, cfg.image_grid_pinpoints,
                           v.image_mean, v.image_std, max_patches=cfg.max_crops)


def _buckets(spec: anyres.AnyresSpec, one_crop_each: bool) -> list[anyres.Bucket]:
  """One image's buckets, then k images' for k on IMAGE_LADDER: one crop each
  (OneVision), or k times the largest one-image bucket (NeXT tiles every image)."""
  buckets = list(anyres.crop_buckets(spec))
  crops, capacity = (1, spec.grid ** 2 + 1) if one_crop_each else max(buckets)
  buckets += [anyres.Bucket(k * crops, k * capacity) for k in IMAGE_LADDER]
  return sorted(buckets, key=lambda b: (b.capacity, b.num_crops))


def image_batch(images: Sequence[Sequence[processing.ImageLike]], cfg: LlavaConfig
                ) -> Visuals:
  """images: per prompt, its images (PIL, paths or u8[H, W, 3] arrays)."""
  spec = spec_for(cfg)
  one_crop_each = cfg.arch == "llava_onevision"
  crops, layouts, counts, need_crops = [], [], [], 0
  for b, prompt_images in enumerate(images):
    if not len(prompt_images):
      raise ValueError(f"prompt {b} has no image; give it at least one.")
    parts, offset, prompt_counts = [], 0, []
    for image in prompt_images:
      image = processing._to_rgb(image)
      if one_crop_each and len(prompt_images) > 1:
        pixels, layout = anyres.single_crop(image, spec), anyres.single_crop_layout(spec,
                                                                                     offset)
      else:
        pixels = anyres.anyres_crops(image, spec)
        layout = anyres.image_layout((image.height, image.width), spec, offset)
      parts.append(layout)
      crops.append((b, offset, pixels))
      prompt_counts.append(layout.num_tokens)
      offset += len(pixels)
    layouts.append(anyres.concat_layouts(parts))
    counts.append(prompt_counts)
    need_crops = max(need_crops, offset)
  need_tokens = max(layout.num_tokens for layout in layouts)
  fitting = [bk for bk in _buckets(spec, one_crop_each)
             if bk.num_crops >= need_crops and bk.capacity >= need_tokens]
  if not fitting:
    raise ValueError(f"a prompt needs {need_crops} crops and {need_tokens} visual tokens, "
                     "more than any bucket holds; give it fewer or smaller images.")
  bucket = fitting[0]
  s = spec.crop_size
  pixels = np.zeros((len(images), bucket.num_crops, s, s, 3), np.float32)
  for b, offset, p in crops:
    pixels[b, offset:offset + len(p)] = p
  padded = [anyres.pad_layout(layout, bucket.capacity) for layout in layouts]
  stacked = [np.stack(parts) for parts in zip(*padded)]
  used_crops = sum(len(p) for _, _, p in crops)
  used_tokens = sum(layout.num_tokens for layout in layouts)
  waste = (1 - used_crops / pixels.shape[0] / bucket.num_crops,
           1 - used_tokens / pixels.shape[0] / bucket.capacity)
  return Visuals(llava_next.Crops(pixels, *stacked), counts, waste)


def video_batch(videos: Sequence[np.ndarray | str], cfg: LlavaConfig,
                num_frames: int = 32, ladder: Sequence[int] = FRAME_LADDER) -> Visuals:
  """videos: per prompt one video, u8[F, H, W, 3] frames (used as they are) or a file
  path (decoded, `num_frames` sampled uniformly)."""
  if cfg.arch != "llava_onevision":
    raise ValueError(f"videos need a llava_onevision checkpoint; this one is {cfg.arch}.")
  spec = spec_for(cfg)
  clips = [video.video_pixels(video.load_video(v, num_frames) if isinstance(v, str) else v,
                              spec) for v in videos]
  rung, _ = anyres.frame_bucket(max(len(c) for c in clips), ladder)
  s = spec.crop_size
  pixels = np.zeros((len(clips), rung, s, s, 3), np.float32)
  valid = np.zeros((len(clips), rung), bool)
  for b, clip in enumerate(clips):
    pixels[b, :len(clip)], valid[b, :len(clip)] = clip, True
  counts = [[video.video_token_count(len(c), spec.grid)] for c in clips]
  used = valid.mean()
  slots = video.video_token_count(rung, spec.grid)
  waste = (1 - used, 1 - sum(c[0] for c in counts) / len(clips) / slots)
  return Visuals(llava_onevision.Frames(pixels, valid), counts, waste)


def packing(pixels, cfg: LlavaConfig):
  """The plan's input bucket (`methods.base.make_plan`'s packing) of a batch's pixels;
  None for one crop per prompt."""
  if isinstance(pixels, llava_next.Crops):
    return llava_next.packing(pixels, cfg.vision.grid)
  if isinstance(pixels, llava_onevision.Frames):
    return llava_onevision.packing(pixels, cfg.vision.grid)
  return None


def slot_counts(counts: Sequence[int], slots: int) -> list[int]:
  """How many slots each placeholder of a prompt is widened into, for a plan with
  `slots` visual slots: each image its own count and the last one the padding; when a
  stage before the LLM reduced the tokens (fewer slots than the counts), image
  boundaries are gone, so every slot goes to the first placeholder."""
  total = sum(counts)
  if slots < total:
    return [slots] + [0] * (len(counts) - 1)
  return list(counts[:-1]) + [counts[-1] + slots - total]
