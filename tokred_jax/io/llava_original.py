"""Checkpoints in the original LLaVA repository's layout, e.g. MCG-NJU/p-MoD-LLaVA-v1.5-7B
and MCG-NJU/p-MoD-LLaVA-NeXT-7B.

The original code (haotian-liu/LLaVA and its p-MoD fork) saves `LlavaLlamaForCausalLM`
(model_type "llava_llama") or `PmodLlavaLlamaForCausalLM` ("pmod_llava_llama"):
config.json is a LlamaConfig with the multimodal settings (`mm_*`, `image_aspect_ratio`)
and the p-MoD ones (`mod_*`) at the top level, and the tensors are named

  model.embed_tokens.weight, model.norm.weight, lm_head.weight
  model.layers.{i}.{self_attn,mlp,input_layernorm,post_attention_layernorm}.*   dense
  model.layers.{i}.decoder_layer.*, model.layers.{i}.router.router.{weight,bias} MoD
  model.mm_projector.{0,2}.{weight,bias}                        (mlp2x_gelu: Linear, GELU, Linear)
  model.image_newline                                           LLaVA-NeXT (anyres) only
  model.vision_tower.vision_tower.vision_model.*                (CLIP, when saved with it)

LLaVA-1.5 (`image_aspect_ratio` "pad" or "square") sees one crop per image; LLaVA-NeXT
(llava-v1.6 and p-MoD's NeXT models: "anyres" with `mm_patch_merge_type` "spatial_unpad")
becomes `arch="llava_next"`: a base crop, then the unpadded tile grid with
`image_newline` after each row, tiled at `image_grid_pinpoints`, which the original code
reads as (width, height) pairs (see `original_pinpoints`).

The CLIP tower is the Hugging Face model named by `mm_vision_tower` (a `CLIPVisionModel`,
or a full `CLIPModel` such as openai/clip-vit-large-patch14-336, of which only the vision
half is read); the original loader always reads it from there (the copy a checkpoint may
hold is identical, as the tower is frozen). Here its weights come from
`vision_tower_path` when given, else from the checkpoint, else from `mm_vision_tower`
when that is a local directory.

The p-MoD schedule (`mod_target_layers`, `mod_router_factor`) is turned into the kept
ratio of every layer exactly as the official code computes it, and recorded as
`TextConfig.router_ratios`, which a p-MoD plan with no schedule given runs.

Loading maps these names onto the canonical Hugging Face ones and reuses
`checkpoint.load_params`, so names, shapes and completeness are checked as for any
checkpoint.

The image token: the original code marks the image in the input ids with -200
(IMAGE_TOKEN_INDEX), which is no vocabulary entry, while our model finds the image slots
by a token id inside the vocabulary. `IMAGE_PLACEHOLDER_ID` (Llama's `<unk>`, 0) serves:
image slots are overwritten by visual features before the LLM sees them, so its
embedding is never used, and Llama's byte-fallback tokenizer never emits `<unk>` for
text. The returned tokenizer spells it `<image>`; that alias takes id 0 over from
`<unk>` among the special tokens, so the text "<unk>" is no longer matched as one.
Should text still produce id 0, the prompt holds two image tokens, which
`processing.expand_image_token` rejects. The pad id is moved off it (to EOS), because
our model takes every occurrence of the image id as an image slot.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import pathlib
import re
import warnings
from typing import Any

import numpy as np
import safetensors
import tokenizers

from tokred_jax.io import checkpoint, processing
from tokred_jax.io.checkpoint import CheckpointError
from tokred_jax.models import config as config_lib
from tokred_jax.models.config import LlavaConfig

IMAGE_PLACEHOLDER_ID = 0
MODEL_TYPES = ("llava_llama", "pmod_llava_llama")
# Vision towers LLaVA-1.5 uses, for checkpoints whose `mm_vision_tower` is a hub name.
_KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
    "openai/clip-vit-large-patch14": dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14),
}
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# The official code hard-codes 31 (= L - 1 for its 32-layer LLMs) in its decay schedules.
_OFFICIAL_SPAN = 31
_DECAYS = {
    "shiftedcos": lambda factor, l: math.cos(l * math.pi / _OFFICIAL_SPAN) / 2 + factor,
    "shiftedlinear": lambda factor, l: -l / _OFFICIAL_SPAN + 0.5 + factor,
}

# Original names -> canonical (transformers 5) names; the first match applies.
_RENAMES = (
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^model\.mm_projector\.0\."), "multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "multi_modal_projector.linear_2."),
    (re.compile(r"^model\.layers\.(\d+)\.decoder_layer\."), r"language_model.model.layers.\1."),
    (re.compile(r"^model\.layers\.(\d+)\.router\.router\."),
     r"language_model.model.layers.\1.router."),
    (re.compile(r"^model\.image_newline$"), "image_newline"),
    (re.compile(r"^model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
)
_EMBEDDED_TOWER = "model.vision_tower."
_NEWLINE = "model.image_newline"


def canonical_name(name: str) -> str:
  """The transformers 5 name of a tensor saved by the original LLaVA code."""
  for pattern, replacement in _RENAMES:
    if pattern.match(name):
      return pattern.sub(replacement, name, count=1)
  return name


def _without_tower(name: str) -> str | None:
  return None if name.startswith(_EMBEDDED_TOWER) else canonical_name(name)


def tower_name(name: str) -> str | None:
  """A `CLIPVisionModel` or `CLIPModel` directory's names -> canonical ones: the vision
  part (`vision_model.*`) is the tower; a CLIPModel's text half and projections are left
  out."""
  if not name.startswith("vision_model."):
    return None
  return "vision_tower." + name[len("vision_model."):]


def read_json(file: pathlib.Path, what: str) -> dict[str, Any]:
  try:
    d = json.loads(file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read the {what} {file}: {e}.") from e
  if not isinstance(d, dict):
    raise CheckpointError(f"the {what} {file} holds a JSON {type(d).__name__}, not an object.")
  return d


def _weight_names(path: pathlib.Path) -> list[str]:
  """The tensor names of a directory's safetensors (single file or sharded index)."""
  index = path / checkpoint.INDEX_FILE
  if index.is_file():
    return list(read_json(index, "shard index").get("weight_map", {}))
  single = path / checkpoint.WEIGHTS_FILE
  if single.is_file():
    with safetensors.safe_open(str(single), framework="np") as f:
      return list(f.keys())
  return []


def require_safetensors(path: pathlib.Path) -> None:
  """Original checkpoints saved by older transformers are PyTorch pickles, unreadable
  without torch; say how to convert them."""
  if (path / checkpoint.WEIGHTS_FILE).is_file() or (path / checkpoint.INDEX_FILE).is_file():
    return
  bins = sorted(p.name for p in path.glob("pytorch_model*.bin"))
  if bins:
    raise CheckpointError(
        f"{path} holds PyTorch weights ({', '.join(bins[:3])}{', ...' if len(bins) > 3 else ''}), "
        "which this library reads only as safetensors (it does not import torch). Convert "
        "them once, with torch installed: for each file f, safetensors.torch.save_file("
        "torch.load(f, map_location='cpu'), f.replace('pytorch_model', 'model')"
        ".replace('.bin', '.safetensors'), metadata={'format': 'pt'}), and write "
        f"{checkpoint.INDEX_FILE} from pytorch_model.bin.index.json with the new file names.")
  raise CheckpointError(f"{path} has neither {checkpoint.WEIGHTS_FILE} nor "
                        f"{checkpoint.INDEX_FILE}; it is not a checkpoint directory.")


def _number(d: dict[str, Any], key: str, default: float) -> float:
  value = d.get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise CheckpointError(f"{key} {value!r} is not a number.")
  return float(value)


def _mod_schedule(d: dict[str, Any], num_layers: int) -> tuple[float | None, ...]:
  """The kept ratio each layer was trained at (None: a dense layer), computed from
  `mod_target_layers` and `mod_router_factor` f as the official p-MoD code does:

    "<decay>_decay_<max>_<min>"  layers with decay(f, l) <= max route, at
                                 max(decay(f, l), min); decay: shiftedcos or shiftedlinear
    "deep_all"                   layers 2..L-2 at f ("deep_all_include_last": 2..L-1)
    "interleave"                 layers 1, 3, 5, ... at f

  The official code recomputes the layers from these on load, so a recorded
  `mod_target_layer_indices` that disagrees means weights and schedule do not belong
  together.
  """
  target = d.get("mod_target_layers")
  if not isinstance(target, str):
    raise CheckpointError(f"mod_target_layers {target!r} is missing or not a string: the "
                          "trained schedule is unknown; restore the original config.json.")
  factor = _number(d, "mod_router_factor", 0.5)  # the official training default
  if match := re.fullmatch(r"(\w+)_decay_(\d+\.\d+)_(\d+\.\d+)", target):
    decay, max_ratio, min_ratio = match.group(1), float(match.group(2)), float(match.group(3))
    if decay not in _DECAYS:
      raise CheckpointError(f"mod_target_layers {target!r}: unknown decay {decay!r}; the "
                            f"official code defines {sorted(_DECAYS)}.")
    raw = [_DECAYS[decay](factor, l) for l in range(num_layers)]
    ratios = tuple(max(r, min_ratio) if r <= max_ratio else None for r in raw)
  else:
    fixed = {"deep_all": range(2, num_layers - 1), "deep_all_include_last": range(2, num_layers),
             "interleave": range(1, num_layers, 2)}
    if target not in fixed:
      raise CheckpointError(f"mod_target_layers {target!r} is not one the official p-MoD code "
                            "defines (<decay>_decay_<max>_<min>, deep_all, "
                            "deep_all_include_last, interleave).")
    ratios = tuple(factor if l in fixed[target] else None for l in range(num_layers))
  layers = [l for l, r in enumerate(ratios) if r is not None]
  indices = d.get("mod_target_layer_indices")
  if indices is not None and (not isinstance(indices, list) or sorted(set(indices)) != layers):
    raise CheckpointError(f"mod_target_layer_indices {indices!r} disagree with the layers "
                          f"mod_target_layers {target!r} and mod_router_factor {factor} route "
                          f"({layers}); restore the config.json the weights were saved with.")
  bad = [(l, r) for l, r in enumerate(ratios) if r is not None and not 0 < r <= 1]
  if bad:
    l, r = bad[0]
    raise CheckpointError(f"mod_target_layers {target!r} with mod_router_factor {factor} keeps "
                          f"a ratio {r:.4g} of the visual tokens in layer {l}; this library "
                          "runs ratios in (0, 1] only.")
  return ratios


def _router_alpha(d: dict[str, Any]) -> float:
  """TanhNorm's α from `mod_weight_norm` "tanh_<α>_1" (w = α·tanh(r) + 1)."""
  norm = d.get("mod_weight_norm")
  match = re.fullmatch(r"tanh_(\d+(?:\.\d+)?)_1(?:\.0*)?", str(norm))
  if not match:
    raise CheckpointError(f"mod_weight_norm {norm!r} is not supported: this library "
                          "implements TanhNorm, w = α·tanh(r) + 1, written 'tanh_<α>_1' "
                          "(p-MoD's published models use 'tanh_0.2_1').")
  return float(match.group(1))


def _mod_fields(d: dict[str, Any], num_layers: int, anyres: bool) -> dict[str, Any]:
  """p-MoD settings as `config.text_from_hf` reads them ({} for a dense LLaVA)."""
  if d.get("mod_target_layers") is None and d.get("mod_target_layer_indices") is None:
    if d.get("model_type") == "pmod_llava_llama":
      raise CheckpointError("a pmod_llava_llama config.json without mod_target_layers: "
                            "its MoD layers are unknown; restore the original config.json.")
    return {}
  # The official code reads a missing field as "vision_hr", which routes every visual
  # token of LLaVA-1.5 (as "vision_all") but only the tiles of LLaVA-NeXT.
  token_type = d.get("mod_target_token_type", "vision_hr" if anyres else "vision_all")
  if token_type != "vision_all":
    raise CheckpointError(f"mod_target_token_type {token_type!r} is not supported: only "
                          "'vision_all' (every visual token routed: on LLaVA-NeXT the base "
                          "crop, tiles and newlines; a missing field means 'vision_hr' there).")
  if not d.get("mod_bias_enabled", False):
    raise CheckpointError("mod_bias_enabled is false: routers without a bias are not "
                          "supported (p-MoD's published models have one).")
  ratios = _mod_schedule(d, num_layers)
  return {"mod_router_layers": [l for l, r in enumerate(ratios) if r is not None],
          "mod_router_alpha": _router_alpha(d), "mod_router_ratios": list(ratios)}


def _pinpoint_pairs(value: Any, crop_size: int) -> list[Any]:
  """The (width, height) pairs an `image_grid_pinpoints` spelling stands for."""
  if isinstance(value, str) and "x" in value:
    grids = re.findall(r"\((\d+)x(\d+)\)", value)
    if not grids:
      raise CheckpointError(f"image_grid_pinpoints {value!r} names no grid; write the range "
                            "as (columnsxrows) grids, e.g. '(1x1),...,(3x3)'.")
    (w0, h0), (w1, h1) = (tuple(map(int, g)) for g in (grids[0], grids[-1]))
    return [(w * crop_size, h * crop_size) for w in range(w0, w1 + 1) for h in range(h0, h1 + 1)]
  if isinstance(value, str):
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
      raise CheckpointError(f"image_grid_pinpoints {value!r} is not a list of (width, "
                            f"height) pairs: {e}.") from e
  if not isinstance(value, (list, tuple)) or not value:
    raise CheckpointError(f"image_grid_pinpoints {value!r} is missing or empty; anyres needs "
                          "the tiling resolutions: restore the original config.json.")
  return list(value)


def original_pinpoints(value: Any, crop_size: int) -> tuple[tuple[int, int], ...]:
  """Our (height, width) pinpoints for an original config's `image_grid_pinpoints`.

  The original code (select_best_resolution, resize_and_pad_image in mm_utils.py) takes
  a pinpoint as (width, height) and transformers takes it as (height, width), so each
  pair is swapped and the order kept (the first best fit wins ties in both). Spellings:

    [[w, h], ...]        a JSON list (what LLaVA-1.6 and p-MoD save)
    "[(w, h), ...]"      the same as Python literal text
    "(1x1),...,(3x3)"    LLaVA-VL/LLaVA-NeXT's range: every grid (columns, rows) from the
                         first to the last, columns major, in crops of `crop_size`

  Raises:
    CheckpointError: not one of these, or a size that is not a whole number of crops.
  """
  pinpoints = []
  for pair in _pinpoint_pairs(value, crop_size):
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
      raise CheckpointError(f"image_grid_pinpoints entry {pair!r} is not a (width, height) "
                            "pair of positive integers.")
    w, h = pair
    if w % crop_size or h % crop_size:
      raise CheckpointError(f"image_grid_pinpoints entry {list(pair)} is not a whole number "
                            f"of the tower's {crop_size} px crops a side; restore the "
                            "config.json the weights were trained with.")
    pinpoints.append((h, w))
  return tuple(pinpoints)


def _check_anyres(d: dict[str, Any]) -> None:
  """What LLaVA-NeXT's packing needs from config.json, checked before any weights load."""
  merge = d.get("mm_patch_merge_type", "flat")
  if merge != "spatial_unpad":
    raise CheckpointError(f"mm_patch_merge_type {merge!r} is not supported with "
                          "image_aspect_ratio 'anyres'; only 'spatial_unpad' (LLaVA-NeXT's "
                          "unpadded tile grid with an image_newline after each row).")
  # p-MoD's "anyres_max_N" training: grids over 1.01² · N crops' worth of tokens shrink
  # bilinearly (OneVision's anyres_max_N: over 1.1²), so vision_aspect_ratio cannot stand in.
  if d.get("max_num_patches") is not None:
    raise CheckpointError(f"max_num_patches {d['max_num_patches']!r} (p-MoD's anyres_max "
                          "grid shrink) is not supported; only LLaVA-NeXT trained with plain "
                          "'anyres' (max_num_patches null).")


def _vision_dict(d: dict[str, Any], tower_dir: pathlib.Path | None) -> dict[str, Any]:
  if tower_dir is not None and (tower_dir / checkpoint.CONFIG_FILE).is_file():
    tower = read_json(tower_dir / checkpoint.CONFIG_FILE, "vision tower config")
    if tower.get("model_type") != "clip":
      return tower
    # A full CLIPModel (as openai/clip-vit-large-patch14-336 ships): its vision half.
    vision = tower.get("vision_config")
    if not isinstance(vision, dict):
      raise CheckpointError(f"{tower_dir / checkpoint.CONFIG_FILE} is a CLIPModel config "
                            "without a vision_config object; restore the tower's config.json.")
    return {"model_type": "clip_vision_model", **vision}
  name = d.get("mm_vision_tower")
  if name in _KNOWN_TOWERS:
    return _KNOWN_TOWERS[name]
  raise CheckpointError(
      f"the vision tower {name!r} (mm_vision_tower) is not a local directory with a "
      f"config.json nor a known tower ({', '.join(_KNOWN_TOWERS)}); pass vision_tower_path, "
      "the directory of its Hugging Face CLIPModel or CLIPVisionModel (config.json and "
      "safetensors).")


def original_config(d: dict[str, Any], tower_dir: str | os.PathLike | None = None
                    ) -> LlavaConfig:
  """Our `LlavaConfig` for an original LLaVA / p-MoD `config.json` dict.

  Args:
    d: the checkpoint's config.json.
    tower_dir: a `CLIPVisionModel` or `CLIPModel` directory whose config.json describes
      the tower (a CLIPModel's `vision_config`); when None, `mm_vision_tower` is used if
      it is a local directory or a known tower name.

  Raises:
    CheckpointError: the config describes something this library cannot build.
  """
  if d.get("model_type") not in MODEL_TYPES:
    raise CheckpointError(f"model_type {d.get('model_type')!r} is not an original LLaVA "
                          f"checkpoint ({', '.join(MODEL_TYPES)}); for llava-hf directories "
                          "use checkpoint.load_checkpoint.")
  if (projector := d.get("mm_projector_type", "linear")) != "mlp2x_gelu":
    raise CheckpointError(f"mm_projector_type {projector!r} is not supported; only "
                          "'mlp2x_gelu' (LLaVA-1.5's two-layer MLP).")
  if (select := d.get("mm_vision_select_feature", "patch")) not in _SELECT_FEATURE:
    raise CheckpointError(f"mm_vision_select_feature {select!r} is not supported; use "
                          f"{' or '.join(_SELECT_FEATURE)}.")
  aspect = d.get("image_aspect_ratio", "square")
  if aspect not in ("pad", "square", "anyres"):
    raise CheckpointError(f"image_aspect_ratio {aspect!r} is not supported; use LLaVA-1.5's "
                          "'pad' or 'square', or LLaVA-NeXT's 'anyres'.")
  anyres = aspect == "anyres"
  if anyres:
    _check_anyres(d)
  if d.get("mm_use_im_start_end") or d.get("mm_use_im_patch_token"):
    raise CheckpointError("mm_use_im_start_end / mm_use_im_patch_token add image marker "
                          "tokens, which are not supported.")
  if tower_dir is None and d.get("mm_vision_tower") and os.path.isdir(d["mm_vision_tower"]):
    tower_dir = d["mm_vision_tower"]
  tower_dir = None if tower_dir is None else pathlib.Path(tower_dir)
  try:
    vision = config_lib.vision_from_hf(_vision_dict(d, tower_dir))
    if vision.kind != "clip":
      raise CheckpointError("original LLaVA checkpoints use a CLIP tower.")
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
      raise CheckpointError(f"mm_hidden_size {d['mm_hidden_size']} is not the vision tower's "
                            f"hidden_size {vision.hidden_size}: the tower does not belong "
                            "to this checkpoint.")
    text = config_lib.text_from_hf(
        {**d, "model_type": "llama", **_mod_fields(d, d.get("num_hidden_layers", 32), anyres)})
    if not text.eos_ids or text.eos_ids[0] == IMAGE_PLACEHOLDER_ID:
      raise CheckpointError("the LLM needs an EOS id other than the image placeholder "
                            f"{IMAGE_PLACEHOLDER_ID}, to pad batches with.")
    return LlavaConfig(
        vision=dataclasses.replace(vision, pad_to_square=aspect == "pad"),
        text=text,
        image_token_id=IMAGE_PLACEHOLDER_ID,
        pad_token_id=text.eos_ids[0],
        vision_feature_layer=d.get("mm_vision_select_layer", -2),
        vision_feature_select=_SELECT_FEATURE[select],
        projector_hidden_act="gelu",
        projector_bias=True,
        template="vicuna_v1",  # conv_vicuna_v1: what LLaVA-1.5, -1.6 and p-MoD train with
        arch="llava_next" if anyres else "llava",
        image_grid_pinpoints=(original_pinpoints(d.get("image_grid_pinpoints"),
                                                 vision.image_size) if anyres else ()))
  except CheckpointError:
    raise
  except (ValueError, TypeError, KeyError) as e:  # ConfigError included.
    raise CheckpointError(f"config.json does not describe a supported model: {e}") from e


def placeholder_tokenizer_json(file: pathlib.Path, cfg: LlavaConfig) -> str:
  """`file` (a Llama tokenizer.json) with `<image>` spelling `IMAGE_PLACEHOLDER_ID`, as
  tokenizer.json text.

  Added tokens outside the model's vocabulary (llava-hf's `<image>` 32000 and `<pad>`
  32001) are dropped, so that no prompt can produce an id the embedding lacks.
  tokenizers ignores the ids written for added tokens and takes a token's id from the
  model vocabulary when it is there, hence `<image>` enters that vocabulary as an alias.
  """
  d = read_json(file, "tokenizer")
  model = d.get("model") or {}
  vocab = model.get("vocab")
  if not isinstance(vocab, dict):
    raise CheckpointError(f"{file} has no model vocabulary; use a Llama tokenizer.json "
                          "(e.g. llava-hf/llava-1.5-7b-hf's).")
  size = cfg.text.vocab_size
  too_big = max(vocab.values()) >= size
  unk = next((t for t, i in vocab.items() if i == IMAGE_PLACEHOLDER_ID), None)
  if too_big or unk != model.get("unk_token", "<unk>"):
    raise CheckpointError(f"{file} does not match the LLM's vocabulary (size {size}, "
                          f"'<unk>' at id {IMAGE_PLACEHOLDER_ID}); use a Llama / Vicuna "
                          "tokenizer.json such as llava-hf/llava-1.5-7b-hf's.")
  added = [t for t in d.get("added_tokens") or [] if t.get("id", size) < size
           and t.get("content") != processing.IMAGE_TOKEN]
  added.append(dict(id=IMAGE_PLACEHOLDER_ID, content=processing.IMAGE_TOKEN, single_word=False,
                    lstrip=False, rstrip=False, normalized=False, special=True))
  d["added_tokens"] = added
  vocab[processing.IMAGE_TOKEN] = IMAGE_PLACEHOLDER_ID
  return json.dumps(d)


def placeholder_tokenizer(file: pathlib.Path, cfg: LlavaConfig) -> processing.Tokenizer:
  """The tokenizer of `placeholder_tokenizer_json`."""
  try:
    tok = tokenizers.Tokenizer.from_str(placeholder_tokenizer_json(file, cfg))
  except CheckpointError:
    raise
  except Exception as e:  # tokenizers raises bare Exceptions for unparsable files.
    raise CheckpointError(f"cannot read the tokenizer {file}: {e}") from e
  return processing.Tokenizer(tok, cfg)


def _tokenizer(path: pathlib.Path, tokenizer_path: str | os.PathLike | None,
               cfg: LlavaConfig) -> processing.Tokenizer | None:
  file = pathlib.Path(tokenizer_path) if tokenizer_path is not None else path
  if file.is_dir():
    file = file / checkpoint.TOKENIZER_FILE
  if file.is_file():
    return placeholder_tokenizer(file, cfg)
  if tokenizer_path is not None:
    raise CheckpointError(f"tokenizer file {file} does not exist.")
  warnings.warn(
      f"{path} has no tokenizer.json (original LLaVA checkpoints ship the sentencepiece "
      "tokenizer.model, which this library does not read), so no tokenizer is returned. "
      "Pass tokenizer_path=<a Llama tokenizer.json>, e.g. llava-hf/llava-1.5-7b-hf's, "
      "whose vocabulary extends the original one.", stacklevel=3)
  return None


def load_original(path: str | os.PathLike, vision_tower_path: str | os.PathLike | None = None,
                  tokenizer_path: str | os.PathLike | None = None, dtype: Any = np.float32
                  ) -> tuple[LlavaConfig, checkpoint.Params, processing.Tokenizer | None]:
  """Loads a checkpoint in the original LLaVA / p-MoD repository layout (LLaVA-1.5, or
  LLaVA-NeXT with its image_newline).

  Args:
    path: the checkpoint directory: config.json and safetensors weights (single or
      sharded with an index).
    vision_tower_path: a Hugging Face `CLIPModel` or `CLIPVisionModel` directory
      (config.json, safetensors with `vision_model.*` names; a CLIPModel's text half is
      left out), e.g. openai/clip-vit-large-patch14-336.
      Needed when the checkpoint holds no tower weights and `mm_vision_tower` is not a
      local directory; when given, a tower inside the checkpoint is ignored, as the
      original loader does.
    tokenizer_path: a Llama tokenizer.json (or a directory holding one), e.g. from
      llava-hf/llava-1.5-7b-hf; by default `path/tokenizer.json` if there is one.
    dtype: dtype of the returned arrays; None keeps the stored one.

  Returns:
    (config, params, tokenizer): params in our tree layout; the tokenizer maps `<image>`
    to `IMAGE_PLACEHOLDER_ID`, or is None (with a warning) when there is no tokenizer.json.

  Raises:
    CheckpointError: the directories, config or weights are missing, unsupported or
      disagree with each other.
  """
  path = pathlib.Path(path)
  if not (path / checkpoint.CONFIG_FILE).is_file():
    raise CheckpointError(f"{path} has no {checkpoint.CONFIG_FILE}; pass the checkpoint "
                          "directory of an original LLaVA / p-MoD model.")
  d = read_json(path / checkpoint.CONFIG_FILE, "model config")
  require_safetensors(path)
  tower_dir = vision_tower_path
  embedded = any(n.startswith(_EMBEDDED_TOWER) for n in _weight_names(path))
  if tower_dir is None and not embedded:
    local = d.get("mm_vision_tower")
    if not (local and os.path.isdir(local)):
      raise CheckpointError(
          f"{path} holds no vision tower weights ({_EMBEDDED_TOWER}*) and mm_vision_tower "
          f"{local!r} is not a local directory; pass vision_tower_path, the directory of "
          "its Hugging Face CLIPModel (e.g. openai/clip-vit-large-patch14-336).")
    tower_dir = local
  cfg = original_config(d, tower_dir)
  if cfg.arch == "llava_next" and _NEWLINE not in _weight_names(path):
    raise CheckpointError(f"{path} holds no {_NEWLINE}, the row-end embedding "
                          "mm_patch_merge_type 'spatial_unpad' appends; the weights are "
                          "incomplete or not LLaVA-NeXT's: restore the original safetensors.")
  if tower_dir is not None:  # Given, or the only copy there is.
    tower_dir = pathlib.Path(tower_dir)
    require_safetensors(tower_dir)
    sources = [(path, _without_tower), (tower_dir, tower_name)]
  else:
    sources = [(path, canonical_name)]
  params = checkpoint.load_params(cfg, sources, dtype)
  return cfg, params, _tokenizer(path, tokenizer_path, cfg)
