"""Tiny random LLaVA checkpoints in the real Hugging Face format, built with transformers.

Each `make_*` function writes a complete checkpoint directory (config.json, safetensors
weights, generation_config.json, tokenizer.json) and returns its path. Weights are drawn
with a fixed seed and a larger spread than transformers' default init (std 0.02), so that
activations and logits are O(1) and differ between tokens: parity tests against these
checkpoints then compare real signal rather than near-zero noise.

These helpers need torch and transformers; the library itself never imports them.
"""

from __future__ import annotations

import json
import pathlib

import safetensors.numpy
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Text the fixture tokenizers are trained on; short, fixed, so training is deterministic.
_CORPUS = """USER: What is shown in this image? ASSISTANT: A small red cat sits on a mat.
USER: Describe the picture in detail. ASSISTANT: There are two dogs playing in the park.
USER: How many people are there? ASSISTANT: Three people are standing near the water.
USER: What colour is the car? ASSISTANT: The car is blue and parked by the house.
The quick brown fox jumps over the lazy dog while the sun sets behind the hills.
""" * 4
_WEIGHT_STD = 0.1
# Vocabulary the byte-level tokenizer learns: 3 specials + 256 bytes + merges.
_TRAINED_VOCAB = 290


def _train_tokenizer(out_dir: pathlib.Path, add_bos: bool, extra: tuple[str, ...] = ()
                     ) -> dict[str, int]:
  """Writes a byte-level BPE tokenizer.json and returns its special-token ids.

  `<unk>`, `<s>`, `</s>` get ids 0, 1, 2 (the Llama defaults, so sparse configs may omit
  bos/eos); `<image>` and `<pad>` are added after training, at the end of the vocabulary,
  as llava-hf does.
  """
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=_TRAINED_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
  tok.add_special_tokens(["<image>", "<pad>", *extra])
  if add_bos:
    # Llama tokenizers add BOS in the post-processor; Qwen2 ones do not.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  tok.save(str(out_dir / "tokenizer.json"))
  return {name: tok.token_to_id(name) for name in ("<s>", "</s>", "<image>", "<pad>", *extra)}


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Re-draws every parameter: norm scales around 1, everything else ~N(0, 0.1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen) * _WEIGHT_STD
      is_norm_scale = param.ndim == 1 and "norm" in name and name.endswith("weight")
      param.copy_(noise + 1.0 if is_norm_scale else noise)


def _build(out_dir, vision_config, text_config, ids, seed, **llava_kwargs) -> pathlib.Path:
  config = transformers.LlavaConfig(
      vision_config=vision_config, text_config=text_config,
      image_token_index=ids["<image>"], pad_token_id=ids["<pad>"], **llava_kwargs)
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config)
  _randomize(model, seed)
  model.save_pretrained(out_dir)
  return out_dir


def _llama_config(ids: dict[str, int], **overrides) -> transformers.LlamaConfig:
  kwargs = dict(
      vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      rms_norm_eps=1e-5, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
      pad_token_id=ids["<pad>"])
  kwargs.update(overrides)
  return transformers.LlamaConfig(**kwargs)


def _clip_config(**overrides) -> transformers.CLIPVisionConfig:
  kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, image_size=42, patch_size=14)
  kwargs.update(overrides)
  return transformers.CLIPVisionConfig(**kwargs)


def make_clip_llama(out_dir, seed: int = 0) -> pathlib.Path:
  """LLaVA-1.5 in miniature, saved by transformers 5 (its own names, dense config).

  CLIP tower: 42 px images, 14 px patches (3x3 grid + CLS), 3 layers, width 32.
  Llama: width 64, 4 query heads over 2 KV heads (GQA), 2 layers, vocabulary 320.
  Feature layer -2 with the CLS token dropped: 9 image tokens per prompt.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  ids = _train_tokenizer(out_dir, add_bos=True)
  return _build(out_dir, _clip_config(), _llama_config(ids), ids, seed)


def make_siglip_qwen2(out_dir, seed: int = 1) -> pathlib.Path:
  """A LLaVA-OneVision-like pairing: SigLIP tower (no CLS) and Qwen2 (q/k/v bias).

  SigLIP: 56 px images, 14 px patches (4x4 grid), 2 layers, width 32, no pooling head.
  Qwen2: width 64, 4 query heads over 2 KV heads, tied input/output embeddings, no BOS.
  All 16 patch features of the last tower layer go to the LLM ("full", layer -1).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  ids = _train_tokenizer(out_dir, add_bos=False)
  vision = transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=56, patch_size=14, vision_use_head=False)
  text = transformers.Qwen2Config(
      vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids["</s>"],
      pad_token_id=ids["<pad>"])
  return _build(out_dir, vision, text, ids, seed, vision_feature_select_strategy="full",
                vision_feature_layer=-1, tie_word_embeddings=True)


# Tile resolutions of the tiny anyres checkpoints: llava-v1.6's five grids at 28 px crops;
# OneVision's 1..4 x 1..4 grids of 70 px crops (anyres_max_9 shrinks maps over 9 crops'
# worth of 5x5 tokens by more than 1.1², so 4x3 and 4x4 grids).
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
OV_PINPOINTS = [[70 * i, 70 * j] for i in range(1, 5) for j in range(1, 5)]


def _save(model, out_dir, seed) -> pathlib.Path:
  _randomize(model, seed)
  model.save_pretrained(out_dir)
  return out_dir


def make_llava_next(out_dir, seed: int = 4) -> pathlib.Path:
  """LLaVA-NeXT in miniature: the CLIP + Llama pair of `make_clip_llama` with 28 px crops
  (2x2 patches + CLS), tiled at `NEXT_PINPOINTS`; feature layer -2, "default"."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  ids = _train_tokenizer(out_dir, add_bos=True)
  config = transformers.LlavaNextConfig(
      vision_config=_clip_config(image_size=28), text_config=_llama_config(
          ids, max_position_embeddings=512), image_token_index=ids["<image>"],
      pad_token_id=ids["<pad>"], image_grid_pinpoints=NEXT_PINPOINTS)
  torch.manual_seed(seed)
  return _save(transformers.LlavaNextForConditionalGeneration(config), out_dir, seed)


def make_llava_onevision(out_dir, seed: int = 5) -> pathlib.Path:
  """LLaVA-OneVision in miniature: SigLIP (70 px crops, 5x5 patches, so video frames
  pool to 3x3 as 27x27 pools to 14x14) + Qwen2 (tied embeddings, no BOS), "full"
  features of the last layer, anyres_max_9 over `OV_PINPOINTS`. `<pad>`'s neighbour
  in the vocabulary is no token of its own, so `<video>` is added for the video slots."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  ids = _train_tokenizer(out_dir, add_bos=False, extra=("<video>",))
  vision = transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=70, patch_size=14, vision_use_head=False)
  text = transformers.Qwen2Config(
      vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
      tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids["</s>"],
      pad_token_id=ids["<pad>"])
  config = transformers.LlavaOnevisionConfig(
      vision_config=vision, text_config=text, image_token_index=ids["<image>"],
      video_token_index=ids["<video>"], pad_token_id=ids["<pad>"],
      image_grid_pinpoints=OV_PINPOINTS, tie_word_embeddings=True)
  torch.manual_seed(seed)
  return _save(transformers.LlavaOnevisionForConditionalGeneration(config), out_dir, seed)


# Hugging Face names as transformers 4.36 wrote them (llava-hf/llava-1.5-7b-hf): the
# CLIP tower keeps its inner `vision_model.` module.
def _published_name(name: str) -> str:
  if name.startswith("vision_tower."):
    return "vision_tower.vision_model." + name[len("vision_tower."):]
  return name


def make_published_layout(out_dir, seed: int = 2) -> pathlib.Path:
  """A CLIP + Llama checkpoint in the layout of the published llava-hf/llava-1.5-7b-hf.

  Weights use the transformers 4.36 names (`vision_tower.vision_model.*`) and config.json
  is sparse like /work/shared/reference/llava-1.5-7b-hf.config.json: fields equal to the
  config-class defaults (hidden_act, rope_theta, layer_norm_eps, bos/eos ids, ...) are
  left out, and `vocab_size` is repeated at the top level. The tokenizer adds no BOS, so
  the loader's own BOS handling is exercised.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  ids = _train_tokenizer(out_dir, add_bos=False)
  vocab = 320
  vision = _clip_config(num_hidden_layers=2)
  text = _llama_config(ids, vocab_size=vocab, max_position_embeddings=512)
  _build(out_dir, vision, text, ids, seed)

  weights = out_dir / "model.safetensors"
  tensors = safetensors.numpy.load_file(weights)
  safetensors.numpy.save_file({_published_name(k): v for k, v in tensors.items()}, weights,
                              metadata={"format": "pt"})
  sparse = {
      "architectures": ["LlavaForConditionalGeneration"],
      "ignore_index": -100,
      "image_token_index": ids["<image>"],
      "model_type": "llava",
      "pad_token_id": ids["<pad>"],
      "projector_hidden_act": "gelu",
      "text_config": {
          "architectures": ["LlamaForCausalLM"],
          "hidden_size": text.hidden_size,
          "intermediate_size": text.intermediate_size,
          "max_position_embeddings": text.max_position_embeddings,
          "model_type": "llama",
          "num_attention_heads": text.num_attention_heads,
          "num_hidden_layers": text.num_hidden_layers,
          "num_key_value_heads": text.num_key_value_heads,
          "rms_norm_eps": text.rms_norm_eps,
          "torch_dtype": "float32",
          "vocab_size": vocab,
      },
      "tie_word_embeddings": False,
      "torch_dtype": "float32",
      "transformers_version": "4.36.0.dev0",
      "vision_config": {
          "hidden_size": vision.hidden_size,
          "image_size": vision.image_size,
          "intermediate_size": vision.intermediate_size,
          "model_type": "clip_vision_model",
          "num_attention_heads": vision.num_attention_heads,
          "num_hidden_layers": vision.num_hidden_layers,
          "patch_size": vision.patch_size,
          "projection_dim": 768,
          "vocab_size": 32000,
      },
      "vision_feature_layer": -2,
      "vision_feature_select_strategy": "default",
      "vocab_size": vocab,
  }
  (out_dir / "config.json").write_text(json.dumps(sparse, indent=2))
  return out_dir
