"""The visual input of a training sequence, by the model's arch and what the data holds.

  kind    model and data                         batch keys (B sequences)
  image   llava, an image a sequence             pixel_values f32[B, S, S, 3]
  anyres  llava_next / llava_onevision, images   crops f32[B, P, S, S, 3] (base, then tiles);
          of any size                            layout_src i32[B, N, 4];
                                                 layout_weight f32[B, N, 4];
                                                 layout_newline bool[B, N];
                                                 layout_valid bool[B, N]
  video   llava_onevision, videos                frames f32[B, F, S, S, 3];
                                                 frame_valid bool[B, F]

Every batch of a run has one shape, so that the training step compiles once: an anyres
image is padded to the largest bucket of the model's pinpoints (`training_bucket`: P
crops, N visual slots), a video to F = `num_frames` frames (longer ones sampled uniformly,
as at inference; shorter ones padded). Unused crops never reach the sequence and unused
slots and frames are masked, the positions of later tokens closing the gap, so a
sequence sees what it would see in the smallest bucket holding it at inference
(`io.batching`). The layout is the host's gather plan of `io.anyres` (`anyres.Layout`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokred_jax.data import generated, glyphs
from tokred_jax.io import anyres, batching, video
from tokred_jax.models import llava_next, llava_onevision
from tokred_jax.models.config import LlavaConfig

IMAGE, ANYRES, VIDEO = "image", "anyres", "video"
# Each kind's batch keys and their ranks (the text keys are the trainer's).
NDIM = {IMAGE: {"pixel_values": 4},
        ANYRES: {"crops": 5, "layout_src": 3, "layout_weight": 3, "layout_newline": 2,
                 "layout_valid": 2},
        VIDEO: {"frames": 5, "frame_valid": 2}}


def input_kind(cfg: LlavaConfig, dataset: str | None) -> str:
  """The kind of visual input a model of `cfg` trains on from `dataset` (a TFDS name,
  "NAME/CONFIG" of the project's own, "synthetic" or None: images); ValueError for a
  pair that cannot train."""
  name = generated.name_of(dataset or "")
  holds = generated.PIXELS.get(name, "image")
  if holds == "frames":
    if cfg.arch != "llava_onevision":
      raise ValueError(f"{dataset} holds videos, which need a llava_onevision model (e.g. "
                       f"configs/video_llava.py), but this model is {cfg.arch}.")
    return VIDEO
  if cfg.arch == "llava":
    return IMAGE
  if name == "synthetic":
    raise ValueError(f"the synthetic data set holds one S x S image a sequence, for llava "
                     f"models; train this {cfg.arch} model on images of any size (e.g. "
                     "tile_vqa) or videos (video_vqa).")
  return ANYRES


def check_generated(dataset: str, cfg: LlavaConfig):
  """ValueError if one of the project's own data sets was not made for this model's
  tower: glyph_vqa's 96 px images for a CLIP tower of 96 px, tile_vqa's images for
  anyres crops of its tile size at its pinpoints, video_vqa's frames for a tower of their
  size (`input_kind` has already matched the arch)."""
  name, v = generated.name_of(dataset), cfg.vision
  if name == "glyph_vqa":
    if (glyphs.IMAGE_SIZE, "clip") != (v.image_size, v.kind):
      raise ValueError(f"{dataset} holds {glyphs.IMAGE_SIZE} px images for a CLIP-style "
                       f"tower, but the model's {v.kind} tower takes {v.image_size} px; "
                       "train on it a model made for it (configs/glyph_llava.py).")
    return
  module = generated.module(dataset)
  if name == "tile_vqa":
    made_for = (module.TILE, set(module.PINPOINTS))
    if cfg.arch == "llava" or (v.image_size, set(cfg.image_grid_pinpoints)) != made_for:
      model = ("one crop a sequence" if cfg.arch == "llava" else
               f"{v.image_size} px crops at pinpoints {list(cfg.image_grid_pinpoints)}")
      raise ValueError(f"{dataset} holds images for anyres crops of {module.TILE} px at "
                       f"pinpoints {list(module.PINPOINTS)}, but the model takes {model}; "
                       "train on it a model made for it (configs/tile_llava.py).")
  elif v.image_size != module.FRAME:
    raise ValueError(f"{dataset} holds frames of {module.FRAME} px, but the model's tower "
                     f"takes {v.image_size} px; train on it a model made for it "
                     "(configs/video_llava.py).")


def training_bucket(spec: anyres.AnyresSpec) -> anyres.Bucket:
  """The crops and visual slots every anyres training sequence is padded to: the most
  of any bucket of the spec's pinpoints (`anyres.crop_buckets`), so any image fits."""
  buckets = anyres.crop_buckets(spec)
  return anyres.Bucket(max(b.num_crops for b in buckets), max(b.capacity for b in buckets))


def packing(cfg: LlavaConfig, kind: str, num_frames: int):
  """The plan's input bucket (`methods.base.make_plan`'s packing) of the training
  batches of `kind`; None for one image a sequence."""
  if kind == IMAGE:
    return None
  grid = batching.spec_for(cfg).grid
  if kind == VIDEO:
    return llava_onevision.Packing(num_frames, grid)
  bucket = training_bucket(batching.spec_for(cfg))
  return llava_next.Packing(bucket.num_crops, bucket.capacity, grid)


def num_slots(cfg: LlavaConfig, kind: str, num_frames: int) -> int:
  """Visual slots of a sequence of `kind` with no reduction (a plan's `num_visual`)."""
  if kind == IMAGE:
    return cfg.num_image_tokens
  if kind == VIDEO:
    return video.video_token_count(num_frames, cfg.vision.grid)
  return training_bucket(batching.spec_for(cfg)).capacity


def anyres_arrays(image: np.ndarray, spec: anyres.AnyresSpec, bucket: anyres.Bucket
                  ) -> dict[str, np.ndarray]:
  """One image u8[H, W, 3] as its crops f32[P, S, S, 3] and layout [N, ...] (batch keys
  without the B), padded to `bucket`."""
  crops = anyres.anyres_crops(image, spec)
  layout = anyres.pad_layout(anyres.image_layout(image.shape[:2], spec), bucket.capacity)
  padded = np.zeros((bucket.num_crops,) + crops.shape[1:], np.float32)
  padded[:len(crops)] = crops
  return {"crops": padded, "layout_src": layout.src, "layout_weight": layout.weight,
          "layout_newline": layout.newline, "layout_valid": layout.valid}


def video_arrays(frames: np.ndarray, spec: anyres.AnyresSpec, num_frames: int
                 ) -> dict[str, np.ndarray]:
  """One video u8[F', H, W, 3] as frames f32[F, S, S, 3] and frame_valid bool[F],
  F = num_frames: a longer video sampled uniformly (`video.sample_frame_indices`), a
  shorter one padded."""
  frames = np.asarray(frames)
  if len(frames) > num_frames:
    frames = frames[video.sample_frame_indices(len(frames), num_frames)]
  pixels = video.video_pixels(frames, spec)
  padded = np.zeros((num_frames,) + pixels.shape[1:], np.float32)
  padded[:len(pixels)] = pixels
  return {"frames": padded, "frame_valid": np.arange(num_frames) < len(pixels)}


def model_input(batch: dict[str, Any]):
  """What `Llava.__call__` takes as pixel_values from a batch of any kind: the
  pixel_values array, or the `llava_next.Crops` / `llava_onevision.Frames` of its keys."""
  if "crops" in batch:
    return llava_next.Crops(batch["crops"], batch["layout_src"], batch["layout_weight"],
                            batch["layout_newline"], batch["layout_valid"])
  if "frames" in batch:
    return llava_onevision.Frames(batch["frames"], batch["frame_valid"])
  return batch["pixel_values"]


def kind_of(plan_packing) -> str:
  """The kind of the batches a plan with this input bucket (`Plan.packing`) takes."""
  if isinstance(plan_packing, llava_next.Packing):
    return ANYRES
  if isinstance(plan_packing, llava_onevision.Packing):
    return VIDEO
  return IMAGE
