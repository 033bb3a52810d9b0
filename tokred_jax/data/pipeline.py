"""The training input pipeline: a TFDS data source read through grain, in fixed-shape batches.

  tfds.data_source (random access to array_record)
    -> global shuffle, reseeded every epoch -> repeat -> this host's shard (`shard`)
    -> read + tokenize + normalise (in `worker_count` processes)
    -> leave out bad samples (in this process) -> batch

Leaving samples out after the worker processes, not in them, keeps the batches the same
whatever `worker_count` is (grain hands worker i the elements i, i + n, ... and
interleaves them back in order), keeps the tally of skipped samples in one place, and
lets "error" mode raise in the training process. The iterator's position can be saved
and restored (`get_state` / `set_state`, a JSON-able dict, or grain.checkpoint with
Orbax) to resume mid-epoch with the very same batches; restore it into a pipeline with
the same config, seed and shard (the state's layout depends on `worker_count`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
from absl import flags
import numpy as np
import tensorflow_datasets as tfds

from tokred_jax.data import generated, visual
from tokred_jax.data.conversation import encode_example
from tokred_jax.data.skips import BadSample, SkipLog, check_mode
from tokred_jax.io import batching, processing, templates
from tokred_jax.models.config import LlavaConfig, VisionConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to batch it.

  Attributes:
    dataset: the TFDS name, "llava_conversations/NAME" as `build_dataset` returns it,
      or one of the project's own, "glyph_vqa/CONFIG", "tile_vqa/CONFIG" (anyres models)
      or "video_vqa/CONFIG" (llava_onevision models); see tokred_jax.data.generated.
    data_dir: the TFDS data directory it was built in; None for the generated data
      sets generates their examples on the fly (the same examples).
    batch_size: B, examples per batch (per host when sharded over hosts).
    max_length: T, the fixed sequence length; longer samples are bad ("too long").
    num_epochs: passes over the data; None repeats forever.
    shuffle: shuffle globally, in a different order each epoch, from the seed.
    worker_count: processes that read, tokenize and normalise (0: this process).
    worker_buffer_size: examples each worker prepares ahead.
    on_bad_sample: "skip" leaves samples found bad while reading out (logged with their
      ids), "error" raises `BadSample` naming the first.
    template: the chat template conversations are rendered in (tokred_jax.io.templates);
      None: the model's (`LlavaConfig.template`).
    num_frames: F, the frames of a video sequence (llava_onevision on videos): longer
      videos are sampled uniformly, shorter ones padded (`visual.video_arrays`).
  """
  dataset: str
  data_dir: str | None
  batch_size: int
  max_length: int
  num_epochs: int | None = None
  shuffle: bool = True
  worker_count: int = 0
  worker_buffer_size: int = 8
  on_bad_sample: str = "skip"
  template: str | None = None
  num_frames: int = 16


class _Encode(grain.transforms.Map):
  """A stored example -> the training arrays of one sequence, or the `BadSample`."""

  def __init__(self, tokenizer: processing.Tokenizer, cfg: LlavaConfig, max_length: int,
               num_image_tokens: int, template: templates.Template, kind: str = visual.IMAGE,
               num_frames: int = 0):
    self._tokenizer = tokenizer
    self._cfg = cfg
    self._max_length = max_length
    self._num_image_tokens = num_image_tokens
    self._template = template
    self._kind = kind
    self._num_frames = num_frames
    if kind != visual.IMAGE:
      self._spec = batching.spec_for(cfg)
      self._bucket = visual.training_bucket(self._spec)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray] | BadSample:
    sample_id = element["id"].decode()
    turns = element["conversations"]
    conversations = [{"from": role.decode(), "value": text.decode()}
                     for role, text in zip(turns["from"], turns["value"])]
    try:
      example = encode_example(self._tokenizer, self._cfg, sample_id, conversations,
                               self._max_length, self._num_image_tokens, self._template)
    except BadSample as bad:
      return bad
    if self._kind == visual.ANYRES:
      return example | visual.anyres_arrays(np.asarray(element["image"]), self._spec,
                                            self._bucket)
    if self._kind == visual.VIDEO:
      return example | visual.video_arrays(element["frames"], self._spec, self._num_frames)
    # The stored pixels are already resized, so this only rescales and normalises.
    example["pixel_values"] = processing.preprocess_images(element["image"],
                                                           self._cfg.vision)[0]
    return example


class _KeepGood(grain.transforms.Filter):
  """Drops `BadSample`s into a `SkipLog` (which raises in "error" mode)."""

  def __init__(self, skips: SkipLog):
    self.skips = skips

  def filter(self, element: dict[str, np.ndarray] | BadSample) -> bool:
    return self.skips.record(element if isinstance(element, BadSample) else None)


def _check_images(info: tfds.core.DatasetInfo, vision_cfg: VisionConfig, name: str):
  """Raises ValueError if the stored pixels were not made for this vision tower."""
  size = vision_cfg.image_size
  shape = tuple(info.features["image"].shape)
  kind = (info.metadata or {}).get("vision_kind")
  if shape != (size, size, 3) or kind != vision_cfg.kind:
    raise ValueError(
        f"{name} stores {shape} images resized for a {kind} tower, but the model's "
        f"{vision_cfg.kind} tower takes ({size}, {size}, 3); build the data set again "
        "with this model's vision config (build_dataset(..., vision_cfg=...)).")


def shard(ds: grain.MapDataset, index: int, count: int) -> grain.MapDataset:
  """Host `index` of `count`'s elements of the global stream `ds`: every count-th from
  `index` on, after the shuffle, so that the hosts' batches together hold exactly the
  examples of one host's batch `count` times as large (the same global batches, the rows
  in another order). Shards of an endless stream are endless; those of a finite one
  differ by at most one element, which is why a job of several hosts trains on an
  endless one (`data.num_epochs` unset) and every host runs `num_steps`."""
  return ds if count == 1 else ds[index::count]


def make_dataset(config: DataConfig, split: str, seed: int, *,
                 tokenizer: processing.Tokenizer, model_cfg: LlavaConfig,
                 num_image_tokens: int | None = None, shard_index: int = 0,
                 shard_count: int = 1) -> grain.IterDataset:
  """Batches of training sequences from a data set written by `build_dataset`.

  Args:
    config: what to read and how to batch it.
    split: the split to read, e.g. "train".
    seed: seeds the shuffle (0 <= seed < 2**32); the same seed gives the same batches.
    tokenizer: the checkpoint's tokenizer.
    model_cfg: the model's config (image token id and count, vision tower, arch: the
      kind of visual input, `visual.input_kind`).
    num_image_tokens: image slots per sequence, the reduction plan's `num_visual`
      (fewer than the tower's patches after pre-LLM merging or pooling); None: the
      kind's unreduced count (`visual.num_slots`).
    shard_index: this host's shard, e.g. jax.process_index().
    shard_count: the number of shards, e.g. jax.process_count().

  Returns:
    A grain IterDataset; `iter()` gives an iterator with `get_state`/`set_state`, each
    element a dict of numpy arrays (full batches only, so that shapes never change):
      input_ids: i32[B, T], right-padded with the pad id.
      attention_mask: bool[B, T], False on padding.
      positions: i32[B, T], cumsum(attention_mask) - 1, at least 0.
      pixel_values: f32[B, S, S, 3], normalised as `processing.preprocess_images` does
        (a llava model; anyres and video models get their keys instead, see
        tokred_jax.data.visual: crops and their layout, or frames and frame_valid).
      labels: i32[B, T], the next token id at each position (pad id where none).
      loss_mask: bool[B, T], True where labels[t] is a reply token to learn.
  """
  check_mode(config.on_bad_sample)
  template = templates.get(config.template or model_cfg.template or "tokred")
  template.end_token(tokenizer)  # The tokenizer can end replies as the template does.
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is outside 0..{shard_count - 1}.")
  kind = visual.input_kind(model_cfg, config.dataset)
  if kind == visual.VIDEO and (isinstance(config.num_frames, bool) or
                               not isinstance(config.num_frames, int) or config.num_frames < 1):
    raise ValueError(f"num_frames must be a positive number of frames, got "
                     f"{config.num_frames!r}.")
  if generated.is_generated(config.dataset):
    visual.check_generated(config.dataset, model_cfg)
    source = generated.source(config.dataset, split, config.data_dir)
  else:
    source = tfds.data_source(config.dataset, split=split, data_dir=config.data_dir)
    _check_images(source.dataset_info, model_cfg.vision, config.dataset)
  ds = grain.MapDataset.source(source)
  if config.shuffle:
    ds = ds.shuffle(seed)
  ds = shard(ds.repeat(config.num_epochs), shard_index, shard_count)
  if num_image_tokens is None:
    num_image_tokens = visual.num_slots(model_cfg, kind, config.num_frames)
  ds = ds.map(_Encode(tokenizer, model_cfg, config.max_length, num_image_tokens, template,
                      kind, config.num_frames))
  ds = ds.to_iter_dataset()
  if config.worker_count:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads an absl flag when starting workers in a process that imported
      # jax, and fails if no absl.app parsed the flags (google/grain#1355); the
      # defaults are what it needs.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
  skips = SkipLog(f"reading split {split!r} of {config.dataset}", config.on_bad_sample)
  return ds.filter(_KeepGood(skips)).batch(config.batch_size, drop_remainder=True)
