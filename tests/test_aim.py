"""AIM's PageRank scorer and pruning schedule.

The scorer is checked against a float64 numpy transcription of METHODS.md §1b (dense
per-head matrices, explicit loops), on hand-built graphs whose winner is known, and for
invariance to whatever sits in masked slots.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tokred_jax.methods import aim


def reference_pagerank(q, k, query_valid, key_valid, tau=0.1, iterations=5, damping=0.0):
  """METHODS.md §1b, one batch row and one head at a time, in float64."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, num_heads, head_dim = q.shape
  groups = num_heads // k.shape[2]
  scores = np.zeros((b, t))
  for i in range(b):
    n_valid = max(query_valid[i].sum(), 1)
    pis = []
    for h in range(num_heads):
      z = q[i, :, h] @ k[i, :, h // groups].T / np.sqrt(head_dim)
      m = np.zeros((t, t))
      for row in range(t):
        cols = [c for c in range(row + 1) if key_valid[i, c]]
        if query_valid[i, row] and cols:
          e = np.exp((z[row, cols] - z[row, cols].max()) / tau)
          m[row, cols] = e / e.sum()
      pi = query_valid[i] / n_valid
      for _ in range(iterations):
        pi = pi @ m * (1 - damping) + damping / n_valid
      pis.append(pi)
    scores[i] = np.sqrt(np.mean(np.square(pis), axis=0))
  return np.where(key_valid, scores, -np.inf)


def _random_qk(seed, b=3, t=12, heads=4, kv_heads=2, head_dim=8, scale=0.7):
  rng = np.random.default_rng(seed)
  q = rng.normal(0, scale, (b, t, heads, head_dim)).astype(np.float32)
  k = rng.normal(0, scale, (b, t, kv_heads, head_dim)).astype(np.float32)
  return q, k


def _masks(t=12):
  """Row 0 plain; row 1 left-padded by 3; row 2 padded by 1, 3 tokens pruned as keys only."""
  query_valid = np.ones((3, t), bool)
  query_valid[1, :3] = False
  query_valid[2, :1] = False
  key_valid = query_valid.copy()
  key_valid[2, [1, 4, 8]] = False  # Query 1 then sees no valid key at all.
  return query_valid, key_valid


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tau,iterations,damping", [(0.1, 5, 0.0), (1.0, 3, 0.15)])
def test_matches_reference(kv_heads, tau, iterations, damping):
  q, k = _random_qk(kv_heads, kv_heads=kv_heads)
  query_valid, key_valid = _masks()
  got = aim.pagerank_scores(q, k, query_valid, key_valid, tau=tau, iterations=iterations,
                            damping=damping)
  want = reference_pagerank(q, k, query_valid, key_valid, tau, iterations, damping)
  assert got.dtype == jnp.float32 and got.shape == (3, 12)
  np.testing.assert_array_equal(np.isneginf(got), ~key_valid)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_bfloat16_inputs_are_scored_in_float32():
  q, k = _random_qk(7)
  query_valid, key_valid = _masks()
  q16, k16 = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  got = aim.pagerank_scores(jnp.asarray(q16), jnp.asarray(k16), query_valid, key_valid)
  want = reference_pagerank(np.asarray(q16, np.float32), np.asarray(k16, np.float32),
                            query_valid, key_valid)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def _sink_inputs(t=14, sink=7, heads=4, kv_heads=2, head_dim=8):
  """2 system tokens, 8 visual (2..9), 4 text; every query aligns with the sink's key."""
  rng = np.random.default_rng(0)
  u = rng.normal(size=head_dim)
  u /= np.linalg.norm(u)
  q = np.broadcast_to(3 * u, (1, t, heads, head_dim)) + rng.normal(0, 0.1, (1, t, heads, head_dim))
  k = rng.normal(0, 0.3, (1, t, kv_heads, head_dim))
  k[0, sink] = 3 * u
  return q.astype(np.float32), k.astype(np.float32)


def test_token_every_query_attends_to_ranks_top():
  q, k = _sink_inputs()
  valid = np.ones((1, 14), bool)
  scores = np.asarray(aim.pagerank_scores(q, k, valid, valid))[0]
  visual = np.arange(2, 10)
  assert visual[np.argmax(scores[visual])] == 7
  assert np.argmax(scores) == 7  # It outranks the text tokens too.


def test_invalid_key_never_ranks_above_valid_ones():
  q, k = _sink_inputs()
  query_valid = np.ones((1, 14), bool)
  key_valid = query_valid.copy()
  key_valid[0, 7] = False  # The sink, pruned as a key but still a query.
  scores = np.asarray(aim.pagerank_scores(q, k, query_valid, key_valid))[0]
  assert scores[7] == -np.inf
  assert np.all(scores[key_valid[0]] >= 0)
  # Random inputs: every invalid key sits strictly below every valid one.
  q, k = _random_qk(3)
  query_valid, key_valid = _masks()
  scores = np.asarray(aim.pagerank_scores(q, k, query_valid, key_valid))
  for row, valid in zip(scores, key_valid):
    assert row[~valid].max(initial=-np.inf) < row[valid].min()


def test_no_valid_query_scores_zero():
  q, k = _random_qk(4, b=1)
  query_valid = np.zeros((1, 12), bool)
  key_valid = np.ones((1, 12), bool)
  key_valid[0, :2] = False
  scores = np.asarray(aim.pagerank_scores(q, k, query_valid, key_valid))
  np.testing.assert_array_equal(scores, np.where(key_valid, 0.0, -np.inf))


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16), fill=st.sampled_from([0.0, 1e4, -1e4, np.nan]),
                  pad=st.integers(0, 5), pruned=st.sets(st.integers(0, 11), max_size=4))
def test_invariant_to_contents_of_invalid_slots(seed, fill, pad, pruned):
  q, k = _random_qk(seed, b=1)
  query_valid = np.ones((1, 12), bool)
  query_valid[0, :pad] = False
  key_valid = query_valid.copy()
  key_valid[0, sorted(pruned)] = False
  scorer = jax.jit(aim.pagerank_scores)  # Compiled once for all examples: same shapes.
  base = scorer(q, k, query_valid, key_valid)
  rng = np.random.default_rng(seed + 1)
  q2, k2 = q.copy(), k.copy()
  q2[~query_valid] = fill + rng.normal(size=q2[~query_valid].shape)
  k2[~key_valid] = fill + rng.normal(size=k2[~key_valid].shape)
  np.testing.assert_allclose(scorer(q2, k2, query_valid, key_valid), base, rtol=1e-6, atol=0)


def test_jit_and_sharded_match_eager():
  q, k = _random_qk(5, b=4, heads=8, kv_heads=4)
  query_valid = np.ones((4, 12), bool)
  query_valid[1, :4] = False
  key_valid = query_valid.copy()
  key_valid[3, 5:7] = False
  eager = aim.pagerank_scores(q, k, query_valid, key_valid)
  scorer = jax.jit(functools.partial(aim.pagerank_scores, tau=0.2, iterations=4))
  np.testing.assert_allclose(scorer(q, k, query_valid, key_valid),
                             aim.pagerank_scores(q, k, query_valid, key_valid, tau=0.2,
                                                 iterations=4), rtol=1e-6)
  # Batch over 2 devices and heads over 4, as the model's attention is sharded.
  mesh = jax.make_mesh((2, 4), ("data", "tensor"))
  heads = NamedSharding(mesh, P("data", None, "tensor", None))
  rows = NamedSharding(mesh, P("data", None))
  sharded = jax.jit(aim.pagerank_scores)(jax.device_put(q, heads), jax.device_put(k, heads),
                                         jax.device_put(query_valid, rows),
                                         jax.device_put(key_valid, rows))
  np.testing.assert_allclose(sharded, eager, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"tau": 0.0}, "tau"), ({"iterations": -1}, "iterations"), ({"damping": 1.5}, "damping")])
def test_scorer_rejects_bad_settings(kwargs, match):
  q, k = _random_qk(0, b=1)
  valid = np.ones((1, 12), bool)
  with pytest.raises(ValueError, match=match):
    aim.pagerank_scores(q, k, valid, valid, **kwargs)
  with pytest.raises(ValueError, match="group evenly"):
    aim.pagerank_scores(q[:, :, :3], k, valid, valid)


def test_qwen2_schedule():
  ratios = aim.layer_ratios(28, *aim.SCHEDULE_QWEN2_28)
  assert ratios == (1.0,) * 15 + (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125) + (0.0,) * 6


def test_llama_schedule_and_kept_counts():
  ratios = aim.layer_ratios(32, *aim.SCHEDULE_LLAMA_32)
  assert ratios == (1.0,) * 14 + (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125) + (0.0,) * 11
  assert aim.kept_counts(576, ratios) == (
      (576,) * 14 + (504, 432, 360, 288, 216, 144, 72) + (0,) * 11)
  # After merging to 252 tokens the counts floor: 252 · 0.875 = 220.5 -> 220.
  assert aim.kept_counts(252, ratios)[14:21] == (220, 189, 157, 126, 94, 63, 31)
  assert aim.kept_counts(3, aim.layer_ratios(4, 0, 3)) == (3, 2, 1, 0)


def test_merge_presets():
  assert 576 - sum(aim.LLAVA15_MERGE_252) == 252
  assert 576 - sum(aim.LLAVA15_MERGE_72) == 72
  assert 196 - sum(aim.LLAVA_OV_VIDEO_MERGE_49) == 49


@pytest.mark.parametrize("num_layers,l1,l2", [
    (32, -1, 21), (32, 21, 21), (32, 22, 21), (32, 13, 33), (0, 0, 1)])
def test_schedule_rejects_bad_arguments(num_layers, l1, l2):
  with pytest.raises(ValueError, match="num_layers"):
    aim.layer_ratios(num_layers, l1, l2)


def test_kept_counts_rejects_bad_arguments():
  with pytest.raises(ValueError, match="num_visual"):
    aim.kept_counts(-1, (1.0,))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    aim.kept_counts(576, (1.0, 1.5))
