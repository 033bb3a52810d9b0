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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tokred_jax.core import tokens


class Crops(NamedTuple):
  """The anyres images of B prompts, padded to a bucket (P crops, N visual slots).

  pixels: f32[B, P, S, S, C] each prompt's crops, image after image (base, then tiles
    row by row), unused crops at the end (their contents never reach the sequence).
  src: i32[B, N, 4] the crop tokens each visual slot reads, as crop · n + token (n
    tokens per crop after the projector); weight: f32[B, N, 4] their weights (unused
    entries 0); newline: bool[B, N] the slot holds the image_newline embedding;
  valid: bool[B, N] the slot holds a token (False: empty capacity).
  """
  pixels: jax.Array
  src: jax.Array
  weight: jax.Array
  newline: jax.Array
  valid: jax.Array


def crop_pixels(pixels: jax.Array) -> jax.Array:
  """f32[B, P, S, S, C] -> f32[B·P, S, S, C]: the crops as one batch for the tower."""
  return pixels.reshape((-1,) + pixels.shape[2:])


def pack(crop_tokens: tokens.TokenSet, layout: Crops, newline: jax.Array) -> tokens.TokenSet:
  """The visual sequence of each prompt from its crops' tokens.

  crop_tokens: features f32[B·P, n, D] (every crop's tokens, each crop's valid ones a
  prefix); newline: f32[D]. Returns a TokenSet over the N slots (features f32[B, N, D];
  sources i32[B, P·n]: the slot that reads each crop token with weight 1, else -1).
  A slot is valid where the layout says so and the token it reads first is valid.
  """
  b, n_slots, k = layout.src.shape
  features = crop_tokens.features.reshape(b, -1, crop_tokens.features.shape[-1])
  token_valid = crop_tokens.valid.reshape(b, -1)
  flat = layout.src.reshape(b, n_slots * k)
  read = jnp.take_along_axis(features, flat[..., None], axis=1).reshape(
      b, n_slots, k, features.shape[-1])
  # Elementwise in float32, not a matmul, so no platform lowers its precision.
  x = jnp.sum(layout.weight[..., None].astype(read.dtype) * read, axis=2)
  x = jnp.where(layout.newline[..., None], newline.astype(x.dtype), x)
  valid = layout.valid & (layout.newline | jnp.take_along_axis(
      token_valid, layout.src[..., 0], axis=1))
  x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
  whole = valid & ~layout.newline & (layout.weight[..., 0] == 1)
  slot = jnp.broadcast_to(jnp.arange(n_slots, dtype=jnp.int32), (b, n_slots))
  sources = jnp.full(token_valid.shape, -1, jnp.int32).at[
      jnp.arange(b)[:, None], layout.src[..., 0]].max(jnp.where(whole, slot, -1))
  return tokens.TokenSet(x, valid, valid.astype(jnp.float32), sources)
