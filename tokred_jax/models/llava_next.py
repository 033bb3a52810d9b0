"""LLaVA-NeXT's anyres input: every image as crops (the base image, then its tiles), the
crops' visual tokens packed into one sequence as `LlavaNextModel.pack_image_features` does.

The tower and projector run on every crop of a batch at once (B·P crops); stages that
act per crop (tower, before and after the projector) see them as B·P samples. Packing
then follows a `Crops` layout the host computed from each image's size
(tokred_jax.io.anyres): which crop tokens each slot of the sequence reads, with what
weights (1 for the unpadded tile grid; OneVision's anyres_max_9 downsample is bilinear),
where the image_newline embeddings go, and which slots are empty capacity. Layouts of
every image size of one tile-grid bucket have the same shapes, so they share one program;
empty slots are masked, and the positions of later tokens close the gap.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tokred_jax.core import tokens


class Crops(NamedTuple):
  """The anyres images of B prompts, padded to a bucket (P crops, N visual slots).

  pixels: f32[B, P, S, S, C] each prompt's crops, image after image (base, then tiles
    row by row), unused crops at the end (their contents never reach the sequence).
  src: i32[B, N, 4] the crop patches each visual slot reads, as crop · g² + patch
    (a crop's g×g patch grid row-major); weight: f32[B, N, 4] their weights (unused
    entries 0); newline: bool[B, N] the slot holds the image_newline embedding;
  valid: bool[B, N] the slot holds a token (False: empty capacity).
  """
  pixels: jax.Array
  src: jax.Array
  weight: jax.Array
  newline: jax.Array
  valid: jax.Array


@dataclasses.dataclass(frozen=True)
class Packing:
  """The static shape of a `Crops` bucket, for planning: P crops of a g×g patch grid
  each, packed into N visual slots."""
  crops: int
  slots: int
  grid: int

  def crop_bucket(self, bucket: int) -> int:
    return bucket

  def after_projector(self, per_crop: tuple[int, int], full: int) -> tuple[int, int]:
    del full
    return per_crop

  def visual(self, per_crop: tuple[int, int], full: int) -> tuple[int, int]:
    """(exact, capacity) of the packed sequence when each crop holds `per_crop` (exact,
    capacity) of its `full` tokens: the layout's N slots, or when a stage reduced the
    crops, at most what the crops still hold plus a newline per patch row."""
    if per_crop == (full, full):
      return self.slots, self.slots
    rows = self.crops * self.grid
    return tuple(min(self.slots, self.crops * n + rows) for n in per_crop)


def packing(crops: Crops, grid: int) -> Packing:
  return Packing(crops.pixels.shape[1], crops.valid.shape[1], grid)


def crop_pixels(pixels: jax.Array) -> jax.Array:
  """f32[B, P, S, S, C] -> f32[B·P, S, S, C]: the crops as one batch for the tower."""
  return pixels.reshape((-1,) + pixels.shape[2:])


def pack(crop_tokens: tokens.TokenSet, layout: Crops, newline: jax.Array,
         capacity: int | None = None) -> tokens.TokenSet:
  """The visual sequence of each prompt from its crops' tokens.

  crop_tokens: features f32[B·P, n, D], each crop's valid tokens a prefix, and its
  `sources` i32[B·P, g·g] (the slot holding each patch); newline: f32[D]. A slot reads
  the tokens holding the patches its layout names. When a stage reduced the crops, a
  token stands where the first patch it holds stands in the layout, and nowhere else,
  so the sequence keeps the spatial order of what is left. capacity: slots to compact
  the valid ones into (None: the layout's N).

  Returns a TokenSet over the slots (features f32[B, N, D]; sources i32[B, P·g·g], the
  slot holding each patch, -1 where none does)."""
  b, n_slots, _ = layout.src.shape
  n, d = crop_tokens.features.shape[1:]
  p = crop_tokens.sources.shape[0] // b
  # Each patch's token, as an index into its prompt's P·n crop tokens (-1: dropped).
  offset = n * (jnp.arange(b * p, dtype=jnp.int32) % p)[:, None]
  holder = jnp.where(crop_tokens.sources >= 0, crop_tokens.sources + offset, -1)
  one = functools.partial(_pack_one, newline=newline)
  ts = jax.vmap(one)(holder.reshape(b, -1), crop_tokens.features.reshape(b, -1, d),
                     layout.src, layout.weight, layout.newline, layout.valid)
  # Valid tokens first, as everywhere (tokens.py): a reduced crop leaves gaps.
  return tokens.compact(ts, n_slots if capacity is None else capacity)


def _pack_one(holder, features, src, weight, is_newline, valid, newline) -> tokens.TokenSet:
  """`pack` for one prompt (vmapped, so the batch axis stays a batching dimension of the
  gathers and scatters): holder i32[P·g²], features f32[P·n, D], the layout's rows
  src i32[N, 4], weight f32[N, 4], is_newline and valid bool[N]."""
  patches, num_tokens = holder.shape[0], features.shape[0]
  # The first patch each token holds, where it stands in the sequence.
  first = jnp.full(num_tokens, patches, jnp.int32).at[jnp.maximum(holder, 0)].min(
      jnp.where(holder >= 0, jnp.arange(patches, dtype=jnp.int32), patches))
  token = holder[src]  # [N, 4]
  read = features[jnp.maximum(token, 0)]  # [N, 4, D]
  # Elementwise in float32, not a matmul, so no platform lowers its precision.
  x = jnp.sum(weight[..., None].astype(read.dtype) * read, axis=1)
  x = jnp.where(is_newline[:, None], newline.astype(x.dtype), x)
  stands = (token[:, 0] >= 0) & (first[jnp.maximum(token[:, 0], 0)] == src[:, 0])
  valid = valid & (is_newline | stands)
  x = jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))
  slot = jnp.arange(src.shape[0], dtype=jnp.int32)
  placed = jnp.full(num_tokens, -1, jnp.int32).at[jnp.maximum(token[:, 0], 0)].max(
      jnp.where(valid & ~is_newline, slot, -1))
  sources = jnp.where(holder >= 0, placed[jnp.maximum(holder, 0)], -1)
  return tokens.TokenSet(x, valid, valid.astype(jnp.float32), sources)
