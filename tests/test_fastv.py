"""FastV's last-token scorer and its one-cut schedule."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokred_jax.methods import fastv


def reference_last_token(q_last, k, key_valid):
  """METHODS.md §4, one batch row and head at a time, in float64."""
  q_last, k = np.asarray(q_last, np.float64), np.asarray(k, np.float64)
  b, num_heads, head_dim = q_last.shape
  groups = num_heads // k.shape[2]
  scores = np.full(key_valid.shape, -np.inf)
  for i in range(b):
    cols = np.flatnonzero(key_valid[i])
    if not len(cols):
      continue
    rows = []
    for h in range(num_heads):
      z = k[i, cols, h // groups] @ q_last[i, h] / np.sqrt(head_dim)
      e = np.exp(z - z.max())
      rows.append(e / e.sum())
    scores[i, cols] = np.mean(rows, axis=0)
  return scores


def _random_qk(seed, b=3, t=12, heads=4, kv_heads=2, head_dim=8):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, heads, head_dim)).astype(np.float32),
          rng.normal(size=(b, t, kv_heads, head_dim)).astype(np.float32))


def _key_valid(t=12):
  """Row 0 plain; row 1 left-padded by 3; row 2 no valid key at all."""
  valid = np.ones((3, t), bool)
  valid[1, :3] = False
  valid[2] = False
  return valid


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_reference(kv_heads):
  q, k = _random_qk(kv_heads, kv_heads=kv_heads)
  valid = _key_valid()
  got = fastv.last_token_scores(q, k, valid)
  assert got.dtype == jnp.float32 and got.shape == (3, 12)
  np.testing.assert_allclose(got, reference_last_token(q, k, valid), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got)[:2].sum(-1, where=valid[:2]), 1.0, rtol=1e-5)


def test_token_the_last_query_attends_to_ranks_top():
  rng = np.random.default_rng(0)
  u = rng.normal(size=8)
  u /= np.linalg.norm(u)
  q = np.broadcast_to(3 * u, (1, 4, 8)) + rng.normal(0, 0.1, (1, 4, 8))
  k = rng.normal(0, 0.3, (1, 14, 2, 8))
  k[0, 7] = 3 * u
  valid = np.ones((1, 14), bool)
  scores = np.asarray(fastv.last_token_scores(q, k, valid))[0]
  assert np.argmax(scores) == 7
  valid[0, 7] = False  # Masked as a key, the same token must rank last.
  scores = np.asarray(fastv.last_token_scores(q, k, valid))[0]
  assert scores[7] == -np.inf and np.all(scores[valid[0]] >= 0)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16), fill=st.sampled_from([0.0, 1e4, -1e4, np.nan]),
                  invalid=st.sets(st.integers(0, 11), max_size=6))
def test_invariant_to_contents_of_invalid_slots(seed, fill, invalid):
  q, k = _random_qk(seed, b=1)
  valid = np.ones((1, 12), bool)
  valid[0, sorted(invalid)] = False
  scorer = jax.jit(fastv.last_token_scores)  # Compiled once for all examples: same shapes.
  base = scorer(q, k, valid)
  k2 = k.copy()
  k2[~valid] = fill + np.random.default_rng(seed).normal(size=k2[~valid].shape)
  np.testing.assert_allclose(scorer(q, k2, valid), base, rtol=1e-6, atol=0)


def test_jit_matches_eager():
  q, k = _random_qk(1)
  valid = _key_valid()
  np.testing.assert_allclose(jax.jit(fastv.last_token_scores)(q, k, valid),
                             fastv.last_token_scores(q, k, valid), rtol=1e-6)
  with pytest.raises(ValueError, match="group evenly"):
    fastv.last_token_scores(q[:, :3], k, valid)


def test_schedule():
  assert fastv.layer_ratios(32) == (1.0, 1.0) + (0.5,) * 30
  assert fastv.layer_ratios(28, k=3, r=0.75) == (1.0,) * 3 + (0.25,) * 25
  assert fastv.layer_ratios(4, k=1, r=1.0) == (1.0, 0.0, 0.0, 0.0)
  assert fastv.layer_ratios(4, k=1, r=0.0) == (1.0,) * 4


@pytest.mark.parametrize("call,match", [
    (functools.partial(fastv.layer_ratios, 32, k=0), "k=0"),
    (functools.partial(fastv.layer_ratios, 32, k=32), "k=32"),
    (functools.partial(fastv.layer_ratios, 32, r=-0.1), "r"),
    (functools.partial(fastv.layer_ratios, 32, r=1.5), "r"),
    (functools.partial(fastv.layer_ratios, 1, k=1), "num_layers")])
def test_schedule_rejects_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
