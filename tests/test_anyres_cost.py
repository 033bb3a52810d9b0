"""benchmarks/anyres_cost.py: its headline figures recomputed by hand from the configs, and
the NeXT / OneVision presets' parameter counts against a count written out from the config.

No model-sized memory: plans and formulas only, parameters as abstract shapes.
"""

import dataclasses
import math

import pytest

from benchmarks import anyres_cost
from tokred_jax.engine import cost
from tokred_jax.models import presets


@pytest.fixture(scope="module")
def ov():
  return anyres_cost.onevision_video()


@pytest.fixture(scope="module")
def nx():
  return anyres_cost.next_pmod()


def _layer(t, n: int, attention: bool = True) -> int:
  """One decoder layer on n tokens, term by term: q and o over H heads, k and v over K,
  scores and values (n × n, H heads), SwiGLU's three matmuls."""
  d, h = t.hidden_size, t.head_dim
  return (2 * 2 * n * d * t.num_heads * h + 2 * 2 * n * d * t.num_kv_heads * h
          + attention * 2 * 2 * n * n * t.num_heads * h + 3 * 2 * n * d * t.intermediate_size)


def test_onevision_dense_video_by_hand(ov):
  t = presets.get(anyres_cost.OV).text
  # 32 frames of 14 × 14 pooled tokens, one newline, 100 text tokens in all 28 layers.
  n = 32 * 196 + 1 + 100
  assert ov["rows"]["none"]["visual_into_llm"] == 6273
  assert ov["rows"]["none"]["llm_tflops"] * 1e12 == pytest.approx(28 * _layer(t, n), rel=1e-12)
  assert ov["rows"]["none"]["kv_mib"] * 2 ** 20 == 28 * n * 2 * 4 * 128 * 2
  assert ov["rows"]["none"]["llm_tflops"] == pytest.approx(99.63, rel=0.005)  # AIM's figure


def test_onevision_aim49_by_hand(ov):
  t = presets.get(anyres_cost.OV).text
  # 49 tokens a frame and the newline; layers 0-14 see all, 15-21 keep ⌊1569·(1 − k/8)⌋.
  ours = [1569] * 15 + [1569 * (8 - k) // 8 for k in range(1, 8)] + [0] * 6
  assert ov["rows"]["aim-49"]["llm_tokens"] == [100 + v for v in ours]
  got = ov["rows"]["aim-49"]["llm_tflops"] * 1e12
  layers = sum(_layer(t, 100 + v) for v in ours)
  # The PageRank scorer after layers 14-21: 5 iterations; above 1,024 tokens blocks of
  # at most 512 query rows (a multiple of 8) recompute the logits every iteration.
  scorer = 0
  for n in (100 + v for v in ours[14:22]):
    logits = lambda rows: 2 * rows * n * t.num_heads * t.head_dim
    walk = lambda rows: 2 * t.num_heads * rows * n
    if n <= 1024:
      scorer += logits(n) + 5 * walk(n)
    else:
      blocks = -(-n // 512)
      rows = blocks * 8 * -(-n // (8 * blocks))
      scorer += 5 * (logits(rows) + walk(rows))
  assert got == pytest.approx(layers + scorer, rel=1e-12)
  # The official convention: no newline, each layer one schedule step ahead.
  official = [1568] * 14 + [1568 * (8 - k) // 8 for k in range(1, 8)] + [0] * 7
  assert ov["official_convention"]["aim-49"]["visual_per_layer"] == official
  by_hand = sum(_layer(t, 100 + v) for v in official) / 1e12
  assert ov["official_convention"]["aim-49"]["llm_tflops"] == pytest.approx(by_hand, rel=1e-12)
  assert by_hand == pytest.approx(14.76, rel=0.002)  # AIM's published figure


def test_next_pmod_by_hand(nx):
  t = presets.get(anyres_cost.NEXT).text
  square = nx["cases"][0]
  assert square["image_hw"] == [672, 672] and square["visual_tokens"] == 576 + 48 * 49
  text = anyres_cost.PMOD_TEXT
  # PRD: R = ½cos(πℓ/31) + ½, dense above 0.85 (layers 0-7), else max(R, 0.15) of 2,928.
  kept = [2928] * 8 + [int(2928 * max(0.5 * math.cos(math.pi * l / 31) + 0.5, 0.15))
                       for l in range(8, 32)]
  assert square["rows"]["pmod"]["kv_visual"] == sum(kept)
  dense = sum(_layer(t, text + 2928) for _ in range(32))
  assert square["rows"]["dense"]["llm_tflops"] * 1e12 == pytest.approx(dense, rel=1e-12)
  routed = sum(_layer(t, text + k) for k in kept)
  assert routed < square["rows"]["pmod"]["llm_tflops"] * 1e12 < routed * 1.001  # + routers
  linear = [sum(_layer(t, text + k, attention=False) for k in ks) / 1e12
            for ks in ([2928] * 32, kept)]
  assert [square["rows"][m]["llm_tflops_linear"] for m in ("dense", "pmod")] == \
      pytest.approx(linear, rel=1e-12)
  # p-MoD's published pair, 39.46 and 21.94 TFLOPs, and its 53.8% visual KV.
  assert linear == pytest.approx([39.46, 21.94], abs=0.03)
  assert square["kv_fraction_visual"] == pytest.approx(0.538, abs=0.001)


def _by_hand(cfg) -> int:
  """Every tensor of the checkpoint, from the config's sizes."""
  v, t = cfg.vision, cfg.text
  dv, fv, dt = v.hidden_size, v.intermediate_size, t.hidden_size
  clip = v.kind == "clip"
  tower = (v.patch_size ** 2 * v.num_channels * dv + (0 if clip else dv)  # SigLIP's bias
           + (v.num_patches + clip) * dv + clip * dv  # positions; CLIP's class embedding
           + (2 * dv if clip else 0) + 2 * dv  # CLIP's pre-LN; the post-LN
           + v.num_layers * (4 * (dv * dv + dv) + 2 * 2 * dv + 2 * dv * fv + fv + dv))
  projector = dv * dt + dt + dt * dt + dt
  q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
  layer = (dt * q + 2 * dt * kv + q * dt + t.attention_bias * (q + 2 * kv)
           + 3 * dt * t.intermediate_size + 2 * dt)
  llm = 2 * t.vocab_size * dt + dt + t.num_layers * layer  # embeddings, LM head, final norm
  return tower + projector + llm + dt  # + image_newline


def test_onevision_parameter_count():
  cfg = presets.get(anyres_cost.OV)
  got = anyres_cost.parameter_count(cfg)
  assert got["total"] == _by_hand(cfg) and got["image_newline"] == cfg.text.hidden_size
  assert got["total"] == pytest.approx(8.03e9, abs=0.005e9)  # the model card's 8.03B


def test_next_parameter_count():
  cfg = presets.get(anyres_cost.NEXT)
  # LLaVA-1.5-7B's checkpoint count (test_cost checks the preset against it) + the newline.
  assert _by_hand(cfg) == 7_063_427_072 + 4096
  # The full trace takes 9 s, as test_cost's LLaVA-1.5 one does; two layers a stack check
  # the same tree (the count is linear in the layers).
  short = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_layers=2),
                              text=dataclasses.replace(cfg.text, num_layers=2))
  got = anyres_cost.parameter_count(short)
  assert got["total"] == _by_hand(short) and got["image_newline"] == 4096


def test_stack_tflops_without_attention_drops_only_the_square():
  cfg = presets.get(anyres_cost.NEXT)
  full, linear = (anyres_cost.stack_tflops(cfg, 100, [500], attention=a) for a in (True, False))
  assert (full - linear) * 1e12 == pytest.approx(4 * 600 ** 2 * 4096, rel=1e-12)
  assert full * 1e12 == cost.llm_layer_flops(cfg, 600)
