"""The shared model layers against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokred_jax.models import layers


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_one_query_row_attends_as_dot_product_attention(dtype, tol):
  """A decode step (one query row over a cache) takes its own fused path; it must give
  jax.nn.dot_product_attention's output, with grouped heads, masked slots and a row whose
  keys are all masked (uniform weights, not NaN)."""
  rng = np.random.default_rng(0)
  b, s, heads, kv, d = 3, 37, 8, 2, 16
  q = jnp.asarray(rng.normal(size=(b, 1, heads, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)
  mask = rng.random((b, 1, s)) > 0.3
  mask[2] = False
  got = layers.attend(q, k, v, jnp.asarray(mask))
  want = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32), mask=jnp.asarray(mask)[:, None])
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol, rtol=tol)
  uniform = np.repeat(np.asarray(v, np.float32)[2].mean(0), heads // kv, axis=0)
  np.testing.assert_allclose(np.asarray(got, np.float32)[2, 0], uniform, atol=tol, rtol=tol)
