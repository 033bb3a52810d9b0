"""Sharding on 8 simulated CPU devices: the sharded forward equals the one-device one.

The tiny model has 4 query heads but 2 KV heads, so on a 4-way tensor axis k/v fall back
to replication while q, the MLP and the vocabulary are split.
"""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests import faults
from tests.testing import VISION_28
from tokred_jax.core import sharding
from tokred_jax.models import llava, presets
from tokred_jax.models.config import LlavaConfig, TextConfig

CFG = LlavaConfig(
    vision=VISION_28,
    text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16),
    image_token_id=255)
B, T = 8, 16
DATA_TENSOR = {"data": 2, "fsdp": 1, "tensor": 4}
FSDP = {"data": 1, "fsdp": -1, "tensor": 1}


@pytest.fixture(scope="module")
def params():
  # Random values in init_params' shapes: compiling the real initialiser costs seconds
  # on CPU, and parity needs only weights that give logits of order 1 (std ~1 here).
  shapes = jax.eval_shape(lambda r: llava.init_params(CFG, r), jax.random.key(0))
  rng = np.random.default_rng(0)

  def draw(x):
    std = 1.0 if x.ndim == 1 else x.shape[0] ** -0.5
    return jnp.asarray(rng.normal(0, std, x.shape), x.dtype)

  return jax.tree_util.tree_map(draw, shapes)


@pytest.fixture(scope="module")
def inputs():
  ids = jax.random.randint(jax.random.key(1), (B, T), 0, 250, jnp.int32)
  ids = ids.at[:, 2:2 + CFG.num_image_tokens].set(CFG.image_token_id)
  pixels = jax.random.normal(jax.random.key(2), (B, 28, 28, 3), jnp.float32)
  mask = jnp.ones((B, T), bool).at[0, :2].set(False)  # One left-padded row.
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return ids, pixels, mask, positions


@pytest.fixture(scope="module")
def reference(params, inputs):
  return np.asarray(jax.jit(llava.Llava(CFG).apply)({"params": params}, *inputs))


def _shard_shape(arr):
  return arr.sharding.shard_shape(arr.shape)


def test_make_mesh_fills_the_remaining_axis():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 4})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


@pytest.mark.parametrize("shape, message", [
    ({"data": 3, "fsdp": 1, "tensor": 2}, "needs 6 devices, but there are 8"),
    ({"data": -1, "tensor": 3}, "fixed axes .3 devices. do not divide the 8"),
    ({"data": -1, "tensor": -1}, "at most one -1"),
])
def test_make_mesh_rejects_shapes_that_do_not_fit_the_devices(shape, message):
  with pytest.raises(ValueError, match=message) as e:
    sharding.make_mesh(shape)
  faults.record("sharding.make_mesh", f"make_mesh({shape}) on 8 devices",
                f"ValueError: {e.value}", before="weights load")


def test_logical_axes_name_every_dimension(params):
  axes = sharding.logical_axes(params)
  flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  for names, arr in zip(flat_axes, jax.tree_util.tree_leaves(params)):
    assert len(names) == arr.ndim
  llm0, vit0 = axes["llm"]["layers_0"], axes["vision"]["layers_0"]
  assert llm0["attn"]["q"]["kernel"] == ("embed", "heads", "head_dim")
  assert llm0["attn"]["k"]["kernel"] == ("embed", "kv_heads", "head_dim")
  assert llm0["attn"]["o"]["kernel"] == ("heads", "head_dim", "embed")
  assert llm0["mlp"]["down"]["kernel"] == ("mlp", "embed")
  assert vit0["attn"]["k"]["kernel"] == ("embed", "heads", "head_dim")  # No GQA there.
  assert axes["llm"]["embed"]["embedding"] == ("vocab", "embed")
  assert axes["llm"]["lm_head"]["kernel"] == ("embed", "vocab")
  assert axes["vision"]["pre_ln"]["scale"] == ("norm",)


def test_a_parameter_without_a_pattern_is_an_error(params):
  extra = {**params, "router": {"kernel": jnp.zeros((4, 4))}}
  with pytest.raises(ValueError, match="no logical-axis pattern matches parameter "
                                       "router/kernel"):
    sharding.logical_axes(extra)


def test_indivisible_dimension_falls_back_for_that_parameter_only(params, caplog):
  mesh = sharding.make_mesh(DATA_TENSOR)
  with caplog.at_level(logging.DEBUG, logger="tokred_jax.core.sharding"):
    shardings = sharding.param_shardings(params, mesh)
  attn = shardings["llm"]["layers_0"]["attn"]
  assert attn["k"]["kernel"].spec == P("fsdp", None, None)
  assert attn["q"]["kernel"].spec == P("fsdp", "tensor", None)
  logged = {r.getMessage().split(":")[0] for r in caplog.records}
  assert logged == {f"llm/layers_{i}/attn/{n}/kernel" for i in range(2) for n in "kv"}


def test_rules_are_data_a_config_can_override():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  # Batch 2 keeps the part of ("data", "fsdp") that divides it.
  assert sharding.logical_to_spec(("batch",), mesh, shape=(2,)) == P("data")
  # A mesh axis shards one dimension only: the batch claims fsdp before embed does.
  assert sharding.logical_to_spec(sharding.STREAM, mesh) == P(("data", "fsdp"), None, None)
  no_fsdp = (("embed", None),) + sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("embed", "mlp"), mesh, no_fsdp) == P(None, "tensor")


def test_constrain_applies_only_inside_activation_sharding():
  x = jnp.ones((B, T, 4))
  assert sharding.constrain(x, sharding.STREAM) is x
  mesh = sharding.make_mesh(FSDP)

  def f(x):
    with sharding.activation_sharding(mesh):
      return sharding.constrain(x * 2, sharding.STREAM)

  assert _shard_shape(jax.jit(f)(x)) == (1, T, 4)


@pytest.mark.parametrize("mesh_shape, split", [(DATA_TENSOR, "tensor"), (FSDP, "fsdp")])
def test_sharded_forward_matches_one_device(params, inputs, reference, mesh_shape, split):
  mesh = sharding.make_mesh(mesh_shape)
  shardings = sharding.param_shardings(params, mesh)
  sharded = sharding.shard_params(params, mesh)
  layer = sharded["llm"]["layers_0"]
  gate = layer["mlp"]["gate"]["kernel"]
  q, k = layer["attn"]["q"]["kernel"], layer["attn"]["k"]["kernel"]
  t = CFG.text
  d, f, h, kv, hd = (t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads,
                     t.head_dim)
  if split == "tensor":
    assert _shard_shape(gate) == (d, f // 4)
    assert _shard_shape(q) == (d, h // 4, hd)
    assert _shard_shape(k) == (d, kv, hd)  # 2 KV heads: replicated over 4-way tensor.
  else:
    assert _shard_shape(gate) == (d // 8, f)
    assert _shard_shape(q) == (d // 8, h, hd)
    assert _shard_shape(k) == (d // 8, kv, hd)
  assert {s.data.shape for s in gate.addressable_shards} == {_shard_shape(gate)}
  assert len(gate.addressable_shards) == 8

  forward = sharding.sharded_apply(llava.Llava(CFG), mesh, sharding.DEFAULT_RULES,
                                   shardings)
  with jax.set_mesh(mesh):
    logits = forward(sharded, *inputs)
  expected = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
  assert logits.sharding.is_equivalent_to(expected, 3)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  assert _shard_shape(logits) == (B // batch_ways, T, t.vocab_size // mesh.shape["tensor"])
  np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def full_size_shapes():
  cfg = presets.get("llava-1.5-7b")
  return jax.eval_shape(lambda r: llava.init_params(cfg, r), jax.random.key(0))


@pytest.mark.parametrize("mesh_shape, ways", [(DATA_TENSOR, 4), (FSDP, 8)])
def test_full_size_model_is_split_without_fallbacks(full_size_shapes, mesh_shape, ways,
                                                    caplog):
  shapes = full_size_shapes
  with caplog.at_level(logging.DEBUG, logger="tokred_jax.core.sharding"):
    shardings = sharding.param_shardings(shapes, sharding.make_mesh(mesh_shape))
  assert not caplog.records
  total = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  per_device = sum(math.prod(s.shard_shape(x.shape)) for s, x in zip(
      jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(shapes)))
  # Only norms, biases and a few vision tensors stay whole on every device.
  assert per_device < 1.01 * total / ways
