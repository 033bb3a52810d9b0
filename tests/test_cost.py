"""Cost accounting: analytic FLOPs against XLA's cost analysis, KV bytes against the
cache arrays, the full-size preset against the published config and its parameter count.

Nothing here allocates model-sized memory: parameters are abstract (`jax.eval_shape`)
and programs are compiled, never run.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from tokred_jax.engine import cost
from tokred_jax.models import config, llava, presets

REPO = pathlib.Path(__file__).resolve().parents[1]
HF_CONFIG = pathlib.Path("/work/shared/reference/llava-1.5-7b-hf.config.json")

# Mid-size, so that matmuls dominate as they do at full size: a 20×20-patch image (400
# patches + CLS) through 2 of 3 tower layers, and 400 visual + 48 text tokens in the LLM.
MID = config.LlavaConfig(
    vision=config.VisionConfig(hidden_size=512, intermediate_size=2048, num_layers=3,
                               num_heads=8, image_size=280, patch_size=14),
    text=config.TextConfig(vocab_size=1024, hidden_size=512, intermediate_size=2048,
                           num_layers=2, num_heads=8, num_kv_heads=4, head_dim=64),
    image_token_id=1000)
TEXT_TOKENS = 48
BATCH = 2


def _abstract(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.fixture(scope="module")
def mid_params():
  return jax.eval_shape(lambda: llava.init_params(MID, jax.random.key(0)))


def _prompt(cfg, batch):
  """Abstract input_ids, pixel_values, attention_mask, positions for one image + text."""
  t = cfg.num_image_tokens + TEXT_TOKENS
  s = cfg.vision.image_size
  return (_abstract((batch, t), jnp.int32), _abstract((batch, s, s, 3)),
          _abstract((batch, t), jnp.bool_), _abstract((batch, t), jnp.int32))


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def _check_close(xla, analytic, what):
  """XLA's count may exceed the matmuls by its elementwise work, by at most 2%."""
  remainder = (xla - analytic) / xla
  assert 0 <= remainder < 0.02, (
      f"{what}: XLA {xla:.4g} vs analytic {analytic:.4g} FLOPs; non-matmul remainder "
      f"{100 * remainder:.2f}% of XLA's count")
  return remainder


def test_vision_tower_flops_match_xla(mid_params):
  apply = lambda p, px: llava.Llava(MID).apply({"params": p}, px,
                                              method=lambda m, x: m.vision(x))
  xla = _xla_flops(apply, mid_params, _prompt(MID, BATCH)[1])
  _check_close(xla, cost.vision_flops(MID, BATCH).total, "vision tower")


def test_llm_layer_stack_flops_match_xla(mid_params):
  t = MID.num_image_tokens + TEXT_TOKENS
  apply = lambda p, x, pos, mask: llava.Llava(MID).apply(
      {"params": p}, x, pos, mask, method=lambda m, *a: m.llm(*a)[0])
  xla = _xla_flops(apply, mid_params, _abstract((BATCH, t, 512)),
                   _abstract((BATCH, t), jnp.int32), _abstract((BATCH, t, t), jnp.bool_))
  _check_close(xla, cost.llm_flops(MID, t, batch=BATCH).total, "LLM layers")


def test_forward_flops_match_xla(mid_params):
  """A plain forward: all four stages, logits for every position."""
  args = _prompt(MID, BATCH)
  xla = _xla_flops(lambda p, *a: llava.Llava(MID).apply({"params": p}, *a), mid_params, *args)
  t = args[0].shape[1]
  analytic = cost.prefill_flops(MID, TEXT_TOKENS, batch=BATCH, logits_tokens=t)
  _check_close(xla, analytic.total, "forward")


def test_prefill_flops_match_xla_and_kv_bytes_match_cache(mid_params):
  """Generation's prefill: logits for the last position only; caches sized for decoding."""
  new_tokens = 16
  args = _prompt(MID, BATCH)
  fn = lambda p, *a: llava.Llava(MID).apply({"params": p}, *a, method="prefill",
                                            max_new_tokens=new_tokens)
  xla = _xla_flops(fn, mid_params, *args)
  _check_close(xla, cost.prefill_flops(MID, TEXT_TOKENS, batch=BATCH).total, "prefill")

  _, state = jax.eval_shape(fn, mid_params, *args)
  capacity = args[0].shape[1] + new_tokens
  kv = cost.kv_cache_bytes(MID, capacity, batch=BATCH, bytes_per_element=4)
  actual = [c.k.size * c.k.dtype.itemsize + c.v.size * c.v.dtype.itemsize for c in state.caches]
  assert list(kv.per_layer) == actual
  assert kv.total == sum(actual)


def test_decode_step_flops_match_xla(mid_params):
  new_tokens = 16
  args = _prompt(MID, BATCH)
  prefill = lambda p, *a: llava.Llava(MID).apply({"params": p}, *a, method="prefill",
                                                 max_new_tokens=new_tokens)
  _, state = jax.eval_shape(prefill, mid_params, *args)
  step = lambda p, tok, st: llava.Llava(MID).apply({"params": p}, tok, st, method="decode")
  xla = _xla_flops(step, mid_params, _abstract((BATCH,), jnp.int32), state)
  # The step attends over the whole cache (its capacity), masked: count what runs.
  capacity = args[0].shape[1] + new_tokens
  _check_close(xla, cost.decode_step_flops(MID, capacity - 1, batch=BATCH).total, "decode step")


def test_full_size_formula_by_hand():
  """LLaVA-1.5-7B, written out term by term (multi-head attention, so K = H)."""
  cfg = presets.LLAVA15_7B
  n, d, f, layers = 576 + 64, 4096, 11008, 32
  llm = layers * (8 * n * d * d + 4 * n * n * d + 6 * n * d * f)
  nv, dv, fv = 577, 1024, 4096
  vision = 23 * (8 * nv * dv * dv + 4 * nv * nv * dv + 4 * nv * dv * fv) + 2 * 576 * 588 * dv
  projector = 2 * 576 * (dv * d + d * d)
  got = cost.prefill_flops(cfg, 64).as_dict()
  assert got == dict(vision=vision, projector=projector, llm=llm, lm_head=2 * d * 32064,
                     total=vision + projector + llm + 2 * d * 32064)
  assert 8.2e12 < llm < 8.6e12  # the papers' ~8.2-8.4 TFLOPs for ~600-token prompts


def test_per_layer_counts_batch_and_equivalent_tokens():
  cfg = presets.LLAVA15_7B
  text = 64
  # FastV-like: all 576 visual tokens in layers 0-1, 144 from layer 2 on.
  visual = [576] * 2 + [144] * 30
  pruned = cost.prefill_flops(cfg, text, batch=3, llm_tokens_per_layer=[v + text for v in visual])
  full = cost.prefill_flops(cfg, text, batch=3)
  assert pruned.llm.per_layer[:2] == full.llm.per_layer[:2]
  assert pruned.llm.per_layer[2] == cost.llm_layer_flops(cfg, 144 + text)
  assert pruned.llm.total == 3 * sum(pruned.llm.per_layer)
  assert pruned.vision == full.vision and pruned.projector == full.projector
  assert full.total == 3 * cost.prefill_flops(cfg, text).total
  assert cost.equivalent_visual_tokens(visual) == pytest.approx(171.0)
  # Pre-LLM reduction shrinks the projector's and LLM's work, not the tower's.
  merged = cost.prefill_flops(cfg, text, num_visual_tokens=144)
  assert merged.vision == cost.prefill_flops(cfg, text).vision
  assert merged.projector.total * 4 == full.projector.per_sample
  assert merged.llm.per_layer == pruned.llm.per_layer[2:3] * 32


def test_kv_bytes_full_size():
  # 640 tokens × 32 layers × 2 (k, v) × 4096 × 2 bytes = 320 MiB per sample.
  kv = cost.kv_cache_bytes(presets.LLAVA15_7B, 640, batch=2)
  assert kv.total == 2 * 320 * 2 ** 20
  shorter = cost.kv_cache_bytes(presets.LLAVA15_7B, [640] * 2 + [208] * 30)
  assert shorter.per_layer[2] * 640 == shorter.per_layer[0] * 208


def test_bad_counts_are_rejected():
  with pytest.raises(ValueError, match="31 per-layer counts for 32 layers"):
    cost.llm_flops(presets.LLAVA15_7B, [100] * 31)
  with pytest.raises(ValueError, match="non-negative"):
    cost.kv_cache_bytes(presets.LLAVA15_7B, -1)
  with pytest.raises(ValueError, match="batch"):
    cost.vision_flops(presets.LLAVA15_7B, batch=0)


def test_preset_equals_published_config():
  assert config.from_hf_dict(json.loads(HF_CONFIG.read_text())) == presets.get("llava-1.5-7b")
  with pytest.raises(KeyError, match="available"):
    presets.get("llava-9b")


def test_llava15_7b_parameter_count_without_memory():
  params = jax.eval_shape(lambda: llava.init_params(presets.LLAVA15_7B, jax.random.key(0)))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  # The Hugging Face checkpoint's counts: all 24 CLIP layers are stored (and the
  # post-LN), though only 23 run.
  assert count(params["vision"]) == 303_507_456
  assert count(params["projector"]) == 20_979_712
  assert count(params["llm"]) == 6_738_939_904
  assert count(params) == 7_063_427_072


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_file():
  module = _config_module("llava15_7b")
  cfg = module.get_config()
  assert cfg.checkpoint is None and presets.get(cfg.preset) == presets.LLAVA15_7B
  assert module.get_config("/ckpt/llava-1.5-7b-hf").checkpoint == "/ckpt/llava-1.5-7b-hf"
  # infer.py reads every field of the default config.
  assert set(_config_module("default").get_config()) <= set(cfg)
