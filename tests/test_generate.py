"""Generation: KV-cache decoding equals re-running the prompt, buckets bound compiles,
sampling and stopping behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import faults
from tests.testing import VISION_28
from tokred_jax.engine import generate
from tokred_jax.models import llava
from tokred_jax.models.config import LlavaConfig, TextConfig

CFG = LlavaConfig(
    vision=VISION_28,
    text=TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                    bos_token_id=1, eos_token_id=2),
    image_token_id=95, pad_token_id=0)


@pytest.fixture(scope="module")
def params():
  p = llava.init_params(CFG, jax.random.PRNGKey(0))
  # Larger weights than the init's so that logits separate tokens clearly.
  return jax.tree_util.tree_map(lambda a: a * 4 if a.ndim > 1 else a, p)


def batch_of(lengths, bucket, seed=0):
  """Left-padded prompts: `n` text tokens, then the image tokens, per sample."""
  rng = np.random.default_rng(seed)
  b = len(lengths)
  ids = np.zeros((b, bucket), np.int32)
  mask = np.zeros((b, bucket), bool)
  for i, n in enumerate(lengths):
    row = np.concatenate([rng.integers(3, 90, n), np.full(CFG.num_image_tokens, 95)])
    ids[i, bucket - len(row):] = row
    mask[i, bucket - len(row):] = True
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
  pixels = rng.normal(size=(b, 28, 28, 3)).astype(np.float32)
  return dict(input_ids=ids, attention_mask=mask, positions=pos, pixel_values=pixels)


def test_cached_decoding_equals_full_forward(params):
  batch = batch_of([3, 7], bucket=16)
  gen = generate.Generator(llava.Llava(CFG), generate.SamplingConfig(max_new_tokens=6),
                           eos_ids=())
  tokens = gen(params, batch)
  # Greedy tokens must be the argmax of a plain forward over prompt + tokens so far.
  ids = np.concatenate([batch["input_ids"], tokens], 1)
  mask = np.concatenate([batch["attention_mask"], np.ones_like(tokens, bool)], 1)
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
  logits = llava.Llava(CFG).apply({"params": params}, ids, batch["pixel_values"], mask, pos)
  expected = np.argmax(np.asarray(logits[:, 15:-1]), -1)
  np.testing.assert_array_equal(tokens, expected)


def test_prefill_compiles_once_per_bucket(params):
  buckets = (16, 32)
  gen = generate.Generator(llava.Llava(CFG), generate.SamplingConfig(max_new_tokens=2))
  for i, n in enumerate([1, 2, 3, 5, 6, 8, 12, 15, 18, 22]):
    bucket = min(b for b in buckets if b >= n + CFG.num_image_tokens)
    gen(params, batch_of([n, max(1, n - 1)], bucket, seed=i))
  assert gen.trace_counts["prefill"] == 2
  assert gen.trace_counts["decode"] == 2


def test_stops_at_eos_and_pads_after(params):
  batch = batch_of([4, 4], bucket=16)
  gen = generate.Generator(llava.Llava(CFG), generate.SamplingConfig(max_new_tokens=8),
                           eos_ids=())
  free = gen(params, batch)
  stop = int(free[0, 2])  # make the third token of sample 0 an end token
  gen_eos = generate.Generator(llava.Llava(CFG), generate.SamplingConfig(max_new_tokens=8),
                               pad_token_id=0, eos_ids=(stop,))
  out = gen_eos(params, batch)
  first = int(np.argmax(free[0] == stop))
  np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
  assert np.all(out[0, first + 1:] == 0)


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draws = np.array([generate.sample_token(logits, k, 1.0, 0.7, greedy=False)[0] for k in keys])
  # 0.5 + 0.3 reaches 0.7, so only tokens 0 and 1 may be drawn, in ratio ~5:3.
  assert set(draws.tolist()) == {0, 1}
  assert 0.5 < np.mean(draws == 0) < 0.75


def test_sampling_is_seeded(params):
  batch = batch_of([5, 2], bucket=16)
  gen = generate.Generator(llava.Llava(CFG),
                           generate.SamplingConfig(max_new_tokens=6, temperature=1.0))
  a = gen(params, batch, jax.random.PRNGKey(1))
  b = gen(params, batch, jax.random.PRNGKey(1))
  c = gen(params, batch, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                    dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_config(kwargs):
  with pytest.raises(ValueError) as e:
    generate.SamplingConfig(**kwargs)
  args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
  faults.record("SamplingConfig", f"SamplingConfig({args})", f"ValueError: {e.value}",
                before="compile")
