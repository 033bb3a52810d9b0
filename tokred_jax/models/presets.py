"""Named full-size model configurations, usable without a checkpoint on disk.

For FLOPs tables, `jax.eval_shape` checks and as the model of a config file that names
a preset rather than a checkpoint directory. Each equals what `config.from_hf_dict`
reads from the published checkpoint's `config.json` (tests/test_cost.py checks it).
"""

from __future__ import annotations

import dataclasses

from tokred_jax.models.config import CLIP_MEAN, CLIP_STD, LlavaConfig, TextConfig, VisionConfig

# llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px, 2-layer GELU projector, Vicuna-7B v1.5.
LLAVA15_7B = LlavaConfig(
    vision=VisionConfig(
        kind="clip", hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
        image_size=336, patch_size=14, num_channels=3, layer_norm_eps=1e-5,
        hidden_act="quick_gelu", image_mean=CLIP_MEAN, image_std=CLIP_STD),
    text=TextConfig(
        kind="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, attention_bias=False,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    image_token_id=32000, pad_token_id=32001, vision_feature_layer=-2,
    vision_feature_select="default", projector_hidden_act="gelu", projector_bias=True)

# llava-hf/llava-v1.6-vicuna-7b-hf: LLaVA-1.5's tower, projector shape and LLM, anyres
# tiling over llava-v1.6's five grids (up to 2x2 tiles of 336 px: 5 crops, 2,880 tokens).
LLAVA_NEXT_VICUNA_7B = dataclasses.replace(
    LLAVA15_7B, arch="llava_next",
    image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)))

# llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP so400m at 384 px (its first 26 layers:
# 27x27 patches, no CLS, "full" features of layer -1) + Qwen2-7B (28 layers, 28 query
# heads over 4 KV heads, q/k/v bias), anyres_max_9 over 1x1 .. 6x6 grids of 384 px.
LLAVA_ONEVISION_QWEN2_7B = LlavaConfig(
    vision=VisionConfig(
        kind="siglip", hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
        image_size=384, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
    text=TextConfig(
        kind="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=32768, attention_bias=True,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
    image_token_id=151646, pad_token_id=151643, vision_feature_layer=-1,
    vision_feature_select="full", projector_hidden_act="gelu", projector_bias=True,
    arch="llava_onevision", vision_aspect_ratio="anyres_max_9", video_token_id=151647,
    image_grid_pinpoints=tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)))

PRESETS: dict[str, LlavaConfig] = {"llava-1.5-7b": LLAVA15_7B,
                                   "llava-v1.6-vicuna-7b": LLAVA_NEXT_VICUNA_7B,
                                   "llava-onevision-qwen2-7b-ov": LLAVA_ONEVISION_QWEN2_7B}


def get(name: str) -> LlavaConfig:
  """The preset called `name`, e.g. "llava-1.5-7b"."""
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}.")
  return PRESETS[name]
