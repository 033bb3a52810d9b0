"""The token engine: merging, top-k, compaction, pooling and random subsets.

Inputs are hand-built so the right answer is known, plus a plain-NumPy rendering of
the official bipartite matching (ToMe / AIM) for random inputs. To keep compilation
cheap, every merge runs on one canonical shape: n <= 16 real tokens per sample are
placed in 16 slots, the rest being padding filled with junk (which also checks that
padding never matters), and r is always traced.
"""

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokred_jax.core import tokens as T

B, N, D, C = 2, 16, 4, 8  # merge inputs: features f32[B, N, D], metric f32[B, N, C]
JUNK = 3e4

_merge = jax.jit(T.bipartite_merge, static_argnames=("weighted", "protect_first"))
_merge_static = jax.jit(T.bipartite_merge_static,
                        static_argnames=("r", "weighted", "protect_first"))
_keep = jax.jit(T.keep_topk, static_argnames=("capacity",))
_keep_static = jax.jit(T.keep_topk, static_argnames=("capacity", "count"))
_compact = jax.jit(T.compact, static_argnames=("capacity",))
_gather = jax.jit(T.gather)
_random_keep = jax.jit(T.random_keep, static_argnames=("capacity",))
_pool = jax.jit(T.pool, static_argnames=("grid", "stride"))


def token_set(x, valid=None, sizes=None):
  """A TokenSet over numpy features f32[B, N, D], optionally with a mask and sizes."""
  ts = T.from_features(jnp.asarray(x, jnp.float32))
  if valid is not None:
    ts = ts._replace(valid=jnp.asarray(valid))
  if sizes is not None:
    ts = ts._replace(sizes=jnp.asarray(sizes, jnp.float32))
  return ts


def padded(a, fill=JUNK):
  """[B', n, ...] -> f32[B, N, ...]: samples repeated up to B, slots n.. set to fill."""
  a = np.asarray(a, np.float64)
  a = np.concatenate([a] * (B // a.shape[0]))
  if a.ndim == 3:  # channels up to C with zeros, which change no similarity
    a = np.pad(a, [(0, 0), (0, 0), (0, C - a.shape[2])])
  return np.pad(a, [(0, 0), (0, N - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                constant_values=fill)


def merge(x, metric, r, sizes=None, **flags):
  """Merges n real tokens (x: [B', n, <=D], metric: [B', n, <=C]) in 16 slots."""
  n = x.shape[1]
  valid = np.broadcast_to(np.arange(N) < n, (B, N))
  size = None if sizes is None else padded(sizes, fill=JUNK)
  ts = token_set(padded(x)[..., :D], valid, size)
  out = _merge(ts, jnp.asarray(padded(metric), jnp.float32), jnp.int32(r), **flags)
  return jax.tree.map(np.asarray, out)


def check(out, n, features, sizes, sources):
  """The merge kept len(sizes) tokens as a prefix, the rest is clean padding."""
  k = len(sizes)
  features = np.asarray(features)
  np.testing.assert_allclose(out.features[:, :k, :features.shape[-1]],
                             np.broadcast_to(features, (B,) + features.shape), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(out.valid, np.broadcast_to(np.arange(N) < k, (B, N)))
  np.testing.assert_allclose(out.sizes[:, :k], np.broadcast_to(sizes, (B, k)))
  np.testing.assert_array_equal(out.features[:, k:], 0)
  np.testing.assert_array_equal(out.sizes[:, k:], 0)
  np.testing.assert_array_equal(out.sources[:, :n], np.broadcast_to(sources, (B, n)))
  np.testing.assert_array_equal(out.sources[:, n:], -1)  # patches in padding slots


# ---------------------------------------------------------------- bipartite merging

def reference_merge(metric, x, sizes, r, weighted, protect_first):
  """The official algorithm for one all-valid sample, written out in NumPy.

  Returns (features, sizes, slot_map): the n - r output tokens and, for each input
  slot, the output slot that holds it.
  """
  k = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  scores = k[0::2] @ k[1::2].T
  if protect_first:
    scores[0] = -np.inf
  best, dst = scores.max(1), scores.argmax(1)
  edge = sorted(range(len(best)), key=lambda i: (-best[i], i))
  src, unm = edge[:r], edge[r:]
  if protect_first:
    unm = sorted(unm)
  w = sizes if weighted else np.ones_like(sizes)
  xa, xb, sa, sb, wa, wb = x[0::2], x[1::2], sizes[0::2], sizes[1::2], w[0::2], w[1::2]
  num, den, size_b = xb * wb[:, None], wb.copy(), sb.copy()
  for i in src:
    num[dst[i]] += wa[i] * xa[i]
    den[dst[i]] += wa[i]
    size_b[dst[i]] += sa[i]
  out = np.concatenate([xa[unm], num / den[:, None]])
  out_sizes = np.concatenate([sa[unm], size_b])
  slot_map = np.zeros(len(x), int)
  for i in range(len(xa)):
    slot_map[2 * i] = unm.index(i) if i in unm else len(unm) + dst[i]
  slot_map[1::2] = len(unm) + np.arange(len(xb))
  return out, out_sizes, slot_map


def controlled_metric():
  """A metric over 8 tokens with known matches: A slot 2i has s = c[i] with B m[i].

  B tokens are one-hot e_j; A token i is c_i e_{m_i} + sqrt(1 - c_i^2) e_{4+i}.
  """
  c, m = [0.9, 0.5, 0.99, 0.1], [2, 0, 2, 3]
  metric = np.zeros((8, 8))
  for j in range(4):
    metric[2 * j + 1, j] = 1
  for i in range(4):
    metric[2 * i, m[i]] = c[i]
    metric[2 * i, 4 + i] = np.sqrt(1 - c[i] ** 2)
  return metric[None]


def test_merge_official_order_and_plain_mean():
  x = np.random.default_rng(0).normal(size=(1, 8, D))
  out = merge(x, controlled_metric(), 2, weighted=False)
  # a2 (s=.99) and a0 (s=.9) merge into b2 (slot 5); unmerged a1, a3 by descending s.
  x0 = x[0]
  check(out, 8, [x0[2], x0[6], x0[1], x0[3], (x0[5] + x0[4] + x0[0]) / 3, x0[7]],
        [1, 1, 1, 1, 3, 1], [4, 2, 0, 3, 4, 4, 1, 5])


def test_merge_weighted_versus_plain_mean():
  x = np.random.default_rng(1).normal(size=(1, 8, D))
  sizes = np.array([[2., 1, 1, 1, 5, 3, 1, 1]])
  aim = merge(x, controlled_metric(), 2, sizes, weighted=False)
  tome = merge(x, controlled_metric(), 2, sizes, weighted=True)
  x0 = x[0]
  np.testing.assert_allclose(aim.features[:, 4], [(x0[5] + x0[4] + x0[0]) / 3] * B,
                             rtol=1e-5)
  np.testing.assert_allclose(tome.features[:, 4],
                             [(3 * x0[5] + 5 * x0[4] + 2 * x0[0]) / 10] * B, rtol=1e-5)
  for out in (aim, tome):  # Sizes add up either way.
    np.testing.assert_allclose(out.sizes[:, :6], [[1, 1, 1, 1, 10, 1]] * B)


def test_merge_duplicates_merge_first():
  rng = np.random.default_rng(2)
  x, metric = rng.normal(size=(B, N, D)), rng.normal(size=(B, N, C))
  for a in (x, metric):
    a[0, 5] = a[0, 2]  # A slot 2 and B slot 5 of sample 0 are the same token;
    a[1, 8] = a[1, 15]  # likewise A slot 8 and B slot 15 of sample 1.
  out = merge(x, metric, 1, weighted=False)
  for b, (src, dst) in enumerate([(2, 5), (8, 15)]):
    sources = out.sources[b]
    assert sources[src] == sources[dst] == 7 + dst // 2  # after the 7 unmerged A.
    assert len(set(sources)) == 15
    np.testing.assert_allclose(out.features[b, sources[dst]], x[b, dst], rtol=1e-6)
    assert out.sizes[b, sources[dst]] == 2


def test_merge_protect_first_keeps_slot_zero():
  x = np.random.default_rng(3).normal(size=(1, 8, D))
  out = merge(x, controlled_metric(), 2, weighted=True, protect_first=True)
  # a0 (slot 0) is protected, so a2 (into b2) and a1 (into b0) merge; the unmerged
  # A tokens keep slot order, as in ToMe.
  x0 = x[0]
  check(out, 8, [x0[0], x0[6], (x0[1] + x0[2]) / 2, x0[3], (x0[5] + x0[4]) / 2, x0[7]],
        [1, 1, 2, 1, 2, 1], [0, 2, 2, 3, 4, 4, 1, 5])


def test_merge_all_of_a_keeps_spatial_order():
  x = np.random.default_rng(4).normal(size=(1, 8, D))
  out = merge(x, controlled_metric(), 4, weighted=False)
  x0 = x[0]
  check(out, 8, [(x0[1] + x0[2]) / 2, x0[3], (x0[5] + x0[4] + x0[0]) / 3,
                 (x0[7] + x0[6]) / 2], [2, 1, 3, 2], [2, 0, 0, 1, 2, 2, 3, 3])


@pytest.mark.parametrize("n, r, weighted, protect_first",
                         [(16, 3, False, False), (11, 4, True, False),
                          (10, 4, True, True), (11, 6, False, False)])
def test_merge_matches_reference(n, r, weighted, protect_first):
  rng = np.random.default_rng(n + r)
  x, metric = rng.normal(size=(B, n, D)), rng.normal(size=(B, n, C))
  sizes = rng.integers(1, 4, size=(B, n)).astype(float)
  out = merge(x, metric, r, sizes, weighted=weighted, protect_first=protect_first)
  for b in range(B):
    want_x, want_s, slot_map = reference_merge(metric[b], x[b], sizes[b], r, weighted,
                                               protect_first)
    np.testing.assert_allclose(out.features[b, :n - r], want_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sizes[b, :n - r], want_s)
    np.testing.assert_array_equal(out.sources[b, :n], slot_map)
    assert not out.valid[b, n - r:].any() and out.valid[b, :n - r].all()


def test_static_r_returns_n_minus_r_slots():
  rng = np.random.default_rng(5)
  x, metric = rng.normal(size=(B, N, D)), rng.normal(size=(B, N, C))
  ts, metric_j = token_set(x), jnp.asarray(metric, jnp.float32)
  static = _merge_static(ts, metric_j, r=5, weighted=True)
  traced = _merge(ts, metric_j, jnp.int32(5), weighted=True)
  assert static.features.shape == (B, N - 5, D) and bool(static.valid.all())
  for a, b in zip(static, traced):
    np.testing.assert_array_equal(a, b[:, :N - 5] if a.shape != b.shape else b)


def test_chained_merges():
  # Patch p belongs to group p // 4; its metric is the group's one-hot vector.
  x = np.random.default_rng(6).normal(size=(1, N, D))
  groups = x[0].reshape(4, 4, D)
  for weighted in (False, True):
    out = merge(x, np.repeat(np.eye(4), 4, axis=0)[None], 8, weighted=weighted)
    # Within a group both A tokens (4k, 4k+2) match B slot 4k+1 (the lower slot wins
    # the tie), so B token 2k is the mean of patches 4k..4k+2, and 2k+1 is patch 4k+3.
    np.testing.assert_array_equal(out.sources[0], np.repeat(np.arange(8), [3, 1] * 4))
    np.testing.assert_allclose(out.sizes[0, :8], [3, 1] * 4)
    # The 8 merged tokens in their 16 slots feed the next step directly.
    metric = jnp.asarray(padded(np.repeat(np.eye(4), 2, axis=0)[None], 0), jnp.float32)
    out = jax.tree.map(np.asarray, _merge(T.TokenSet(*map(jnp.asarray, out)), metric,
                                          jnp.int32(4), weighted=weighted))
    if weighted:  # ToMe: the size-weighted chain is the mean over all four patches.
      want = groups.mean(1)
    else:  # AIM: a plain mean of (the mean of three) and the fourth.
      want = (groups[:, :3].mean(1) + groups[:, 3]) / 2
    check(out, N, want, [4] * 4, np.arange(N) // 4)


def test_merge_traced_r_compiles_once_and_clamps():
  x = np.random.default_rng(7).normal(size=(B, N, D))
  merge(x, x, 0, weighted=False)
  compiled = _merge._cache_size()
  counts = [merge(x, x, r, weighted=False).valid.sum(1) for r in (1, 3, 8, 20)]
  assert _merge._cache_size() == compiled
  np.testing.assert_array_equal(counts, [[15, 15], [13, 13], [8, 8], [8, 8]])  # 20 -> 8
  per_sample = _merge(token_set(x), jnp.asarray(x, jnp.float32), jnp.array([1, 3]),
                      weighted=False)
  np.testing.assert_array_equal(per_sample.valid.sum(1), [15, 13])


# ------------------------------------------------------- gather, top-k, compaction

def test_from_features():
  ts = T.from_features(jnp.zeros((2, 5, 3)))
  assert ts.valid.all() and (ts.sizes == 1).all()
  np.testing.assert_array_equal(ts.sources, [np.arange(5)] * 2)


def numbered(n=8):
  """f32[B, n, D] whose sample b, slot i holds the number b*n + i in every channel."""
  return np.repeat(np.arange(B * n, dtype=float).reshape(B, n, 1), D, axis=2)


def test_gather_reroutes_sources():
  valid = np.ones((B, 8), bool)
  valid[:, 5] = False
  index = jnp.array([[3, 1, 5, 0], [7, 6, 2, 4]])
  out = _gather(token_set(numbered(), valid), index, jnp.array([[True, False, True, True],
                                                                [True] * 4]))
  # Sample 0: slot 1 is taken into an invalid slot; slot 5 was invalid in the input.
  np.testing.assert_array_equal(out.features[..., 0], [[3, 0, 0, 0], [15, 14, 10, 12]])
  np.testing.assert_array_equal(out.valid, [[True, False, False, True], [True] * 4])
  np.testing.assert_array_equal(out.sizes, [[1, 0, 0, 1], [1] * 4])
  np.testing.assert_array_equal(out.sources, [[3, -1, -1, 0, -1, -1, -1, -1],
                                              [-1, -1, 2, -1, 3, -1, 1, 0]])


def test_compact_moves_valid_to_front():
  valid = np.array([[False, True, False, True, True, False, False, False],
                    [True, False, False, False, False, True, False, False]])
  out = _compact(token_set(numbered(), valid), capacity=4)
  np.testing.assert_array_equal(out.features[..., 0], [[1, 3, 4, 0], [8, 13, 0, 0]])
  np.testing.assert_array_equal(out.valid, [[True] * 3 + [False], [True] * 2 + [False] * 2])
  np.testing.assert_array_equal(out.sizes, out.valid)
  np.testing.assert_array_equal(out.sources, [[-1, 0, -1, 1, 2, -1, -1, -1],
                                              [0, -1, -1, -1, -1, 1, -1, -1]])
  index, kept = T.compact_indices(jnp.asarray(valid), 4)
  np.testing.assert_array_equal(np.where(kept, index, -1), [[1, 3, 4, -1], [0, 5, -1, -1]])


def test_keep_topk_known_scores():
  scores = jnp.array([[5, 1, 7, 7, 0, 9, 2, 3],    # tie 7/7: both kept, order by slot
                      [1, 2, 3, 4, 5, 6, 7, 8.]])
  valid = np.ones((B, 8), bool)
  valid[1, 7] = False  # the best score of sample 1 is padding: never kept.
  ts = token_set(numbered(), valid)
  out = _keep(ts, scores, capacity=4, count=jnp.int32(3))
  np.testing.assert_array_equal(out.features[..., 0], [[2, 3, 5, 0], [12, 13, 14, 0]])
  np.testing.assert_array_equal(out.valid, [[True, True, True, False]] * 2)
  np.testing.assert_array_equal(out.sources, [[-1, -1, 0, 1, -1, 2, -1, -1],
                                              [-1, -1, -1, -1, 0, 1, 2, -1]])
  index, kept = T.topk_indices(scores, jnp.asarray(valid), 4, 3)
  np.testing.assert_array_equal(np.where(kept, index, -1), [[2, 3, 5, -1], [4, 5, 6, -1]])
  # Ties go to the lower slot: of the two 7s only slot 2 survives a count of 2.
  out = _keep(ts, scores, capacity=4, count=jnp.int32(2))
  np.testing.assert_array_equal(out.features[0, :2, 0], [2, 5])


def test_keep_topk_traced_count_equals_static_without_recompiling():
  rng = np.random.default_rng(8)
  ts, scores = token_set(rng.normal(size=(B, 8, D))), jnp.asarray(rng.normal(size=(B, 8)))
  for count in (4, 1):
    dynamic = _keep(ts, scores, capacity=4, count=jnp.int32(count))
    static = _keep_static(ts, scores, capacity=4, count=count)
    for a, b in zip(dynamic, static):
      np.testing.assert_array_equal(a, b)
  # Jit wrappers of one function share a compile cache, so count after _keep_static.
  compiled = _keep._cache_size()
  for count in (0, 2, 3):
    out = _keep(ts, scores, capacity=4, count=jnp.int32(count))
    assert int(out.valid.sum()) == 2 * count
  assert _keep._cache_size() == compiled
  per_sample = _keep(ts, scores, capacity=4, count=jnp.array([2, 4], jnp.int32))
  np.testing.assert_array_equal(per_sample.valid.sum(1), [2, 4])


def test_random_keep_is_seeded_and_per_sample():
  ts = token_set(numbered())
  count = jnp.int32(3)
  a = _random_keep(ts, jax.random.key(0), capacity=4, count=count)
  b = _random_keep(ts, jax.random.key(0), capacity=4, count=count)
  c = _random_keep(ts, jax.random.key(1), capacity=4, count=count)
  np.testing.assert_array_equal(a.features, b.features)
  assert not np.array_equal(a.features, c.features)
  np.testing.assert_array_equal(a.valid.sum(1), [3, 3])
  kept = np.asarray(a.features[:, :3, 0]) % 8
  assert not np.array_equal(kept[0], kept[1])  # each sample draws its own subset
  assert (np.diff(kept, axis=1) > 0).all()  # original order


# ------------------------------------------------------------ pooling, bias, buckets

def test_pool_equals_reference():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(B, 4 * 6, D))
  ts = token_set(x, sizes=rng.integers(1, 3, size=(B, 24)))
  out = _pool(ts, grid=(4, 6), stride=2)
  pattern = "b (h s w t) ... -> b (h w) ..."
  np.testing.assert_allclose(out.features, einops.reduce(x, pattern, "mean", s=2, w=3, t=2),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out.sizes, einops.reduce(np.asarray(ts.sizes), pattern, "sum",
                                                      s=2, w=3, t=2))
  rows, cols = np.divmod(np.arange(24), 6)
  np.testing.assert_array_equal(out.sources, [(rows // 2) * 3 + cols // 2] * B)
  assert out.valid.all()


def test_proportional_attention_bias():
  sizes = jnp.array([[1., 4., 0.], [2., 1., 3.]])
  bias = T.proportional_attention_bias(sizes, jnp.array([[True] * 3, [True, False, True]]))
  np.testing.assert_allclose(bias[0, :2], [0, np.log(4)], rtol=1e-6)
  np.testing.assert_allclose(bias[1, [0, 2]], np.log([2, 3]), rtol=1e-6)
  assert bias[0, 2] < -1e29 and bias[1, 1] < -1e29
  assert np.isfinite(np.asarray(bias)).all()


def test_bucket_up():
  assert T.bucket_up(5, 8) == 8 and T.bucket_up(16, 8) == 16 and T.bucket_up(0, 8) == 8
  assert T.bucket_up(72, (64, 144, 576)) == 144 and T.bucket_up(64, (64, 144)) == 64
  with pytest.raises(ValueError, match="no bucket"):
    T.bucket_up(600, (64, 576))
  with pytest.raises(ValueError, match="increasing"):
    T.bucket_up(6, (8, 4))


def test_bad_static_arguments():
  ts = T.from_features(jnp.zeros((1, 8, 2)))
  with pytest.raises(ValueError, match="capacity"):
    T.keep_topk(ts, jnp.zeros((1, 8)), 0)
  with pytest.raises(ValueError, match="capacity"):
    T.compact(ts, 9)
  with pytest.raises(ValueError, match="count"):
    T.keep_topk(ts, jnp.zeros((1, 8)), 4, 5)
  with pytest.raises(ValueError, match="at most 4"):
    T.bipartite_merge(ts, ts.features, 5, weighted=False)
  with pytest.raises(ValueError, match="at most 3"):
    T.bipartite_merge(ts, ts.features, 4, weighted=False, protect_first=True)
  with pytest.raises(ValueError, match="Python int"):
    T.bipartite_merge_static(ts, ts.features, jnp.int32(2), weighted=False)
  with pytest.raises(ValueError, match="does not divide"):
    T.pool(ts, (2, 4), 3)
  with pytest.raises(ValueError, match="grid"):
    T.pool(ts, (3, 3), 1)


# -------------------------------------------------------------------- properties

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), r=st.integers(0, 8), weighted=st.booleans())
def test_outputs_ignore_invalid_slots(seed, r, weighted):
  rng = np.random.default_rng(seed)
  prefix = np.arange(N) < rng.integers(2, N + 1, size=(B, 1))  # merge needs a prefix
  # At most 4 valid tokens anywhere among 8 slots: what compact(capacity=4) may hold.
  scattered = np.stack([np.isin(np.arange(8), rng.permutation(8)[:rng.integers(5)])
                        for _ in range(B)])
  inputs = [rng.normal(size=s) for s in ((B, N, D), (B, N, C), (B, 8, D), (B, 8))]
  results = []
  for value in (np.nan, 7e5):
    def fill(a, valid):
      a = a.copy()
      a[~valid] = value
      return jnp.asarray(a, jnp.float32)

    merged = _merge(token_set(fill(inputs[0], prefix), prefix), fill(inputs[1], prefix),
                    jnp.int32(r), weighted=weighted)
    ts = token_set(fill(inputs[2], scattered), scattered)
    kept = _keep(ts, fill(inputs[3], scattered), capacity=4, count=jnp.int32(r))
    packed = _compact(ts, capacity=4)
    results.append([np.asarray(a) for out in (merged, kept, packed) for a in out])
  for first, second in zip(*results):
    np.testing.assert_array_equal(first, second)


def test_merging_per_frame_never_crosses_frames():
  """Two frames whose tokens are identical ACROSS frames but distinct within each:
  per-frame merging must pair tokens of the same frame only."""
  rng = np.random.default_rng(0)
  frame = rng.normal(size=(8, 6)).astype(np.float32)
  video = jnp.asarray(np.concatenate([frame, frame])[None])  # [1, 2 * 8, 6]
  ts = T.split_frames(T.from_features(video), frames=2)
  assert ts.features.shape == (2, 8, 6)
  merged = T.join_frames(
      T.bipartite_merge_static(ts, ts.features, 2, weighted=False), frames=2)
  sources = np.asarray(merged.sources[0])
  assert merged.features.shape == (1, 12, 6)
  assert (sources[:8] < 6).all() and (sources[8:] >= 6).all()
  np.testing.assert_allclose(merged.features[0, :6], merged.features[0, 6:], atol=1e-6)
