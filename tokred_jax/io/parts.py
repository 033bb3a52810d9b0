"""LLaVA-1.5 assembled from its parts, as its stage 2 (and p-MoD) starts training:

  llm        a Hugging Face LlamaForCausalLM directory, e.g. lmsys/vicuna-7b-v1.5
             (config.json, safetensors named model.* and lm_head.*)
  tower      a Hugging Face CLIPModel or CLIPVisionModel directory, e.g.
             openai/clip-vit-large-patch14-336 (only its vision half is used)
  projector  stage 1's projector: the original LLaVA code saves it as mm_projector.bin,
             tensors model.mm_projector.{0,2}.{weight,bias} (mlp2x_gelu: Linear, GELU,
             Linear); read here as safetensors with the same names

The model is LLaVA-1.5's (the official training script's settings): CLIP layer -2 without
its CLS token, the two-layer GELU projector, images padded to a square. The image slots
use the placeholder id of `llava_original` (the LLM's `<unk>`, 0), so that the trained
model is the one an original-layout p-MoD checkpoint loads as; a Llama tokenizer.json
is given the `<image>` alias for it (`tokenizer`).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import numpy as np

from tokred_jax.io import checkpoint, llava_original, processing
from tokred_jax.io.checkpoint import CheckpointError
from tokred_jax.models.config import ConfigError, LlavaConfig

# Where LLaVA-1.5's stage 1 projector lives: liuhaotian/llava-v1.5-mlp2x-336px-pretrain-
# vicuna-7b-v1.5 (and the p-MoD scripts' pretrain folder) hold mm_projector.bin.
_PROJECTOR = re.compile(r"(?:.*\.)?mm_projector\.([02])\.(weight|bias)")


def projector_name(name: str) -> str | None:
  """A stage-1 projector tensor's name -> the canonical one (others: None). The original
  loader takes every key with `mm_projector.` and strips what comes before."""
  match = _PROJECTOR.fullmatch(name)
  if not match:
    return None
  return f"multi_modal_projector.linear_{1 if match.group(1) == '0' else 2}.{match.group(2)}"


def _llm_name(name: str) -> str | None:
  return llava_original.canonical_name(name) if name.startswith(("model.", "lm_head.")) else None


def _check_projector(file: pathlib.Path) -> None:
  if file.suffix == ".bin" and file.is_file():
    raise CheckpointError(
        f"{file} is a PyTorch pickle, which this library does not read (it does not import "
        "torch). Convert it once, with torch installed: python -c \"import torch, "
        "safetensors.torch as st; st.save_file({k: v.float() for k, v in torch.load("
        f"'{file}', map_location='cpu').items()}}, '{file.with_suffix('.safetensors')}')\"")
  if not file.is_file() or file.suffix != ".safetensors":
    raise CheckpointError(f"projector file {file} is not a .safetensors file; pass stage 1's "
                          "projector (mm_projector.bin converted to safetensors).")


def config(llm: str | os.PathLike, tower: str | os.PathLike) -> LlavaConfig:
  """The LLaVA-1.5 config of the LLM directory `llm` and the CLIP directory `tower`.

  Raises:
    CheckpointError: a part is missing or not what LLaVA-1.5 is built from.
  """
  llm, tower = pathlib.Path(llm), pathlib.Path(tower)
  for path, what in ((llm, "LLM"), (tower, "vision tower")):
    if not (path / checkpoint.CONFIG_FILE).is_file():
      raise CheckpointError(f"the {what} directory {path} has no {checkpoint.CONFIG_FILE}; "
                            "pass a Hugging Face model directory.")
  d = llava_original.read_json(llm / checkpoint.CONFIG_FILE, "LLM config")
  if d.get("model_type") != "llama":
    raise CheckpointError(f"{llm} holds a {d.get('model_type')!r} model; LLaVA-1.5 and p-MoD "
                          "start from a Llama LLM (LlamaForCausalLM, e.g. lmsys/vicuna-7b-v1.5).")
  return llava_original.original_config(dict(
      d, model_type="llava_llama", mm_vision_tower=str(tower), mm_projector_type="mlp2x_gelu",
      mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad"),
      tower)


def check(llm: str | os.PathLike, tower: str | os.PathLike, projector: str | os.PathLike
          ) -> LlavaConfig:
  """`config`, with every part's files checked for presence and format (headers only)."""
  cfg = config(llm, tower)
  for path in (llm, tower):
    llava_original.require_safetensors(pathlib.Path(path))
  _check_projector(pathlib.Path(projector))
  return cfg


def load(llm: str | os.PathLike, tower: str | os.PathLike, projector: str | os.PathLike,
         dtype: Any = np.float32) -> tuple[LlavaConfig, checkpoint.Params]:
  """(config, params) of LLaVA-1.5 from its three parts, each tensor the part's own.

  Raises:
    CheckpointError: a part is missing, unreadable or does not fit the others.
  """
  cfg = check(llm, tower, projector)
  sources = [(llm, _llm_name), (tower, llava_original.tower_name), (projector, projector_name)]
  return cfg, checkpoint.load_params(cfg, sources, dtype)


def tokenizer_file(llm: str | os.PathLike, tokenizer: str | os.PathLike | None
                   ) -> pathlib.Path:
  """The Llama tokenizer.json to use: `tokenizer` (a file or a directory holding one),
  else the LLM directory's."""
  file = pathlib.Path(tokenizer or llm)
  file = file / checkpoint.TOKENIZER_FILE if file.is_dir() else file
  if not file.is_file():
    raise CheckpointError(
        f"tokenizer file {file} does not exist; Vicuna ships only the sentencepiece "
        "tokenizer.model: pass a Llama tokenizer.json (e.g. llava-hf/llava-1.5-7b-hf's, or "
        "the one transformers' AutoTokenizer.save_pretrained writes for the LLM).")
  return file


def tokenizer(llm: str | os.PathLike, file: str | os.PathLike | None, cfg: LlavaConfig
              ) -> processing.Tokenizer:
  """The tokenizer of `tokenizer_file(llm, file)` with `<image>` on the image placeholder
  id."""
  return llava_original.placeholder_tokenizer(tokenizer_file(llm, file), cfg)


def write_tokenizer(llm: str | os.PathLike, file: str | os.PathLike | None, cfg: LlavaConfig,
                    out: str | os.PathLike) -> str:
  """Writes `tokenizer(llm, file, cfg)` as tokenizer.json text to `out`; returns `out`."""
  text = llava_original.placeholder_tokenizer_json(tokenizer_file(llm, file), cfg)
  pathlib.Path(out).write_text(text)
  return str(out)


FIELDS = ("llm", "vision_tower", "projector")


def from_model_config(model: Any) -> tuple[str, str, str] | None:
  """(llm, vision_tower, projector) of a training config's `model` section when it
  builds the model from parts (configs/train_pmod_llava15.py), else None.

  Raises:
    ConfigError: only some parts are given, none where the section has the fields and no
      `model.checkpoint`, or parts and `model.checkpoint` both.
  """
  given = {name: model.get(name) or "" for name in FIELDS}
  if not any(given.values()):
    if "llm" in model and not model.get("checkpoint"):  # a recipe that starts from parts
      raise ConfigError("set model.llm, model.vision_tower and model.projector (the parts "
                        "this recipe starts from), or model.checkpoint.")
    return None
  missing = [f"model.{name}" for name, value in given.items() if not value]
  if missing:
    raise ConfigError(f"{', '.join(missing)} not set: a model built from parts needs "
                      "model.llm, model.vision_tower and model.projector.")
  if model.get("checkpoint"):
    raise ConfigError(f"model.checkpoint {model.checkpoint!r} and model.llm are both set; "
                      "start from a LLaVA checkpoint or from parts, not both.")
  return given["llm"], given["vision_tower"], given["projector"]
