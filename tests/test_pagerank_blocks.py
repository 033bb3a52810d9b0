"""AIM's PageRank scorer walked by blocks of query rows: the same scores as the full
matrix and the float64 transcription of METHODS.md §1b, in a compiled program whose
scratch memory stays well below one f32[B, H, T, T] matrix.

Why the tolerances are not tighter: the full matrix and the blocks compute the logits
with matmuls of different shapes and sum π M_h in different orders, so the two float32
results differ by float32 rounding (about 1e-6 of the largest logit, times 1/τ = 10); at
T = 2,048 the full matrix is itself 2.3e-6 (absolute) from float64, the blocks closer.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.test_aim import _random_qk, reference_pagerank
from tokred_jax.methods import aim
from tokred_jax.models import presets

T = 40


def _masks():
  """Row 0: two positions masked as queries only; row 1 left-padded by 3; row 2 padded
  by 1 and 5 tokens pruned as keys only (query 1 then sees no valid key at all)."""
  query_valid = np.ones((3, T), bool)
  query_valid[1, :3] = False
  query_valid[2, :1] = False
  key_valid = query_valid.copy()
  query_valid[0, [10, 25]] = False
  key_valid[2, [1, 4, 8, 17, 33]] = False
  return query_valid, key_valid


@pytest.fixture(scope="module")
def case():
  q, k = _random_qk(11, t=T, heads=4, kv_heads=2)
  query_valid, key_valid = _masks()
  full = np.asarray(aim.pagerank_scores(q, k, query_valid, key_valid, block_size=T))
  want = reference_pagerank(q, k, query_valid, key_valid)
  return q, k, query_valid, key_valid, full, want


@pytest.mark.parametrize("block_size", [1, 7, 8, 16, 39])
def test_blocks_match_full_matrix_and_reference(case, block_size):
  q, k, query_valid, key_valid, full, want = case
  got = np.asarray(aim.pagerank_scores(q, k, query_valid, key_valid, block_size=block_size))
  assert got.dtype == np.float32 and got.shape == (3, T)
  np.testing.assert_array_equal(np.isneginf(got), ~key_valid)
  np.testing.assert_array_equal(np.isneginf(full), ~key_valid)
  assert got[2, 1] == -np.inf and np.all(got[key_valid] >= 0)
  assert np.abs(got[key_valid] - full[key_valid]).max() <= 1e-6
  np.testing.assert_allclose(got[key_valid], full[key_valid], rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_blocks_with_damping_and_one_kv_head():
  q, k = _random_qk(12, t=T, heads=4, kv_heads=1)
  query_valid, key_valid = _masks()
  settings = dict(tau=1.0, iterations=3, damping=0.15)
  got = aim.pagerank_scores(q, k, query_valid, key_valid, block_size=9, **settings)
  want = reference_pagerank(q, k, query_valid, key_valid, **settings)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_blocks_ignore_contents_of_invalid_slots(case):
  q, k, query_valid, key_valid, full, _ = case
  q2, k2 = q.copy(), k.copy()
  q2[~query_valid], k2[~key_valid] = np.nan, 1e4
  got = aim.pagerank_scores(q2, k2, query_valid, key_valid, block_size=7)
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-9)


def test_blocks_jit_and_sharded_match_full():
  q, k = _random_qk(5, b=4, heads=8, kv_heads=4)
  query_valid = np.ones((4, 12), bool)
  query_valid[1, :4] = False
  key_valid = query_valid.copy()
  key_valid[3, 5:7] = False
  full = aim.pagerank_scores(q, k, query_valid, key_valid)
  mesh = jax.make_mesh((2, 4), ("data", "tensor"))
  heads = NamedSharding(mesh, P("data", None, "tensor", None))
  rows = NamedSharding(mesh, P("data", None))
  scorer = jax.jit(functools.partial(aim.pagerank_scores, block_size=5))
  sharded = scorer(jax.device_put(q, heads), jax.device_put(k, heads),
                   jax.device_put(query_valid, rows), jax.device_put(key_valid, rows))
  np.testing.assert_allclose(sharded, full, rtol=1e-5, atol=1e-9)


def test_auto_block_size():
  assert [aim.auto_block_size(t) for t in (1, 12, 1024)] == [1, 12, 1024]
  assert aim.auto_block_size(6300) == 488  # 13 blocks, 44 padded rows
  for t in (1025, 1500, 4096, 4097, 6300, 20000):
    size = aim.auto_block_size(t)
    blocks = -(-t // size)
    assert size % 8 == 0 and size <= aim.BLOCK_TARGET
    assert blocks == -(-t // aim.BLOCK_TARGET)  # as few blocks as the target allows


@pytest.mark.parametrize("t,heads,kv_heads,head_dim", [(4096, 4, 2, 16), (6300, 28, 4, 128)])
def test_blocked_program_holds_no_full_matrix(t, heads, kv_heads, head_dim):
  """Compiled, not run: XLA's buffer assignment of the whole program."""
  args = (jax.ShapeDtypeStruct((1, t, heads, head_dim), jnp.float32),
          jax.ShapeDtypeStruct((1, t, kv_heads, head_dim), jnp.float32),
          jax.ShapeDtypeStruct((1, t), jnp.bool_), jax.ShapeDtypeStruct((1, t), jnp.bool_))

  def temp_bytes(block_size):
    scorer = jax.jit(functools.partial(aim.pagerank_scores, block_size=block_size))
    return scorer.lower(*args).compile().memory_analysis().temp_size_in_bytes

  matrix = heads * t * t * 4
  assert temp_bytes(t) >= matrix  # the full path: logits and probabilities, 2x
  assert temp_bytes(None) < matrix / 3  # auto: blocks of 512 (4,096) or 488 (6,300)


@pytest.mark.parametrize("block_size", [0, -3, 2.5])
def test_rejects_bad_block_size(block_size):
  q, k = _random_qk(0, b=1)
  valid = np.ones((1, 12), bool)
  with pytest.raises(ValueError, match="block_size"):
    aim.pagerank_scores(q, k, valid, valid, block_size=block_size)


def _matmul_flops(jaxpr) -> int:
  """2·M·N·K of every dot_general the program runs, loops counted by their trip count
  (`fori_loop` with static bounds traces to a scan, whose length is known)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(
          np.prod([lhs[d] for d in contract]))
    elif eqn.primitive.name == "while":
      raise AssertionError("a while loop: its trip count is unknown")
    else:
      trips = eqn.params["length"] if eqn.primitive.name == "scan" else 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += trips * _matmul_flops(sub)
  return total


@pytest.mark.parametrize("t,iterations", [(100, 5), (1024, 5), (1025, 5), (6300, 5),
                                          (1500, 2), (2000, 0), (500, 0)])
def test_scorer_flops_count_what_the_program_computes(t, iterations):
  """Blocks recompute the logits in every iteration; the cost model says so. Counted on
  the traced program of the 7B's shapes (28 query heads over 4 KV heads)."""
  cfg = presets.get("llava-onevision-qwen2-7b-ov")
  text = cfg.text
  args = (jax.ShapeDtypeStruct((1, t, text.num_heads, text.head_dim), jnp.float32),
          jax.ShapeDtypeStruct((1, t, text.num_kv_heads, text.head_dim), jnp.float32),
          jax.ShapeDtypeStruct((1, t), jnp.bool_), jax.ShapeDtypeStruct((1, t), jnp.bool_))
  scorer = functools.partial(aim.pagerank_scores, iterations=iterations)
  traced = _matmul_flops(jax.make_jaxpr(scorer)(*args).jaxpr)
  plan = aim.PageRankPlan((), (), False, counts=(), ratios=(), iterations=iterations)
  assert plan.scorer_flops(cfg, t) == traced
  if iterations and t > aim.FULL_MATRIX_MAX_TOKENS:  # the logits, once per iteration
    rows = -(-t // aim.auto_block_size(t)) * aim.auto_block_size(t)
    assert traced > iterations * 2 * rows * t * text.num_heads * text.head_dim
