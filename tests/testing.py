"""Tiny model configs and batch helpers that several test files share.

A test file that needs a config differing from these in any field keeps its own literal,
so that what each test runs on stays visible where it is defined.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tokred_jax.models import llava
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


# LLaVA-NeXT in miniature: a CLIP tower at 56 px (4x4 patches + CLS), llava-v1.6's five
# grids scaled to 56 px crops, TINY's 8-layer Llama.
TINY_NEXT = dataclasses.replace(
    TINY, vision=dataclasses.replace(VISION_112, image_size=56), arch="llava_next",
    image_grid_pinpoints=((56, 112), (112, 56), (112, 112), (168, 56), (56, 168)))
# LLaVA-OneVision in miniature: SigLIP at 70 px (5x5 patches; video frames pool to 3x3),
# "full" features of the last layer, anyres_max_9 over 1..4 x 1..4 grids, an 8-layer
# Qwen2 (q/k/v bias) with <video> slots of their own.
TINY_OV = LlavaConfig(
    vision=VisionConfig(kind="siglip", hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, image_size=70, patch_size=14, layer_norm_eps=1e-6,
                        hidden_act="gelu_pytorch_tanh", image_mean=(0.5,) * 3,
                        image_std=(0.5,) * 3),
    text=TextConfig(kind="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                    num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16,
                    max_position_embeddings=2048, attention_bias=True, bos_token_id=None,
                    eos_token_id=2),
    image_token_id=126, pad_token_id=0, vision_feature_layer=-1, vision_feature_select="full",
    arch="llava_onevision", vision_aspect_ratio="anyres_max_9", video_token_id=127,
    image_grid_pinpoints=tuple((70 * i, 70 * j) for i in range(1, 5) for j in range(1, 5)))


def random_params(cfg, seed=0):
  """Random weights of the model's shapes, without compiling `init_params`: norms' scales
  1, biases 0, every other tensor N(0, 0.05²)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: llava.init_params(cfg, jax.random.PRNGKey(0)))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(leaf.shape, np.float32)
    if "bias" in name:
      return np.zeros(leaf.shape, np.float32)
    return (0.05 * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def official_aim_keep(num_visual, num_layers, l1, l2):
  """Visual tokens each layer processes: the official Qwen2 code's retain_rate (written
  for (14, 22) on 28 layers) and keep_num = int(N_v · rate + protected) − protected."""
  rate = [max(0, 1.0 - (l - l1 + 1) / (l2 - l1)) if l >= l1 else 1.0
          for l in range(num_layers)]
  protected = 100
  return [num_visual] + [int(num_visual * r + protected) - protected for r in rate[:-1]]


def left_pad(rows, pad_id: int = 0):
  """Token rows left-padded into one batch: input_ids i32[B, T], attention_mask bool[B, T]
  and positions i32[B, T] (0, 1, ... from each row's first token)."""
  length = max(map(len, rows))
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros(ids.shape, bool)
  for i, row in enumerate(rows):
    ids[i, length - len(row):], mask[i, length - len(row):] = row, True
  return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
