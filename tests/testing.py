"""Tiny model configs and batch helpers that several test files share.

A test file that needs a config differing from these in any field keeps its own literal,
so that what each test runs on stays visible where it is defined.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tokred_jax.models.config import LlavaConfig, TextConfig, VisionConfig

# CLIP tower, 112 px in 14 px patches: an 8x8 grid (64 image tokens) + CLS; 3 layers, width 32.
VISION_112 = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                          image_size=112, patch_size=14)
# CLIP tower, 28 px in 14 px patches: a 2x2 grid (4 image tokens) + CLS; 2 layers, width 32.
VISION_28 = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         image_size=28, patch_size=14)
# VISION_112 + an 8-layer Llama (width 64, 4 query over 2 KV heads, vocabulary 128).
TINY = LlavaConfig(
    vision=VISION_112,
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=8,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                    bos_token_id=1, eos_token_id=2),
    image_token_id=127, pad_token_id=0)


def with_routers(cfg: LlavaConfig) -> LlavaConfig:
  """cfg with p-MoD routers on every layer from 2 on (plans need no weights)."""
  text = dataclasses.replace(cfg.text, router_layers=tuple(range(2, cfg.text.num_layers)))
  return dataclasses.replace(cfg, text=text)


# TINY with p-MoD routers on layers 2-7.
WITH_ROUTERS = with_routers(TINY)


def make_batch(num_visual: int, text_lengths=(5, 11), bucket: int = 96, seed: int = 0):
  """Left-padded prompts for TINY: `n` text tokens, `num_visual` image slots, 3 more text
  tokens per sample; input_ids: i32[B, bucket], pixel_values: f32[B, 112, 112, 3]."""
  rng = np.random.default_rng(seed)
  b = len(text_lengths)
  ids = np.zeros((b, bucket), np.int32)
  mask = np.zeros((b, bucket), bool)
  for i, n in enumerate(text_lengths):
    row = np.concatenate([rng.integers(3, 120, n), np.full(num_visual, TINY.image_token_id),
                          rng.integers(3, 120, 3)])
    ids[i, bucket - len(row):] = row
    mask[i, bucket - len(row):] = True
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
  size = TINY.vision.image_size
  pixels = rng.normal(size=(b, size, size, 3)).astype(np.float32)
  return dict(input_ids=ids, attention_mask=mask, positions=pos, pixel_values=pixels)
