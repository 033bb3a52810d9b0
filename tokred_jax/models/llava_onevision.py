"""LLaVA-OneVision's video input: frames through the tower and projector, each frame's
g×g grid pooled bilinearly to ⌈g/2⌉² tokens (27² -> 14² = 196 for SigLIP-384), the
frames' tokens one after another and one image_newline after the whole video, as
`LlavaOnevisionModel.get_video_features` computes them.

OneVision images (anyres_max_9, multi-image) are anyres crops (models/llava_next.py).
Frame counts are padded to a bucket: empty frames are masked out of the sequence.
Per-frame stages (e.g. AIM's merge) act after the pooling, on B·F samples, so nothing
they do crosses frames.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tokred_jax.core import tokens
from tokred_jax.models.config import ConfigError

_HIGHEST = jax.lax.Precision.HIGHEST


class Frames(NamedTuple):
  """The videos of B prompts, padded to a frame bucket F.

  pixels: f32[B, F, S, S, C] the frames (unused ones at the end); valid: bool[B, F].
  """
  pixels: jax.Array
  valid: jax.Array


@dataclasses.dataclass(frozen=True)
class Packing:
  """The static shape of a `Frames` bucket, for planning: F frames of a g×g grid."""
  frames: int
  grid: int

  @property
  def crops(self) -> int:
    return self.frames

  def crop_bucket(self, bucket: int) -> int:
    """Per-frame counts stay exact: rounding each frame's up would waste F times as
    much as rounding the sequence."""
    del bucket
    return 1

  def after_projector(self, per_crop: tuple[int, int], full: int) -> tuple[int, int]:
    """Each frame's (exact, capacity) after the pooling that follows the projector."""
    if per_crop != (full, full):
      raise ConfigError("video frames are pooled on their whole patch grid after the "
                        "projector; a stage before it must leave the frames' tokens as "
                        "they are (act after the projector, or in the LLM).")
    n = pooled_grid(self.grid) ** 2
    return n, n

  def visual(self, per_crop: tuple[int, int], full: int) -> tuple[int, int]:
    """(exact, capacity) of the sequence when each frame keeps `per_crop`: every
    frame's tokens and one newline."""
    del full
    return tuple(self.frames * n + 1 for n in per_crop)


def packing(frames: Frames, grid: int) -> Packing:
  return Packing(frames.pixels.shape[1], grid)


def bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
  """i64[out, 2], f32[out, 2]: source rows and weights of torch's 1-D bilinear resize
  (align_corners=False, no antialiasing, which `jax.image.resize` would apply when
  downsampling), computed in float32 as torch's CPU kernel does: the source position
  scale · (i + 0.5) − 0.5 as one fused multiply-add (the product of two float32 values
  is exact in float64), else weights drift by up to 1e-5."""
  scale = np.float64(np.float32(size_in) / np.float32(size_out))
  centre = np.arange(size_out, dtype=np.float32) + np.float32(0.5)
  src = np.maximum((scale * centre.astype(np.float64) - 0.5).astype(np.float32), np.float32(0))
  low = np.floor(src).astype(np.int64)
  high = np.where(low < size_in - 1, low + 1, low)
  frac = np.clip(src - low.astype(np.float32), 0, 1).astype(np.float32)
  return np.stack([low, high], 1), np.stack([np.float32(1) - frac, frac], 1)


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """f32[size_out, size_in]: `bilinear_taps` as a resampling matrix."""
  rows, weights = bilinear_taps(size_in, size_out)
  m = np.zeros((size_out, size_in), np.float32)
  np.add.at(m, (np.arange(size_out)[:, None], rows), weights)
  return m


def pooled_grid(grid: int) -> int:
  """Tokens per side of a pooled frame: ⌈g/2⌉."""
  return math.ceil(grid / 2)


def pool(frame_tokens: tokens.TokenSet, grid: int) -> tokens.TokenSet:
  """features f32[B·F, g·g, D] -> a fresh TokenSet f32[B·F, ⌈g/2⌉², D], bilinear."""
  out = pooled_grid(grid)
  m = jnp.asarray(bilinear_matrix(grid, out))
  x = frame_tokens.features.reshape(-1, grid, grid, frame_tokens.features.shape[-1])
  x = jnp.einsum("ih,bhwd,jw->bijd", m, x.astype(jnp.float32), m, precision=_HIGHEST)
  x = x.reshape(x.shape[0], out * out, -1).astype(frame_tokens.features.dtype)
  return tokens.from_features(x)


def pack(frame_tokens: tokens.TokenSet, frames: Frames, newline: jax.Array
         ) -> tokens.TokenSet:
  """The visual sequence of each prompt: its frames' tokens, then one newline.

  frame_tokens: features f32[B·F, n, D] (each frame's valid tokens a prefix);
  newline: f32[D]. Returns a TokenSet over F·n + 1 slots, the empty frames' slots last."""
  b, f = frames.valid.shape
  ts = tokens.join_frames(frame_tokens, f)
  n = ts.valid.shape[1] // f
  valid = ts.valid & jnp.repeat(frames.valid, n, axis=1)
  x = jnp.where(valid[..., None], ts.features, jnp.zeros((), ts.features.dtype))
  x = jnp.concatenate([x, jnp.broadcast_to(newline.astype(x.dtype), (b, 1, x.shape[-1]))],
                      axis=1)
  valid = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)
  sizes = jnp.concatenate([jnp.where(valid[:, :-1], ts.sizes, 0.0), jnp.ones((b, 1))], axis=1)
  # Valid tokens first, as everywhere (tokens.py): the newline follows the last real frame.
  return tokens.compact(tokens.TokenSet(x, valid, sizes, ts.sources), x.shape[1])
