"""Reduced visual-token sets: fixed-shape arrays plus the metadata reduction needs.

A `TokenSet` always has a static length N (a capacity); which slots hold a real token
is the `valid` mask. Merging, pruning and compaction are pure functions from TokenSet
to TokenSet, so every count that sets a shape is a Python int known at trace time,
while the number of real tokens may be a traced value below it.

Layout. Every function here returns its valid tokens as a PREFIX of the slots,
followed by padding (except `gather`, where the caller chooses, and `pool`, which keeps
the grid); padding slots hold zeros in `features` and `sizes`, and no entry of
`sources` points at them. Outputs never depend on what an input stores in
its invalid slots. Since valid tokens stay a prefix, reductions chain without an
explicit `compact` in between.

Counts. A static count (a Python int) is checked before tracing and a bad one raises
ValueError. A traced count (i32[] or i32[B], one per sample) cannot be checked, so it
is clamped into the range the static shapes allow; changing it never recompiles.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class TokenSet(NamedTuple):
  """Visual tokens of B images (or frames), in their current order.

  features: f32[B, N, D]  the tokens.
  valid:    bool[B, N]    which slots hold a real token (False: empty capacity).
  sizes:    f32[B, N]     how many source patches each token stands for (1 unmerged).
  sources:  i32[B, P]     for each of the P source patches, the slot of the token that
                          holds it now, or -1 when it was dropped (for visualisation).
  """
  features: jax.Array
  valid: jax.Array
  sizes: jax.Array
  sources: jax.Array


# Finite rather than -inf, so that a softmax row whose keys are all padding gives
# uniform weights instead of NaN; exp() of it is exactly 0 in float32 and bfloat16.
_NEG = -1e30


def _static_int(x) -> int | None:
  """x as a Python int when it is a static integer, None when it is an array."""
  if isinstance(x, (bool, np.bool_)):
    raise TypeError(f"a count must be an integer, got {x!r}.")
  if isinstance(x, (int, np.integer)):
    return int(x)
  return None


def _batch_count(count, batch: int, upper) -> jax.Array:
  """A count (int, i32[] or i32[B]) as i32[B, 1], clamped into [0, upper]."""
  count = jnp.clip(jnp.asarray(count, jnp.int32), 0, upper)
  return jnp.broadcast_to(count, (batch,))[:, None]


def remap(sources: jax.Array, slot_map: jax.Array) -> jax.Array:
  """Follows each patch through a slot renumbering.

  sources: i32[B, P] old slots (-1: dropped); slot_map: i32[B, N] new slot of each old
  slot (-1: gone). Returns i32[B, P].
  """
  new = jnp.take_along_axis(slot_map, jnp.maximum(sources, 0), axis=1)
  return jnp.where(sources >= 0, new, -1)


def _scatter(x: jax.Array, index: jax.Array, updates: jax.Array, op: str) -> jax.Array:
  """x[b].at[index[b]].<op>(updates[b]) for every sample b.

  x: [B, M, ...]; index: i32[B, K]; updates: [B, K, ...]. Written per sample under vmap
  so the batch axis stays a batching dimension of the scatter, which the partitioner
  splits across a batch-sharded mesh without communication.
  """
  return jax.vmap(lambda a, i, u: getattr(a.at[i], op)(u))(x, index, updates)


def _finish(features, valid, sizes, sources) -> TokenSet:
  """Zeroes the padding slots so outputs never carry stale values."""
  features = jnp.where(valid[..., None], features, jnp.zeros((), features.dtype))
  sizes = jnp.where(valid, sizes, 0.0)
  return TokenSet(features, valid, sizes, sources)


def from_features(features: jax.Array) -> TokenSet:
  """An unreduced set: every slot valid, size 1, patch p in slot p.

  features: f32[B, N, D]. Returns a TokenSet with P = N.
  """
  b, n, _ = features.shape
  return TokenSet(
      features=features,
      valid=jnp.ones((b, n), bool),
      sizes=jnp.ones((b, n), jnp.float32),
      sources=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
  )


def gather(ts: TokenSet, index: jax.Array, valid: jax.Array) -> TokenSet:
  """Takes slots `index` of `ts`, in that order, into a new set of length M.

  index: i32[B, M] slots of `ts` (each valid slot taken at most once per sample);
  valid: bool[B, M] which of the new slots hold a token. A new slot is valid only if
  `valid` says so AND the slot it takes was valid. Patches whose token is not taken,
  or is taken into an invalid slot, get source -1. Unlike the other functions, the
  layout is the caller's: valid slots are wherever `index`/`valid` put them.
  """
  b, n = ts.valid.shape
  m = index.shape[1]
  index = index.astype(jnp.int32)
  valid = valid & jnp.take_along_axis(ts.valid, index, axis=1)
  features = jnp.take_along_axis(ts.features, index[..., None], axis=1)
  sizes = jnp.take_along_axis(ts.sizes, index, axis=1)
  # Inverse map old slot -> new slot. Slots not taken validly go to a spare column n,
  # which is dropped; .max makes the result well defined even for repeated indices.
  target = jnp.where(valid, index, n)
  slot_map = _scatter(jnp.full((b, n + 1), -1, jnp.int32), target,
                      jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m)), "max")
  return _finish(features, valid, sizes, remap(ts.sources, slot_map[:, :n]))


def _check_capacity(capacity: int, n: int) -> None:
  if _static_int(capacity) is None or not 1 <= capacity <= n:
    raise ValueError(f"capacity must be an int in [1, {n}] (the set's length); "
                     f"got {capacity!r}.")


def _check_count(count, capacity: int):
  """Validates a static count; returns the count to use (default: capacity)."""
  if count is None:
    return capacity
  c = _static_int(count)
  if c is not None and not 0 <= c <= capacity:
    raise ValueError(f"count must lie in [0, capacity={capacity}]; got {c}.")
  return count


def topk_indices(scores: jax.Array, valid: jax.Array, capacity: int,
                 count=None) -> tuple[jax.Array, jax.Array]:
  """Slots of the `count` highest-scoring valid tokens, in their original order.

  scores: f32[B, N]; valid: bool[B, N]; capacity: static output length (1..N);
  count: int, i32[] or i32[B] (default: capacity; a traced count is clamped into
  [0, capacity]). Ties go to the lower slot; invalid slots are never kept, so fewer
  than `count` are kept when fewer are valid.
  Returns (index i32[B, capacity], kept bool[B, capacity]): the kept slots first, in
  increasing slot order, then distinct slots that are not kept (kept False). Use the
  pair with `gather`, or to take other per-token arrays (e.g. position ids) along.
  """
  b, n = valid.shape
  _check_capacity(capacity, n)
  count = _batch_count(_check_count(count, capacity), b, capacity)
  iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  # Rank: valid before invalid, then by descending score; the slot number as last
  # key makes ties go to the lower slot without relying on sort stability.
  neg = -jnp.where(valid, scores.astype(jnp.float32), 0.0)
  _, _, ranked = jax.lax.sort(((~valid).astype(jnp.int32), neg, iota), num_keys=3)
  top = ranked[:, :capacity]
  kept = (jnp.arange(capacity) < count) & jnp.take_along_axis(valid, top, axis=1)
  # Back to original order, kept slots first.
  _, index, kept = jax.lax.sort(((~kept).astype(jnp.int32), top, kept), num_keys=2)
  return index, kept


def keep_topk(ts: TokenSet, scores: jax.Array, capacity: int, count=None) -> TokenSet:
  """Keeps the `count` highest-scoring valid tokens, in original order.

  scores: f32[B, N]. Returns a set of static length `capacity`: the kept tokens
  first, then padding. See `topk_indices` for `count` and ties.
  """
  return gather(ts, *topk_indices(scores, ts.valid, capacity, count))


def compact_indices(valid: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Slots of the valid tokens moved to the front, in their current order.

  valid: bool[B, N]; capacity: static output length (1..N). The caller guarantees
  that at most `capacity` slots are valid per sample; any beyond are cut off.
  Returns (index i32[B, capacity], kept bool[B, capacity]) as for `topk_indices`.
  """
  _check_capacity(capacity, valid.shape[1])
  index = jnp.argsort(~valid, axis=1, stable=True)[:, :capacity].astype(jnp.int32)
  return index, jnp.take_along_axis(valid, index, axis=1)


def compact(ts: TokenSet, capacity: int) -> TokenSet:
  """Moves valid tokens to the front (current order kept), length `capacity`.

  The caller guarantees at most `capacity` valid tokens per sample (e.g. from the
  plan that chose the capacity); extra ones would be dropped.
  """
  return gather(ts, *compact_indices(ts.valid, capacity))


def random_keep(ts: TokenSet, rng: jax.Array, capacity: int, count=None) -> TokenSet:
  """A uniformly random subset of `count` valid tokens, in original order.

  rng: a PRNG key; each sample draws its own subset. capacity/count as in
  `keep_topk`. The top-k of i.i.d. uniform scores is a uniform random subset.
  """
  scores = jax.random.uniform(rng, ts.valid.shape)
  return keep_topk(ts, scores, capacity, count)


def pool(ts: TokenSet, grid: tuple[int, int], stride: int) -> TokenSet:
  """s×s average pooling of a row-major h×w grid of tokens (LLaVA-OneVision, Gemma 3).

  The input must be the whole grid (N = h·w, all valid). Output: (h/s)·(w/s) tokens,
  row-major, each the plain mean of its window; sizes add up; a window with an
  invalid member gives an invalid token. grid: (h, w); stride: s, dividing h and w.
  """
  b, n, _ = ts.features.shape
  h, w = grid
  s = stride
  if _static_int(s) is None or s < 1:
    raise ValueError(f"stride must be a positive int; got {stride!r}.")
  if h * w != n:
    raise ValueError(f"grid {h}x{w} has {h * w} tokens but the set has {n}.")
  if h % s or w % s:
    raise ValueError(f"stride {s} does not divide the grid {h}x{w}.")
  ho, wo = h // s, w // s

  def windows(x):  # [B, h*w, ...] -> [B, ho*wo, s*s, ...]
    x = x.reshape(b, ho, s, wo, s, *x.shape[2:])
    x = jnp.moveaxis(x, 2, 3)
    return x.reshape(b, ho * wo, s * s, *x.shape[5:])

  features = windows(ts.features).astype(jnp.float32).mean(axis=2)
  sizes = windows(ts.sizes).sum(axis=2)
  valid = windows(ts.valid).all(axis=2)
  row, col = np.divmod(np.arange(n), w)
  slot_map = jnp.broadcast_to(jnp.asarray((row // s) * wo + col // s, jnp.int32), (b, n))
  slot_map = jnp.where(jnp.take_along_axis(valid, slot_map, 1), slot_map, -1)
  return _finish(features.astype(ts.features.dtype), valid, sizes,
                 remap(ts.sources, slot_map))


def proportional_attention_bias(sizes: jax.Array,
                                valid: jax.Array | None = None) -> jax.Array:
  """ToMe's proportional attention: log(size) added to the logits of each key.

  sizes: f32[B, N]; valid: optional bool[B, N] (padding from this module has size 0,
  which already counts as invalid). Returns f32[B, N]: log(sizes) for valid tokens, a
  large negative (-1e30, not -inf: see `_NEG`) for invalid ones.
  """
  ok = sizes > 0
  if valid is not None:
    ok &= valid
  return jnp.where(ok, jnp.log(jnp.where(ok, sizes, 1.0)), _NEG).astype(jnp.float32)


def _max_merge(n: int, protect_first: bool) -> int:
  """The most sources a set of length n can merge (A slots minus the protected one)."""
  if n < 2:
    return 0
  return (n + 1) // 2 - int(protect_first)


def bipartite_merge(ts: TokenSet, metric: jax.Array, r, *, weighted: bool,
                    protect_first: bool = False) -> TokenSet:
  """One step of bipartite soft matching (AIM before the LLM; ToMe inside the ViT).

  The input must be compact: its valid tokens a prefix of the slots (every function
  in this module keeps that). Slots split by index into A = even (sources) and
  B = odd (destinations). With cosine similarities S = Â Bᵀ of the metric rows, each
  valid a has a best match m(a) = argmax_b S (lower b on ties) among valid b, with
  score s(a) = max_b S. The r sources with the highest s(a) (lower a on ties) merge
  into their m(a); sizes add up and the destination becomes
    weighted=False (AIM):  the plain mean of itself and its sources;
    weighted=True  (ToMe): the size-weighted mean Σ size·x / Σ size.
  protect_first=True keeps slot 0 (ToMe's CLS token) from merging.

  Output (the official order): the unmerged A tokens by descending s(a), then all B
  tokens in order; then padding, so valid tokens stay a prefix (length N, valid count
  = valid input count − r). With protect_first the unmerged A tokens keep their
  relative order instead, as ToMe does (it sorts them so that CLS stays at slot 0).
  When every A token merges, spatial order survives. `sources` follow the tokens.

  ts: the set, features f32[B, N, D]; metric: f32[B, N, C] the similarity features
  (e.g. keys); r: a Python int (at most the number of A slots, minus the protected
  one; else ValueError) or a traced i32[] / i32[B], clamped to the number of valid
  sources that can merge. Returns a TokenSet of length N.

  To carry the metric to a chained step, merge it as a TokenSet of its own with the
  same arguments: the matching is recomputed identically.
  """
  b, n, _ = ts.features.shape
  r_static = _static_int(r)
  if r_static is not None and not 0 <= r_static <= _max_merge(n, protect_first):
    raise ValueError(f"r={r_static} is out of range: a set of {n} slots can merge at "
                     f"most {_max_merge(n, protect_first)} sources "
                     f"(protect_first={protect_first}).")
  na, nb = (n + 1) // 2, n // 2
  if nb == 0:  # A single slot has no destination.
    return _finish(ts.features, ts.valid, ts.sizes, ts.sources)
  valid = ts.valid
  va, vb = valid[:, 0::2], valid[:, 1::2]

  # Matching. Each similarity involves one row of each half only, so junk (even NaN)
  # in padding rows stays in padding rows and columns, which are masked out.
  k = metric.astype(jnp.float32)
  k = k * jax.lax.rsqrt(jnp.maximum(jnp.sum(k * k, -1, keepdims=True), 1e-30))
  sim = jnp.einsum("bic,bjc->bij", k[:, 0::2], k[:, 1::2],
                   precision=jax.lax.Precision.HIGHEST)
  sim = jnp.where(vb[:, None, :], sim, -jnp.inf)
  best = jnp.max(sim, axis=-1)                            # s(a): [B, na]
  dst = jnp.argmax(sim, axis=-1).astype(jnp.int32)        # m(a): [B, na]
  mergeable = va & (best > -jnp.inf)
  if protect_first:
    mergeable = mergeable.at[:, 0].set(False)
  r_eff = _batch_count(r, b, jnp.sum(mergeable, 1))     # [B, 1]

  # Rank sources: mergeable by descending s(a), then valid unmergeable, then padding.
  a_iota = jnp.broadcast_to(jnp.arange(na, dtype=jnp.int32), (b, na))
  group = jnp.where(mergeable, 0, jnp.where(va, 1, 2)).astype(jnp.int32)
  _, _, order = jax.lax.sort(
      (group, jnp.where(mergeable, -best, 0.0), a_iota), num_keys=3)
  rank = _scatter(jnp.zeros_like(order), order, a_iota, "set")
  merged = rank < r_eff
  if protect_first:
    # Same block structure (merged, unmerged, padding), unmerged in slot order.
    group = jnp.where(merged, 0, jnp.where(va, 1, 2)).astype(jnp.int32)
    _, order = jax.lax.sort((group, a_iota), num_keys=2)
    rank = _scatter(jnp.zeros_like(order), order, a_iota, "set")

  # Merge into the destinations. The spare row nb collects the sources that do not
  # merge (padding included), so their values reach no output token.
  feats, sizes = ts.features.astype(jnp.float32), ts.sizes.astype(jnp.float32)
  fa, fb = feats[:, 0::2], feats[:, 1::2]
  sa, sb = sizes[:, 0::2], sizes[:, 1::2]
  wa, wb = (sa, sb) if weighted else (jnp.ones_like(sa), jnp.ones_like(sb))
  target = jnp.where(merged, dst, nb)

  def into_b(own, add):  # own: [B, nb, ...], add: [B, na, ...] -> [B, nb, ...]
    spare = jnp.zeros((b, 1) + own.shape[2:], own.dtype)
    return _scatter(jnp.concatenate([own, spare], 1), target, add, "add")[:, :nb]

  num = into_b(wb[..., None] * fb, wa[..., None] * fa)
  den = into_b(wb, wa)
  fb = num / jnp.where(den > 0, den, 1.0)[..., None]
  sb = into_b(sb, sa)

  # Output slot j holds: unmerged A number j for j < u, then B number j - u.
  u = jnp.sum(va, 1, keepdims=True) - r_eff               # [B, 1]
  ub = u + jnp.sum(vb, 1, keepdims=True)
  j = jnp.arange(n, dtype=jnp.int32)[None]
  a_pick = jnp.take_along_axis(order, jnp.clip(r_eff + j, 0, na - 1), axis=1)
  pick = jnp.where(j < u, a_pick, jnp.clip(na + j - u, na, n - 1))
  out_valid = j < ub
  features = jnp.take_along_axis(jnp.concatenate([fa, fb], 1), pick[..., None], 1)
  out_sizes = jnp.take_along_axis(jnp.concatenate([sa, sb], 1), pick, 1)

  # Old slot -> new slot: merged sources follow their destination.
  map_a = jnp.where(merged, u + dst, rank - r_eff)
  map_a = jnp.where(va, map_a, -1)
  map_b = jnp.where(vb, u + jnp.arange(nb, dtype=jnp.int32), -1)
  slot_map = jnp.zeros((b, n), jnp.int32).at[:, 0::2].set(map_a).at[:, 1::2].set(map_b)
  return _finish(features.astype(ts.features.dtype), out_valid, out_sizes,
                 remap(ts.sources, slot_map))


def bipartite_merge_static(ts: TokenSet, metric: jax.Array, r: int, *, weighted: bool,
                           protect_first: bool = False) -> TokenSet:
  """`bipartite_merge` with a static r, returning exactly N − r slots.

  Valid tokens are a prefix of the merged set, so dropping the last r slots loses
  nothing (with a fully valid input, the result is fully valid).
  """
  if _static_int(r) is None:
    raise ValueError("bipartite_merge_static needs a Python int r; use "
                     "bipartite_merge for a traced one.")
  out = bipartite_merge(ts, metric, r, weighted=weighted, protect_first=protect_first)
  keep = ts.valid.shape[1] - int(r)
  return TokenSet(out.features[:, :keep], out.valid[:, :keep], out.sizes[:, :keep],
                  out.sources)


def split_frames(ts: TokenSet, frames: int) -> TokenSet:
  """[B, F·N] tokens of F video frames -> [B·F, N], one row per frame, so that merging
  and pruning never cross frames. `sources` must still be the identity-like per-frame
  layout (P = F·N_p) and becomes per-frame slots."""
  b, n = ts.valid.shape
  if n % frames or ts.sources.shape[1] % frames:
    raise ValueError(f"{n} tokens / {ts.sources.shape[1]} patches do not split into "
                     f"{frames} frames.")
  per, patches = n // frames, ts.sources.shape[1] // frames
  offset = (jnp.arange(frames, dtype=jnp.int32) * per)[None, :, None]
  sources = ts.sources.reshape(b, frames, patches)
  sources = jnp.where(sources >= 0, sources - offset, -1).reshape(b * frames, patches)
  rows = lambda a: a.reshape((b * frames, per) + a.shape[2:])
  return TokenSet(rows(ts.features), rows(ts.valid), rows(ts.sizes), sources)


def join_frames(ts: TokenSet, frames: int) -> TokenSet:
  """Inverse of `split_frames`: [B·F, N'] -> [B, F·N'] (frame by frame)."""
  bf, per = ts.valid.shape
  b = bf // frames
  offset = (jnp.arange(frames, dtype=jnp.int32) * per)[None, :, None]
  sources = ts.sources.reshape(b, frames, -1)
  sources = jnp.where(sources >= 0, sources + offset, -1).reshape(b, -1)
  rows = lambda a: a.reshape((b, frames * per) + a.shape[2:])
  return TokenSet(rows(ts.features), rows(ts.valid), rows(ts.sizes), sources)


def drop_first(ts: TokenSet) -> TokenSet:
  """The set without slot 0 (e.g. the CLS token, which stays in slot 0) and without its
  source: P shrinks by one, the other patches keep their slots minus one."""
  sources = ts.sources[:, 1:]
  return TokenSet(ts.features[:, 1:], ts.valid[:, 1:], ts.sizes[:, 1:],
                  jnp.where(sources > 0, sources - 1, -1))


def split_first(ts: TokenSet) -> tuple[jax.Array, TokenSet]:
  """(slot 0's features f32[B, 1, D], the other slots as a set of their own), so that a
  function of the rest (a merge) leaves slot 0 alone; `join_first` undoes it. The rest
  keeps all P sources; the first slot's patches read -1 in it."""
  sources = ts.sources
  rest = TokenSet(ts.features[:, 1:], ts.valid[:, 1:], ts.sizes[:, 1:],
                  jnp.where(sources > 0, sources - 1, -1))
  return ts.features[:, :1], rest


def join_first(first: jax.Array, rest: TokenSet, first_sources: jax.Array) -> TokenSet:
  """Slot 0 = `first` f32[B, 1, D] (valid, size 1) followed by `rest`; first_sources:
  bool[B, P] the patches slot 0 holds (those `split_first` took from it)."""
  b = first.shape[0]
  sources = jnp.where(first_sources, 0, jnp.where(rest.sources >= 0, rest.sources + 1, -1))
  return TokenSet(jnp.concatenate([first, rest.features.astype(first.dtype)], axis=1),
                  jnp.concatenate([jnp.ones((b, 1), bool), rest.valid], axis=1),
                  jnp.concatenate([jnp.ones((b, 1), rest.sizes.dtype), rest.sizes], axis=1),
                  sources)


def bucket_up(n: int, buckets: int | Sequence[int]) -> int:
  """The smallest allowed capacity >= n (and >= 1).

  buckets: an increasing tuple of allowed capacities, or an int m meaning "any
  positive multiple of m". Raises ValueError when no bucket is large enough.
  """
  n = max(int(n), 1)
  if isinstance(buckets, (int, np.integer)):
    if buckets < 1:
      raise ValueError(f"bucket multiple must be >= 1; got {buckets}.")
    return int(buckets) * math.ceil(n / int(buckets))
  buckets = tuple(int(x) for x in buckets)
  if list(buckets) != sorted(set(buckets)):
    raise ValueError(f"buckets must be strictly increasing; got {buckets}.")
  for cap in buckets:
    if cap >= n:
      return cap
  raise ValueError(f"no bucket holds {n} tokens; the largest is "
                   f"{buckets[-1] if buckets else None} (buckets={buckets}).")
