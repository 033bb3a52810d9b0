"""MustDrop's stage functions: window merge, key set, dual-attention filter, KV trim."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import faults
from tokred_jax.core import tokens
from tokred_jax.engine import cost
from tokred_jax.methods import mustdrop
from tokred_jax.models import llava

# Jitted once for the module: eager dispatch op by op is what makes tests slow.
_merge = jax.jit(mustdrop.window_merge, static_argnames=("grid", "window"))
_scores = jax.jit(mustdrop.window_scores, static_argnames=("grid", "window"))
_cls = jax.jit(mustdrop.cls_attention)
_keys = jax.jit(mustdrop.key_tokens, static_argnames="ratio")
_stats = jax.jit(mustdrop.dual_attention_stats, static_argnames="text_capacity")
_drop = jax.jit(mustdrop.dual_attention_drop, static_argnames="text_capacity")
_keep = jax.jit(mustdrop.output_aware_keep, static_argnames="first_layers")


# --- Window merge -------------------------------------------------------------------

def reference_window_merge(x, grid, window, threshold):
  """The official algorithm for one fully valid image, in float64.

  Returns (features [n, D], sizes [n], sources [P]) of the n output tokens: merged
  windows by descending score (stable), then unmerged patches in raster order.
  """
  x = np.asarray(x, np.float64)
  g = grid // window
  wins = [[(wr * window + i) * grid + wc * window + j for i in range(window)
           for j in range(window)] for wr in range(g) for wc in range(g)]
  scores = []
  for members in wins:
    u = x[members] / np.linalg.norm(x[members], axis=1, keepdims=True)
    s = u @ u.T
    m = len(members)
    scores.append((s.sum() - np.trace(s)) / (m * (m - 1)))
  merged = [w for w in np.argsort(-np.asarray(scores), kind="stable")
            if scores[w] >= threshold]
  feats, sizes, sources = [], [], np.full(grid * grid, -1)
  for w in merged:
    sources[wins[w]] = len(feats)
    feats.append(x[wins[w]].mean(0))
    sizes.append(len(wins[w]))
  done = {p for w in merged for p in wins[w]}
  for p in range(grid * grid):
    if p not in done:
      sources[p] = len(feats)
      feats.append(x[p])
      sizes.append(1)
  return np.asarray(feats), np.asarray(sizes, np.float64), sources, np.asarray(scores)


def _graded_windows(rng, grid, window, noise, d=16):
  """One image whose window w is a shared vector plus noise[w]-scaled noise."""
  g = grid // window
  x = np.zeros((grid, grid, d))
  for w, scale in enumerate(noise):
    r, c = divmod(w, g)
    base = rng.normal(size=d)
    x[r * window:(r + 1) * window, c * window:(c + 1) * window] = (
        base + scale * rng.normal(size=(window, window, d)))
  return x.reshape(grid * grid, d).astype(np.float32)


def _row(ts, i):
  """Sample i of a TokenSet, as numpy arrays."""
  return tokens.TokenSet(*(np.asarray(a)[i] for a in ts))


def _check_against_reference(out, x, grid, window, threshold):
  feats, sizes, sources, _ = reference_window_merge(x, grid, window, threshold)
  n = len(feats)
  valid = np.asarray(out.valid)
  assert valid[:n].all() and not valid[n:].any()
  np.testing.assert_allclose(np.asarray(out.features)[:n], feats, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.features)[n:], 0.0)
  np.testing.assert_array_equal(np.asarray(out.sizes)[:n], sizes)
  np.testing.assert_array_equal(np.asarray(out.sources), sources)


def test_window_scores_match_pairwise_reference():
  rng = np.random.default_rng(0)
  x = np.stack([_graded_windows(rng, 6, 3, [0.1, 1.0, 3.0, 0.3]),
                _graded_windows(rng, 6, 3, [0.0, 0.5, 2.0, 10.0])])
  got = _scores(x, grid=6, window=3)
  assert got.shape == (2, 4)
  for i in range(2):
    np.testing.assert_allclose(got[i], reference_window_merge(x[i], 6, 3, 0.8)[3],
                               rtol=1e-5, atol=1e-6)


def test_identical_window_merges_into_its_mean_and_orthogonal_window_stays():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(36, 16)).astype(np.float32)
  members = [[(r * 6 + c) for r in range(3) for c in range(3)],        # window 0
             [(r * 6 + 3 + c) for r in range(3) for c in range(3)]]    # window 1
  x[members[0]] = rng.normal(size=16)
  x[members[1]] = 5 * np.eye(16)[:9]  # Mutually orthogonal: score 0.
  ts = tokens.from_features(jnp.asarray(x)[None])
  scores = np.asarray(_scores(ts.features, 6, 3))[0]
  np.testing.assert_allclose(scores[:2], [1.0, 0.0], atol=1e-6)
  assert scores[2:].max() < 0.8

  out = _merge(ts, grid=6)
  assert int(out.valid.sum()) == 1 + 27
  np.testing.assert_allclose(out.features[0, 0], x[members[0]].mean(0), rtol=1e-6)
  assert out.sizes[0, 0] == 9
  np.testing.assert_array_equal(out.sources[0, np.array(members[0])], 0)
  # Every other patch is a token of its own, in raster order, unchanged.
  rest = [p for p in range(36) if p not in members[0]]
  np.testing.assert_array_equal(out.sources[0, np.array(rest)], np.arange(1, 28))
  np.testing.assert_array_equal(out.features[0, 1:28], x[rest])
  np.testing.assert_array_equal(out.sizes[0, 1:28], 1.0)


def test_threshold_zero_merges_every_window_and_above_one_none():
  rng = np.random.default_rng(2)
  x = np.abs(rng.normal(size=(1, 36, 16))).astype(np.float32)  # cosines >= 0
  ts = tokens.from_features(jnp.asarray(x))
  every = _merge(ts, grid=6, threshold=0.0)
  assert int(every.valid.sum()) == 4
  np.testing.assert_array_equal(every.sizes[0, :4], 9.0)
  _check_against_reference(_row(every, 0), x[0], 6, 3, 0.0)
  none = _merge(ts, grid=6, threshold=1.001)
  for got, want in zip(none, ts):
    np.testing.assert_array_equal(got, want)


def test_window_merge_matches_official_order_per_sample():
  rng = np.random.default_rng(3)
  noise = [[0.1, 2.0, 0.05, 0.3, 5.0, 0.2, 0.01, 1.0, 0.15],  # several merge
           [3.0] * 9,                                           # none merges
           [0.01 * (9 - w) for w in range(9)]]                  # all merge
  x = np.stack([_graded_windows(rng, 9, 3, n) for n in noise] + [np.ones((81, 16))])
  out = _merge(tokens.from_features(jnp.asarray(x, jnp.float32)), grid=9)
  counts = np.asarray(out.valid.sum(1))
  assert counts[1] == 81 and counts[2] == counts[3] == 9 and 9 < counts[0] < 81
  for i in range(3):
    _check_against_reference(_row(out, i), x[i], 9, 3, 0.8)
  # Equal scores: the lower window first (the official topk leaves ties unspecified).
  np.testing.assert_array_equal(out.sources[3].reshape(3, 3, 3, 3).transpose(0, 2, 1, 3),
                                np.arange(9).reshape(3, 3, 1, 1).repeat(3, 2).repeat(3, 3))


def test_window_merge_works_with_window_two_and_traced_threshold():
  rng = np.random.default_rng(4)
  x = _graded_windows(rng, 4, 2, [0.0, 5.0, 0.1, 5.0])[None]
  ts = tokens.from_features(jnp.asarray(x))
  compiled = []
  for threshold in (0.8, 0.99):
    _check_against_reference(_row(_merge(ts, 4, 2, threshold), 0),
                             x[0], 4, 2, threshold)
    compiled.append(_merge._cache_size())
  assert compiled[0] == compiled[1]


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(fill=st.sampled_from([0.0, 1e4, -1e4, np.nan]), seed=st.integers(0, 99))
def test_window_with_an_invalid_member_never_merges_and_junk_is_ignored(fill, seed):
  rng = np.random.default_rng(seed)
  x = _graded_windows(rng, 6, 3, [0.0, 0.0, 3.0, 0.0])[None]
  ts = tokens.from_features(jnp.asarray(x))
  # Patch 4 (window 0) and patch 35 (window 3) are empty slots.
  valid = np.ones((1, 36), bool)
  valid[0, [4, 35]] = False
  sources = np.where(valid, np.arange(36), -1).astype(np.int32)
  junk = np.where(valid[..., None], x, np.float32(fill))
  ts = ts._replace(features=jnp.asarray(junk), valid=jnp.asarray(valid),
                   sizes=jnp.asarray(valid, jnp.float32), sources=jnp.asarray(sources))
  out = _merge(ts, grid=6)
  # Only window 1 merges; windows 0 and 3 lose their empty slot and keep the rest.
  assert int(out.valid.sum()) == 1 + 34 - 9
  assert out.sizes[0, 0] == 9 and np.isfinite(np.asarray(out.features)).all()
  np.testing.assert_array_equal(out.sources[0, [4, 35]], -1)
  clean = _merge(ts._replace(features=jnp.asarray(
      np.where(valid[..., None], x, 0.0))), grid=6)
  for got, want in zip(out, clean):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n,grid,window,match", [
    (36, 6, 4, "does not divide"), (35, 6, 3, "6x6 grid has 36"), (36, 6, 1, ">= 2")])
def test_window_merge_rejects_bad_geometry(n, grid, window, match):
  ts = tokens.from_features(jnp.zeros((1, n, 4)))
  with pytest.raises(ValueError, match=match):
    _merge(ts, grid=grid, window=window)


# --- Key set ------------------------------------------------------------------------

def test_cls_attention_matches_reference_row():
  rng = np.random.default_rng(5)
  q = rng.normal(size=(2, 3, 8)).astype(np.float32)
  k = rng.normal(size=(2, 10, 3, 8)).astype(np.float32)
  valid = np.ones((2, 10), bool)
  valid[1, 6:] = False
  k[1, 6:] = np.nan  # junk in empty slots
  got = np.asarray(_cls(q, k, valid))
  assert got.shape == (2, 3, 10)
  for b in range(2):
    for h in range(3):
      z = k[b, valid[b], h].astype(np.float64) @ q[b, h] / np.sqrt(8)
      e = np.exp(z - z.max())
      np.testing.assert_allclose(got[b, h, valid[b]], e / e.sum(), rtol=1e-5)
  np.testing.assert_array_equal(got[1, :, 6:], 0.0)


def test_key_tokens_pick_top_ceil_ratio_of_each_samples_valid_count():
  rng = np.random.default_rng(6)
  n = 30
  attn = rng.uniform(size=(3, 4, n)).astype(np.float32)
  valid = np.ones((3, n), bool)
  valid[1, 25:] = False                      # 25 valid: ceil(2.0) = 2
  valid[2, rng.permutation(n)[:17]] = False  # 13 valid, scattered: ceil(1.04) = 2
  attn[1, :, 25:] = 1.0                      # invalid slots score high: never picked
  got = np.asarray(_keys(attn, valid))
  for b, count in enumerate([3, 2, 2]):
    score = np.where(valid[b], attn[b].mean(0), -np.inf)
    want = np.zeros(n, bool)
    want[np.argsort(-score, kind="stable")[:count]] = True
    np.testing.assert_array_equal(got[b], want)


def test_key_count_is_the_official_ceiling():
  attn = jnp.ones((1, 1, 576))
  assert int(_keys(attn, jnp.ones((1, 576), bool)).sum()) == 47


def test_key_tokens_traced_valid_counts_do_not_recompile():
  attn = jnp.asarray(np.random.default_rng(7).uniform(size=(2, 2, 40)), jnp.float32)
  compiled = []
  for count in (40, 31, 7):
    valid = jnp.arange(40)[None] < jnp.asarray([[count], [40 - count // 2]])
    assert int(_keys(attn, valid)[0].sum()) == -(-count * 8 // 100)
    compiled.append(_keys._cache_size())
  assert compiled[0] == compiled[-1]


# --- Dual-attention filter ----------------------------------------------------------

def reference_stats(q, k, text_query, visual_alive, key_valid):
  """Full causal T×T softmax per head (valid keys), head mean, then the text × visual
  block: g = column sums, m = column maxima. Float64, one sample at a time."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, num_heads, head_dim = q.shape
  groups = num_heads // k.shape[2]
  g, m = np.zeros((b, t)), np.zeros((b, t))
  for i in range(b):
    probs = np.zeros((num_heads, t, t))
    for h in range(num_heads):
      z = q[i, :, h] @ k[i, :, h // groups].T / np.sqrt(head_dim)
      visible = np.tril(np.ones((t, t), bool)) & key_valid[i][None]
      z = np.where(visible, z, -np.inf)
      mx = np.max(z, axis=1, keepdims=True)
      e = np.where(visible, np.exp(z - np.where(np.isfinite(mx), mx, 0)), 0.0)
      probs[h] = e / np.maximum(e.sum(1, keepdims=True), 1e-300)
    block = probs.mean(0)[np.ix_(text_query[i], visual_alive[i] & key_valid[i])]
    if block.size:
      g[i, visual_alive[i] & key_valid[i]] = block.sum(0)
      m[i, visual_alive[i] & key_valid[i]] = block.max(0)
  return g, m


def _stream_masks():
  """T = 16 slots, 3 rows: [2 system | 8 visual | 6 text] plain; left-padded by 3
  (the last 3 text tokens cut); and plain with visual slots 3 and 6 already dropped."""
  t = 16
  valid = np.ones((3, t), bool)
  visual = np.zeros((3, t), bool)
  visual[:, 2:10] = True
  text = np.zeros((3, t), bool)
  text[:, 10:] = True
  valid[1, :3] = False
  visual[1] = np.roll(visual[1], 3)
  visual[1, :3] = False
  text[1] = np.roll(text[1], 3)
  text[1, :3] = False
  alive = valid.copy()
  alive[2, [3, 6]] = False
  key_valid = valid & alive
  return text, visual & alive, key_valid


def _random_qk(seed, heads=4, kv_heads=2, head_dim=8, t=16, b=3):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, t, heads, head_dim)).astype(np.float32),
          rng.normal(size=(b, t, kv_heads, head_dim)).astype(np.float32))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("text_capacity", [None, 6])
def test_dual_stats_match_dense_reference(kv_heads, text_capacity):
  q, k = _random_qk(kv_heads, kv_heads=kv_heads)
  text, visual, key_valid = _stream_masks()
  g, m = _stats(q, k, text, visual, key_valid, text_capacity)
  want_g, want_m = reference_stats(q, k, text, visual, key_valid)
  np.testing.assert_allclose(g, want_g, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(m, want_m, rtol=2e-5, atol=1e-7)
  assert np.all(np.asarray(g)[~visual] == 0) and np.all(np.asarray(g)[visual] > 0)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16),
                  fill=st.sampled_from([0.0, 1e4, -1e4, np.nan]))
def test_dual_stats_ignore_invalid_slots_and_non_text_queries(seed, fill):
  q, k = _random_qk(seed)
  text, visual, key_valid = _stream_masks()
  want = _stats(q, k, text, visual, key_valid)
  q_junk = np.where(text[..., None, None], q, np.float32(fill))
  k_junk = np.where(key_valid[..., None, None], k, np.float32(fill))
  got = _stats(q_junk, k_junk, text, visual, key_valid)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def _ignored_token_inputs(ignored=5):
  """Row 0 of `_stream_masks`; every text query aligns with one direction u, and the
  key of visual token `ignored` points against it, so no text attends to it."""
  rng = np.random.default_rng(0)
  u = rng.normal(size=8)
  u /= np.linalg.norm(u)
  q = np.broadcast_to(2 * u, (1, 16, 4, 8)) + rng.normal(0, 0.1, (1, 16, 4, 8))
  k = rng.normal(0, 0.3, (1, 16, 2, 8))
  k[0, ignored] = -10 * u
  text, visual, key_valid = (a[:1] for a in _stream_masks())
  return q.astype(np.float32), k.astype(np.float32), text, visual, key_valid


def test_unattended_visual_token_is_dropped_unless_key():
  q, k, text, visual, key_valid = _ignored_token_inputs(ignored=5)
  no_keys = np.zeros_like(visual)
  compiled = []
  for gamma, alpha in mustdrop.PRESETS.values():
    keep = np.asarray(_drop(q, k, text, visual, key_valid, no_keys, gamma, alpha))
    compiled.append(_drop._cache_size())
    np.testing.assert_array_equal(keep, visual & (np.arange(16) != 5))
    key = no_keys.copy()
    key[0, 5] = True
    keep = np.asarray(_drop(q, k, text, visual, key_valid, key, gamma, alpha))
    np.testing.assert_array_equal(keep, visual)
  keep = _drop(q, k, text, visual, key_valid, no_keys, 0.0, 0.0)
  np.testing.assert_array_equal(keep, visual)
  assert compiled[0] == _drop._cache_size()  # thresholds are traced


def test_drop_needs_both_tests_to_fail():
  q, k, text, visual, key_valid = _ignored_token_inputs()
  g, m = (np.asarray(a) for a in
          _stats(q, k, text, visual, key_valid))
  no_keys = np.zeros_like(visual)
  big = float(m.max()) * 2
  # alpha above every m: the global test alone decides; gamma = 0 then keeps all.
  assert np.asarray(_drop(
      q, k, text, visual, key_valid, no_keys, 0.0, big)).sum() == visual.sum()
  gamma = float(np.sort(g[visual])[3] / g[visual].sum())  # 3 tokens strictly below
  keep = _drop(q, k, text, visual, key_valid, no_keys, gamma, big)
  np.testing.assert_array_equal(keep, visual & (g >= gamma * g[visual].sum()))
  # alpha = 0: nothing passes the individual test, so nothing is dropped.
  keep = _drop(q, k, text, visual, key_valid, no_keys, gamma, 0.0)
  np.testing.assert_array_equal(keep, visual)


# --- Decode-stage KV cache and positions --------------------------------------------

def test_output_aware_keep_reference_layout():
  t = 10
  live = np.ones((5, 2, t), bool)
  live[:, 1, 0] = False           # padding
  live[3:, :, [3, 5]] = False     # dropped after layer 2
  live[4:, 0, 4] = False          # dropped after layer 3
  keep = _keep(jnp.asarray(live), first_layers=2)
  assert len(keep) == 5
  for layer in range(5):
    np.testing.assert_array_equal(keep[layer], live[layer] if layer < 2 else live[4])


def test_output_aware_keep_fast_layout_matches_reference_layout():
  # Reference masks over 10 prompt slots. Fast mode: layers 2-3 hold 8 slots (the
  # bucket after dropping prompt tokens 2 and 7); layer 3 leaves token 4 empty in it.
  live = np.ones((4, 1, 10), bool)
  live[2:, 0, [2, 7]] = False
  live[3:, 0, 4] = False
  short = np.array([[0, 1, 3, 4, 5, 6, 8, 9]], np.int32)
  index = [np.arange(10, dtype=np.int32)[None]] * 2 + [short] * 2
  valid = [live[layer][np.zeros_like(i), i] for layer, i in enumerate(index)]
  fast = _keep(valid, index, first_layers=1)
  ref = _keep(jnp.asarray(live), first_layers=1)
  for layer in range(4):
    np.testing.assert_array_equal(np.asarray(ref[layer])[0, index[layer][0]],
                                  np.asarray(fast[layer])[0])
    assert int(fast[layer].sum()) == (10 if layer == 0 else 7)


def test_renumber_positions():
  valid = jnp.asarray([[False, False, True, True, False, True],
                       [True, False, True, False, False, True]])
  np.testing.assert_array_equal(mustdrop.renumber_positions(valid),
                                [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 2]])


# --- Equivalent tokens, both conventions --------------------------------------------

def test_equivalent_tokens_pre_and_post_filter():
  """Six layers, filters after layers 1 and 3: 90 tokens into layers 0-1, 40 survive
  layer 1's filter (into layers 2-3), 10 survive layer 3's (into layers 4-5). Counted
  as each layer ran: (90 + 90 + 40 + 40 + 10 + 10) / 6; as the official script does,
  each filter layer after its filter: (90 + 40 + 40 + 10 + 10 + 10) / 6."""
  ran = [90, 90, 40, 40, 10, 10]
  assert cost.equivalent_visual_tokens(ran) == pytest.approx(280 / 6)
  assert mustdrop.equivalent_tokens_official(ran, (1, 3)) == pytest.approx(200 / 6)
  assert mustdrop.equivalent_tokens_official(ran, ()) == pytest.approx(280 / 6)
  np.testing.assert_array_equal(mustdrop.post_filter_layers(6, (1, 3)), [0, 2, 2, 4, 4, 5])
  # Consecutive filters: each reads the next layer.
  assert mustdrop.equivalent_tokens_official([8, 6, 4, 2], (0, 1, 2)) == pytest.approx(
      (6 + 4 + 2 + 2) / 4)
  # The forward's aux (the filter stage's aux hook on the generic counts) computes the
  # same from the per-layer live masks.
  live = [np.arange(90)[None] < n for n in ran]
  stage = mustdrop.KeyFilterPlan(mustdrop.KEY_RATIO, (1, 3), gamma=0.0, alpha=0.0)
  plain = llava.visual_aux(np.zeros((1, 4), np.int32), live)
  aux = stage.aux(None, stage.traced(), plain)
  assert float(aux["equivalent_tokens"][0]) == pytest.approx(280 / 6)
  assert float(aux["equivalent_tokens_official"][0]) == pytest.approx(200 / 6)
  assert "equivalent_tokens_official" not in plain


def test_post_filter_count_needs_a_layer_after_the_filter():
  with pytest.raises(ValueError, match="outside") as e:
    mustdrop.equivalent_tokens_official([9, 5, 3], (2,))
  faults.record("mustdrop.equivalent_tokens_official", "a filter at the last layer",
                str(e.value), before="-")
