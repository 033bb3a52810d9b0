"""Hugging Face LLaVA checkpoint directories in and out, without torch or transformers.

Which HF tensor is which of our parameters, in what shape and layout, is the
declarative table in hf_params.py; this module reads and writes the files (config.json,
safetensors, sharded or not, tokenizer and chat template), checks names, shapes, dtypes
and values against config.json before a tensor is read, and saves atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from tokred_jax.io import hf_params, templates
# Part of this module's API: what callers check and rename with.
from tokred_jax.io.hf_params import (CheckpointError, canonical_name,  # noqa: F401
                                     param_shapes)
from tokred_jax.models import config as config_lib
from tokred_jax.models.config import LlavaConfig

Params = dict[str, Any]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


def _short_list(names, limit: int = 5) -> str:
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _read_json(file: pathlib.Path, what: str) -> Any:
  try:
    return json.loads(file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file} is not valid JSON ({e}); the {what} is damaged: restore "
                          "it from the original checkpoint.") from e


def read_config(path: str | os.PathLike) -> LlavaConfig:
  """Reads `path/config.json` into a `LlavaConfig`, with checkpoint-level error messages.

  A config.json that records no chat template ("conversation_template") gets the
  default of `templates.default_name` for its LLM and whether it ships a chat template.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise CheckpointError(f"checkpoint directory {path} does not exist (or is not a "
                          "directory); pass the folder that holds config.json and the "
                          "*.safetensors files.")
  file = path / CONFIG_FILE
  if not file.is_file():
    raise CheckpointError(f"{path} has no {CONFIG_FILE}; a Hugging Face LLaVA checkpoint "
                          "needs one next to its weights.")
  d = _read_json(file, "model config")
  if not isinstance(d, dict):
    raise CheckpointError(f"{file} holds a JSON {type(d).__name__}, not an object; restore "
                          "the config.json of the checkpoint.")
  try:
    cfg = config_lib.from_hf_dict(d)
    if cfg.template is not None:
      templates.get(cfg.template)
  except (ValueError, TypeError, KeyError, AttributeError) as e:  # ConfigError included.
    raise CheckpointError(f"{file} does not describe a supported LLaVA model: {e}") from e
  if cfg.template is None:
    cfg = dataclasses.replace(cfg, template=templates.default_name(
        cfg.text.kind, _has_chat_template(path)))
  return cfg


def _has_chat_template(path: pathlib.Path) -> bool:
  """Whether the checkpoint ships a Hugging Face chat template (in its own file, or in
  tokenizer_config.json / processor_config.json, as older transformers wrote it)."""
  if any((path / name).is_file() for name in CHAT_TEMPLATE_FILES):
    return True
  for name in ("tokenizer_config.json", "processor_config.json"):
    try:
      if "chat_template" in json.loads((path / name).read_text()):
        return True
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
      continue  # Absent or unreadable: it ships no template there.
  return False


def _weight_files(path: pathlib.Path) -> dict[str, pathlib.Path] | None:
  """Maps each tensor named in a sharded index to its shard; None for a single file."""
  if (path / WEIGHTS_FILE).is_file():
    return None
  index = path / INDEX_FILE
  if not index.is_file():
    found = sorted(p.name for p in path.iterdir())
    hint = (" It has PyTorch .bin weights: re-save them as safetensors "
            "(save_pretrained(..., safe_serialization=True))."
            if any(n.endswith(".bin") for n in found) else "")
    raise CheckpointError(f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (found: "
                          f"{_short_list(found, 8) or 'nothing'}).{hint}")
  weight_map = _read_json(index, "shard index")
  weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index} has no 'weight_map' object; restore the index file.")
  missing = sorted({s for s in weight_map.values() if not (path / s).is_file()})
  if missing:
    raise CheckpointError(f"{index} names shard(s) that are not in {path}: "
                          f"{_short_list(missing)}; download the missing files.")
  return {name: path / shard for name, shard in weight_map.items()}


def _open(file: pathlib.Path, stack: contextlib.ExitStack):
  try:
    return stack.enter_context(safetensors.safe_open(str(file), framework="np"))
  except Exception as e:  # safetensors raises its own SafetensorError, not an OSError.
    raise CheckpointError(f"cannot read {file}: {e}. The file is truncated or corrupt; "
                          "download it again.") from e


# name -> (file, stored name, shape, stored dtype as safetensors spells it: "F32", "I32")
_Tensors = dict[str, tuple[Any, str, tuple[int, ...], str]]
# Weights are floats; an integer or boolean tensor where one belongs is a broken export.
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _headers(path: pathlib.Path, stack: contextlib.ExitStack,
             rename: Callable[[str], str | None] = canonical_name) -> _Tensors:
  """Opens the weight files of directory `path` (or `path` itself, one safetensors file)
  and reads every tensor's header, under the name `rename` gives it (the canonical one
  by default; None leaves the tensor out)."""
  shard_of = None if path.is_file() else _weight_files(path)
  files = ([path] if path.is_file() else [path / WEIGHTS_FILE] if shard_of is None
           else sorted(set(shard_of.values())))
  tensors: _Tensors = {}
  stored: set[str] = set()
  for file in files:
    handle = _open(file, stack)
    for name in handle.keys():
      if shard_of is not None and shard_of.get(name) != file:
        continue  # The index is authoritative for which shard holds a tensor.
      stored.add(name)
      key = rename(name)
      if key is None:
        continue
      if key in tensors:
        raise CheckpointError(f"tensors {tensors[key][1]!r} and {name!r} are the same "
                              f"weight ({key}) under two name layouts; keep one.")
      header = handle.get_slice(name)
      tensors[key] = (handle, name, tuple(header.get_shape()), header.get_dtype())
  if shard_of is not None:
    absent = set(shard_of) - stored
    if absent:
      raise CheckpointError(f"{path / INDEX_FILE} lists tensors its shards do not hold: "
                            f"{_short_list(absent)}; the shards and index do not match.")
  return tensors


def _check_headers(path: pathlib.Path | str, cfg: LlavaConfig, rules: list[hf_params.Rule],
                   tensors: _Tensors) -> None:
  """Names, shapes and dtypes in the files against what config.json implies."""
  expected = {rule.hf for rule in rules}
  missing = expected - set(tensors)
  if missing:
    raise CheckpointError(
        f"{path} lacks {len(missing)} tensor(s) that config.json requires: "
        f"{_short_list(missing)}. The weights are incomplete or belong to another model.")
  tied_head = {"language_model.lm_head.weight"} if cfg.text.tie_word_embeddings else set()
  unexpected = {tensors[k][1] for k in set(tensors) - expected - tied_head
                if not hf_params.IGNORED.search(k)}
  if unexpected:
    raise CheckpointError(
        f"{path} holds {len(unexpected)} tensor(s) this model does not use: "
        f"{_short_list(unexpected)}. config.json and the weights disagree (e.g. layer "
        "count, tied embeddings, biases) or the checkpoint is not a supported LLaVA.")
  dims = hf_params.dim_sizes(cfg)
  for rule in rules:
    want, got = hf_params.size_of(rule.hf_shape, dims), tensors[rule.hf][2]
    if want != got:
      raise CheckpointError(
          f"tensor {tensors[rule.hf][1]!r} has shape {got} but config.json implies "
          f"{want} = ({hf_params.describe(rule.hf_shape)}): config.json and the weights "
          "disagree; use the config.json that came with these weights.")
    stored_dtype = tensors[rule.hf][3]
    if stored_dtype not in _FLOAT_DTYPES:
      raise CheckpointError(
          f"tensor {tensors[rule.hf][1]!r} in {path} is stored as {stored_dtype}, but "
          f"weights are floating point ({', '.join(_FLOAT_DTYPES)}); the checkpoint was "
          "written wrongly: export it again from the original weights.")


def load_checkpoint(path: str | os.PathLike, dtype: Any = np.float32
                    ) -> tuple[LlavaConfig, Params]:
  """Loads a Hugging Face LLaVA checkpoint directory.

  Every header, name, shape and dtype (floating point) is checked against config.json
  before any tensor is read; each tensor is checked finite as it is read.

  Args:
    path: directory with config.json and model.safetensors (or a sharded
      model.safetensors.index.json plus its shards), in any supported name layout.
    dtype: dtype of the returned arrays (e.g. np.float32, jnp.bfloat16); None keeps
      the stored dtype.

  Returns:
    (config, params): params is a nested dict of numpy arrays in our tree layout.

  Raises:
    CheckpointError: the directory, config or weights are missing, damaged, or disagree.
  """
  path = pathlib.Path(path)
  cfg = read_config(path)
  return cfg, load_params(cfg, [(path, canonical_name)], dtype)


def load_params(cfg: LlavaConfig,
                sources: Sequence[tuple[str | os.PathLike, Callable[[str], str | None]]],
                dtype: Any = np.float32) -> Params:
  """Reads our parameter tree for `cfg` from the weights in one or more directories.

  This is `load_checkpoint` for layouts other than Hugging Face's (e.g. the original
  LLaVA repository's, whose vision tower may live in a directory of its own): each
  source's tensor names are mapped onto the canonical ones, then checked and read alike.

  Args:
    cfg: the model config the weights must match.
    sources: (directory or safetensors file, rename) pairs; rename maps a stored tensor
      name to its canonical (transformers 5) name, or to None to leave that tensor out.
    dtype: as in `load_checkpoint`.

  Returns:
    params: a nested dict of numpy arrays in our tree layout.

  Raises:
    CheckpointError: weights are missing, damaged (not floats, NaN or inf), duplicated or
      disagree with `cfg`.
  """
  rules = hf_params.table(cfg)
  dims = hf_params.dim_sizes(cfg)
  where = " + ".join(str(directory) for directory, _ in sources)
  params: Params = {}
  with contextlib.ExitStack() as stack:
    tensors: _Tensors = {}
    for directory, rename in sources:
      found = _headers(pathlib.Path(directory), stack, rename)
      both = set(found) & set(tensors)
      if both:
        raise CheckpointError(f"{where}: tensor(s) {_short_list(both)} are stored in more "
                              "than one directory; keep one copy.")
      tensors.update(found)
    _check_headers(where, cfg, rules, tensors)
    for rule in rules:
      handle, stored, _, _ = tensors[rule.hf]
      try:
        x = handle.get_tensor(stored)
      except Exception as e:  # Damage past the header only shows when reading.
        raise CheckpointError(f"cannot read tensor {stored!r} in {where}: {e}. The file "
                              "is corrupt; download it again.") from e
      x = np.ascontiguousarray(hf_params.to_ours(rule, x, dims), dtype=dtype)
      _check_finite(x, stored, where)
      hf_params.set_leaf(params, rule.ours, x)
  return params


def _check_finite(x: np.ndarray, stored: str, where: str) -> None:
  """Refuses a tensor holding NaN or inf. One float32 sum is the cheap test (any NaN or
  inf makes it non-finite); only then is every element looked at."""
  with np.errstate(over="ignore"):  # Huge finite values overflow the sum: looked at below.
    if np.isfinite(np.add.reduce(x, axis=None, dtype=np.float32)):
      return
  bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise CheckpointError(f"tensor {stored!r} in {where} holds {bad} NaN or infinite "
                          f"value(s) of {np.size(x)}; the weights are damaged (or were saved "
                          "from a diverged run): use a good copy.")


def _flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[prefix + key] = value
  return flat


def to_hf_tensors(cfg: LlavaConfig, params: Params) -> dict[str, np.ndarray]:
  """Our tree -> the tensors transformers 5 writes, named and shaped as it does.

  Raises:
    CheckpointError: `params` does not match `cfg` (missing, extra or misshapen leaves).
  """
  flat = _flatten(params)
  rules = hf_params.table(cfg)
  expected = {rule.ours for rule in rules}
  missing, extra = expected - set(flat), set(flat) - expected
  if missing or extra:
    raise CheckpointError(
        "params do not match the config: "
        + (f"missing {_short_list(missing)}; " if missing else "")
        + (f"unexpected {_short_list(extra)}; " if extra else "")
        + "pass the config the params were built or loaded with.")
  dims = hf_params.dim_sizes(cfg)
  tensors = {}
  for rule in rules:
    x = np.asarray(flat[rule.ours])
    want = hf_params.size_of(rule.our_shape, dims)
    if x.shape != want:
      raise CheckpointError(f"param {rule.ours} has shape {x.shape} but the config implies "
                            f"{want} = ({hf_params.describe(rule.our_shape)}).")
    tensors[rule.hf] = np.ascontiguousarray(hf_params.to_hf(rule, x, dims))
  return tensors


# Files a save replaces; anything else in an existing checkpoint directory is kept.
def _written_by_save(name: str) -> bool:
  return (name in (CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE)
          or name.endswith((".safetensors", ".bin")))


def save_checkpoint(path: str | os.PathLike, cfg: LlavaConfig, params: Params,
                    tokenizer_json_path: str | os.PathLike | None = None) -> None:
  """Writes a checkpoint directory that transformers 5 loads with no missing keys.

  The files are written to a temporary directory beside `path`, which then replaces
  `path` by renames, so a failure never leaves a half-written checkpoint. If `path`
  already is a checkpoint, the files this does not write (tokenizer_config.json,
  preprocessor_config.json, ...) are carried over; its old weights are not.

  Args:
    path: target directory; created if missing.
    cfg: the model config (written as config.json and generation_config.json).
    params: our parameter tree for `cfg` (numpy or jax arrays; dtypes are kept).
    tokenizer_json_path: a tokenizer.json to copy in, if given.

  Raises:
    CheckpointError: params do not match cfg, the tokenizer file is missing, or `path`
      is an existing non-checkpoint file or directory.
  """
  path = pathlib.Path(path)
  if path.exists() and not (path.is_dir() and ((path / CONFIG_FILE).is_file()
                                               or not any(path.iterdir()))):
    raise CheckpointError(f"{path} exists and is not a checkpoint directory; refusing to "
                          "replace it. Choose a new or empty directory.")
  if tokenizer_json_path is not None and not pathlib.Path(tokenizer_json_path).is_file():
    raise CheckpointError(f"tokenizer file {tokenizer_json_path} does not exist.")
  tensors = to_hf_tensors(cfg, params)  # Validates before anything touches the disk.
  hf_config = config_lib.to_hf_dict(cfg)
  hf_config["dtype"] = str(tensors["language_model.model.embed_tokens.weight"].dtype)
  generation = {k: v for k, v in (("bos_token_id", cfg.text.bos_token_id),
                                  ("eos_token_id", hf_config["text_config"]["eos_token_id"]),
                                  ("pad_token_id", cfg.pad_token_id)) if v is not None}

  path.parent.mkdir(parents=True, exist_ok=True)
  # Not tempfile.mkdtemp: its 0700 mode would stay with the finished checkpoint.
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.mkdir()
  try:
    if path.is_dir():
      for old in path.iterdir():
        if not _written_by_save(old.name):
          copy = shutil.copytree if old.is_dir() else shutil.copy2
          copy(old, tmp / old.name)
    (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_json_path is not None:
      shutil.copyfile(tokenizer_json_path, tmp / TOKENIZER_FILE)
    # transformers refuses safetensors files whose metadata lacks the format tag.
    safetensors.numpy.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the mode (umask) every other file gets.
    shutil.copymode(tmp / CONFIG_FILE, tmp / WEIGHTS_FILE)
    _replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _replace_dir(new: pathlib.Path, target: pathlib.Path) -> None:
  """Moves directory `new` to `target`, replacing any old `target`.

  The old directory is first renamed aside and restored if the move fails; should the
  process die in between, it survives as `.NAME.old-*` next to `target`.
  """
  if not target.exists():
    os.replace(new, target)
    return
  old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
  os.replace(target, old)
  try:
    os.replace(new, target)
  except BaseException:
    os.replace(old, target)
    raise
  shutil.rmtree(old)
