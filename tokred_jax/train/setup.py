"""The model, tokenizer, plan and data a training config describes (see trainer.py).

  cfg = train_setup.model_config(config)       # config.json of the checkpoint or parts
  params = train_setup.load_params(config, cfg)
  dataset = train_setup.make_dataset(config, cfg, train_setup.make_plan(config, cfg))
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from tokred_jax import data, methods
from tokred_jax.data import visual
from tokred_jax.engine.pipeline import TINY_CHECKPOINT
from tokred_jax.io import checkpoint, parts, processing, templates
from tokred_jax.methods import pmod
from tokred_jax.methods.base import Plan
from tokred_jax.models import llava
from tokred_jax.models.config import ConfigError, LlavaConfig
from tokred_jax.train import checks as train_checks

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Batch = dict[str, np.ndarray]
Params = Any


class CheckpointableIterator(Protocol):
  """What the trainer needs from a data pipeline (grain's iterators are such)."""

  def __next__(self) -> Batch: ...
  def get_state(self) -> Any: ...  # JSON-serialisable
  def set_state(self, state: Any) -> None: ...


def _checkpoint_dir(config: ml_collections.ConfigDict) -> str:
  return config.model.checkpoint or TINY_CHECKPOINT


def param_shapes(cfg: LlavaConfig) -> Params:
  """The model's parameter tree as ShapeDtypeStructs (no memory, nothing compiled)."""
  return jax.eval_shape(lambda r: llava.init_params(cfg, r), jax.random.key(0))


def model_config(config: ml_collections.ConfigDict) -> LlavaConfig:
  """The config of `model.checkpoint`, or of the parts `model.llm`, `model.vision_tower`
  and `model.projector` (tokred_jax.io.parts: LLaVA-1.5 before its stage 2); with
  `model.add_routers` (a p-MoD schedule name) and a dense model, p-MoD routers on
  `model.router_layers` if set, else on the layers that schedule routes."""
  from_parts = parts.from_model_config(config.model)
  cfg = (parts.check(*from_parts) if from_parts
         else checkpoint.read_config(_checkpoint_dir(config)))
  if config.data.get("template"):  # trained in it, so the export records it
    try:
      templates.get(config.data.template)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    cfg = dataclasses.replace(cfg, template=config.data.template)
  if config.model.add_routers and not cfg.text.router_layers:
    layers = config.model.get("router_layers") or pmod.router_layers(
        pmod.schedule(config.model.add_routers, cfg.text.num_layers))
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, router_layers=layers))
  return cfg


def load_params(config: ml_collections.ConfigDict, cfg: LlavaConfig) -> Params:
  """Host params of `model.checkpoint` (or its parts) for the model `cfg` (from
  `model_config`): routers it lacks start at zero (pmod.add_routers: the dense model)."""
  from_parts = parts.from_model_config(config.model)
  loaded_cfg, params = (parts.load(*from_parts) if from_parts
                        else checkpoint.load_checkpoint(_checkpoint_dir(config)))
  if loaded_cfg.text.router_layers != cfg.text.router_layers:
    _, params = pmod.add_routers(loaded_cfg, params, cfg.text.router_layers)
  shapes = lambda tree: {k: v.shape for k, v in
                         traverse_util.flatten_dict(tree, sep="/").items()}
  want, have = shapes(param_shapes(cfg)), shapes(params)
  if have != want:
    wrong = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    raise ValueError(f"{_checkpoint_dir(config)} does not hold the model's parameters: "
                     f"{wrong[:5]} are missing, extra or misshapen.")
  return params


def model_tokenizer(config: ml_collections.ConfigDict, cfg: LlavaConfig
                    ) -> processing.Tokenizer:
  """The checkpoint's tokenizer; from parts, `model.tokenizer` (else the LLM's) with
  `<image>` on the image placeholder id."""
  if from_parts := parts.from_model_config(config.model):
    return parts.tokenizer(from_parts[0], config.model.get("tokenizer"), cfg)
  return processing.Tokenizer.load(_checkpoint_dir(config), cfg)


def export_tokenizer(config: ml_collections.ConfigDict, cfg: LlavaConfig, workdir: str
                      ) -> str | None:
  """The tokenizer.json to ship with an export: the checkpoint's if it has one; from
  parts, the placeholder one, written to WORKDIR/tokenizer.json."""
  if from_parts := parts.from_model_config(config.model):
    return parts.write_tokenizer(from_parts[0], config.model.get("tokenizer"), cfg,
                                 os.path.join(workdir, checkpoint.TOKENIZER_FILE))
  tokenizer = os.path.join(_checkpoint_dir(config), checkpoint.TOKENIZER_FILE)
  return tokenizer if os.path.isfile(tokenizer) else None


def make_model(config: ml_collections.ConfigDict, cfg: LlavaConfig) -> llava.Llava:
  """The model to train: `model.dtype` compute, LLM layers rematerialised with
  `model.remat` (their activations recomputed in the backward pass)."""
  return llava.Llava(cfg, DTYPES[config.model.dtype], remat=config.model.get("remat", False))


def make_plan(config: ml_collections.ConfigDict, cfg: LlavaConfig) -> Plan:
  """The reduction plan of the run, for the input bucket of its batches (anyres crops
  and videos: `data.visual.packing`); ValueError if the model cannot train on the data."""
  # p-MoD trains at the schedule its routers were added for.
  kw = ({"schedule": config.model.add_routers, **config.model.get("schedule_args", {})}
        if config.model.method == "pmod" and config.model.add_routers else {})
  recipe = methods.get(config.model.method, cfg, config.model.retention, config.model.mode,
                       **kw)
  kind = visual.input_kind(cfg, config.data.dataset)
  return methods.make_plan(recipe, cfg, visual.packing(cfg, kind, config.data.num_frames))


def make_dataset(config: ml_collections.ConfigDict, cfg: LlavaConfig, plan: Plan
                 ) -> CheckpointableIterator:
  """This host's training iterator: `config.data` holds `data.DataConfig`'s fields;
  `data.dataset = "synthetic"` gives `synthetic_dataset` instead of a TFDS data set."""
  if config.data.dataset == "synthetic":
    return synthetic_dataset(cfg, plan.num_visual, config.data.batch_size,
                             config.data.max_length, config.seed,
                             shard_index=jax.process_index(), shard_count=jax.process_count())
  train_checks.check_data(config)
  tokenizer = model_tokenizer(config, cfg)
  fields = config.data.to_dict()
  split = fields.pop("split", "train")
  return iter(data.make_dataset(
      data.DataConfig(**fields), split, config.seed, tokenizer=tokenizer,
      model_cfg=cfg, num_image_tokens=plan.num_visual, shard_index=jax.process_index(),
      shard_count=jax.process_count()))


def synthetic_dataset(cfg: LlavaConfig, num_visual: int, batch_size: int, seq_len: int,
                      seed: int, num_examples: int = 64, *, shard_index: int = 0,
                      shard_count: int = 1) -> CheckpointableIterator:
  """A learnable toy set as a grain iterator, for smoke tests and throughput runs.

  Each example is [bos, image slots x num_visual, text]: the text counts up through
  the ordinary token ids from a random start (wrapping around), and the loss counts
  its second half. Images are noise. Sharded over hosts like real data
  (`data.pipeline.shard`).
  """
  text = seq_len - 1 - num_visual
  if text < 2:
    raise ValueError(f"a sequence of {seq_len} leaves no text after the bos and "
                     f"{num_visual} image slots; raise data.max_length.")
  special = {cfg.image_token_id, cfg.pad_token_id, cfg.text.bos_token_id,
             cfg.text.eos_token_id}
  ordinary = np.array([i for i in range(cfg.text.vocab_size) if i not in special], np.int32)
  bos = cfg.text.bos_token_id if cfg.text.bos_token_id is not None else ordinary[0]
  s = cfg.vision.image_size

  def example(index):
    rng = np.random.default_rng([seed, index])
    counting = ordinary[(rng.integers(len(ordinary)) + np.arange(text + 1)) % len(ordinary)]
    ids = np.concatenate([[bos], np.full(num_visual, cfg.image_token_id), counting])
    loss_mask = np.zeros(seq_len, bool)
    loss_mask[seq_len - text // 2 - 1:seq_len - 1] = True
    return dict(input_ids=ids[:-1].astype(np.int32), labels=ids[1:].astype(np.int32),
                loss_mask=loss_mask, attention_mask=np.ones(seq_len, bool),
                positions=np.arange(seq_len, dtype=np.int32),
                pixel_values=rng.normal(size=(s, s, 3)).astype(np.float32))

  ds = data.shard(grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(None),
                 shard_index, shard_count)
  ds = ds.map(example).batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset())
