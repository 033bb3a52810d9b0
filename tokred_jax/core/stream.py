"""The LLM's token stream during prefill, and the slot selections stages make on it.

A `Stream` has one row per sample and a static length T; which slots hold a real token
is a mask, so every count that sets a shape is a Python int and every data-dependent
count is a traced value below it. Reductions inside the LLM are pure functions of it:
pick the visual slots to keep (`top_visual`), gather the stream down (`take`), move
dead slots to the front so a cut is a static slice (`front_load`, `cut`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tokred_jax.core import tokens


class Stream(NamedTuple):
  """The LLM's token stream during prefill, one row per sample, static length T.

  x: f32[B, T, D] hidden states; positions: i32[B, T] original position ids;
  valid: bool[B, T] real tokens (False: padding, empty capacity, pruned in fast mode);
  alive: bool[B, T] not pruned (reference mode masks instead of removing);
  visual: bool[B, T] visual tokens (text is never pruned);
  vslot: i32[B, T] the visual token's slot in the spliced TokenSet (-1 for text);
  index: i32[B, T] the token's index in the prompt as given.
  """
  x: jax.Array
  positions: jax.Array
  valid: jax.Array
  alive: jax.Array
  visual: jax.Array
  vslot: jax.Array
  index: jax.Array

  @property
  def keys_valid(self) -> jax.Array:
    return self.valid & self.alive

  @property
  def live_visual(self) -> jax.Array:
    return self.visual & self.keys_valid


def take(a: jax.Array, order: jax.Array) -> jax.Array:
  """a[b, order[b]] for every sample: a [B, T, ...], order i32[B, T'] -> [B, T', ...]."""
  return jnp.take_along_axis(a, order[(...,) + (None,) * (a.ndim - 2)], axis=1)


def take_all(arrays: Any, order: jax.Array) -> Any:
  """`take` on every array of a pytree (a Stream, a tuple of caches)."""
  return jax.tree_util.tree_map(lambda a: take(a, order), arrays)


def top_visual(stream: Stream, scores: jax.Array, capacity: int,
               count) -> tuple[jax.Array, jax.Array]:
  """The `capacity` visual slots to keep, and which of them hold a kept token.

  scores: f32[B, T] (higher is kept first; only live visual entries are read);
  capacity: static number of visual slots kept; count: i32[] or i32[B], how many live
  tokens to keep (<= capacity; the rest of the chosen slots are empty). Live visual
  tokens rank by score (ties: the lower slot), then dead or empty visual slots; text is
  never chosen. Returns (chosen bool[B, T]: `capacity` visual slots per sample, kept
  bool[B, T]: the live ones among the first `count`).
  """
  b, t = stream.visual.shape
  if not capacity:
    empty = jnp.zeros((b, t), bool)
    return empty, empty
  live = stream.live_visual
  key = jnp.where(live, scores.astype(jnp.float32), -1e30)
  index, ranked = tokens.topk_indices(key, stream.visual, capacity, count)
  rows = jnp.arange(b)[:, None]
  chosen = jnp.zeros((b, t), bool).at[rows, index].set(True)
  kept = jnp.zeros((b, t), bool).at[rows, index].set(ranked & take(live, index))
  return chosen, kept


def keep_chosen(stream: Stream, chosen: jax.Array, slots: int, capacity: int) -> jax.Array:
  """The order that gathers the text and the chosen visual slots, in original order.

  chosen: bool[B, T], `capacity` visual slots per sample (`top_visual`); slots: how many
  visual slots every sample has (static). Returns i32[B, T − slots + capacity].
  """
  t = stream.visual.shape[1]
  return jnp.argsort(stream.visual & ~chosen, axis=1, stable=True)[:, :t - slots + capacity]


def live_slots(stream: Stream, num_visual: int, live: jax.Array | None = None) -> jax.Array:
  """Which of the spliced TokenSet's `num_visual` slots are live visual tokens in the
  stream: bool[B, num_visual]. live: bool[B, T] (default: the stream's live visual)."""
  b = stream.vslot.shape[0]
  live = stream.live_visual if live is None else live
  return jnp.zeros((b, num_visual), bool).at[
      jnp.arange(b)[:, None], jnp.maximum(stream.vslot, 0)].max(live)


def front_load(stream: Stream, caches: Sequence[Any] = ()) -> tuple[Stream, tuple]:
  """Moves every visual slot holding no live token to the front, the rest keeping their
  order, so that cutting the stream to a smaller capacity is a static slice `[:, c:]`.

  caches: arrays [B, T, ...] aligned with the stream's slots (carried KV caches), which
  get the same permutation. Causality is by index among live tokens, whose order is
  unchanged, so no output depends on where dead slots sit.
  """
  removable = stream.visual & ~stream.keys_valid
  order = jnp.argsort(~removable, axis=1, stable=True)
  return take_all(stream, order), take_all(tuple(caches), order)


def cut(stream: Stream, caches: Sequence[Any], drop: int) -> tuple[Stream, tuple]:
  """The stream and aligned caches without their first `drop` slots (static)."""
  return (Stream(*(a[:, drop:] for a in stream)),
          jax.tree_util.tree_map(lambda a: a[:, drop:], tuple(caches)))
