"""Named full-size model configurations, usable without a checkpoint on disk.

For FLOPs tables, `jax.eval_shape` checks and as the model of a config file that names
a preset rather than a checkpoint directory. Each equals what `config.from_hf_dict`
reads from the published checkpoint's `config.json` (tests/test_cost.py checks it).
"""

from __future__ import annotations

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

PRESETS: dict[str, LlavaConfig] = {"llava-1.5-7b": LLAVA15_7B}


def get(name: str) -> LlavaConfig:
  """The preset called `name`, e.g. "llava-1.5-7b"."""
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}.")
  return PRESETS[name]
