"""The shared model layers against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokred_jax.models import layers
from tokred_jax.models.decoder import DecodeCache, LayerCache


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("t", [1, 3])
def test_attention_over_a_decode_cache_is_dot_product_attention(dtype, tol, t):
  """A decode step (query rows over a cache in DecodeCache's layout) takes its own path;
  it must give jax.nn.dot_product_attention's output, with grouped heads, masked slots
  and a row whose keys are all masked (uniform weights, not NaN)."""
  rng = np.random.default_rng(0)
  b, s, heads, kv, d = 3, 37, 8, 2, 16
  q = jnp.asarray(rng.normal(size=(b, t, heads, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)
  mask = rng.random((b, t, s)) > 0.3
  mask[2] = False
  got = layers.attend_cache(q, *DecodeCache.of(LayerCache(k, v)), jnp.asarray(mask))
  want = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32), mask=jnp.asarray(mask)[:, None])
  assert got.shape == q.shape and got.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol, rtol=tol)
  uniform = np.repeat(np.asarray(v, np.float32)[2].mean(0), heads // kv, axis=0)
  for row in range(t):
    np.testing.assert_allclose(np.asarray(got, np.float32)[2, row], uniform, atol=tol, rtol=tol)


def test_decode_cache_layout_round_trips():
  k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(2, 5, 3, 4)), jnp.float32)
          for i in range(2))
  cache = DecodeCache.of(LayerCache(k, v))
  assert cache.k.shape == (6, 4, 5) and cache.v.shape == (6, 5, 4)
  np.testing.assert_array_equal(cache.k[3 + 1], k[1, :, 1].T)  # sample 1, KV head 1
  back = cache.layer_cache(3)
  np.testing.assert_array_equal(back.k, k)
  np.testing.assert_array_equal(back.v, v)
