"""Stage 1 of the default model's recipe: a new LLaVA whose vision tower learned glyph_vqa.

LLaVA starts from a CLIP tower that already sees; ours starts from nothing, and a tower
trained only through the LLM's answer loss learns where things are very slowly (it
learns colour counts first). So, as CLIP's contrastive pretraining does for LLaVA, the
tower is pretrained on its own, here with dense labels the renderer knows: every patch
token learns the digit and the colour of the grid cell it lies in (11 and 7 classes,
"empty" included), and the CLS token learns how many digits of each colour there are.
Patch labels keep each item's identity in its own patches, which is what makes the
choice of kept tokens matter downstream; the CLS target makes the CLS token attend to
the items, which MustDrop's key-token selection reads.

The same stage starts the tiled and video models of tile_vqa and video_vqa
(configs/tile_llava.py, configs/video_llava.py): the tower sees each anyres crop, or
each frame, as an image of its own; a tile's patches learn the digit whose box they
overlap (the base crop, where digits are too small to read, and padding learn nothing),
a frame's patches their cell's labels. Those towers have no counts head (SigLIP has no
CLS token to read it from).

  python -m tokred_jax.proj.glyph_vqa.tower_pretrain --config=configs/glyph_llava.py:tower \
      --workdir=/tmp/glyph/tower --config.data.data_dir=/tmp/tfds

writes WORKDIR/export: a whole LLaVA checkpoint in Hugging Face format (the trained
tower, a new projector and LLM, the glyph tokenizer) that the next stage loads. The
config is checked as train.py checks it before anything is built; a non-finite loss
stops the run (exit status 1) without writing the export; one run at a time holds
WORKDIR.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import flags
from flax import linen as nn

from tokred_jax import cli
from tokred_jax.data import generated, glyphs, tile_vqa, visual
from tokred_jax.io import anyres, batching, checkpoint, processing, video
from tokred_jax.models import llava
from tokred_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from tokred_jax.models.vit import VisionTower
from tokred_jax.train import checks as train_checks
from tokred_jax.train.checkpoint import Diverged, workdir_lock

NUM_DIGITS, NUM_COLOURS = 11, 7  # classes per cell, "empty" last
IGNORE = -1  # the label of a patch that learns nothing (anyres base and padding crops)


def model_config(arch: ml_collections.ConfigDict, ids: dict[str, int]) -> LlavaConfig:
  """The LlavaConfig of `config.arch`: VisionConfig / TextConfig fields (a CLIP tower
  and a Llama LLM unless they name their kind), and in `arch.llava` any other
  LlavaConfig fields (e.g. arch="llava_next" and its pinpoints)."""
  return LlavaConfig(
      vision=VisionConfig(**{"kind": "clip", **arch.vision.to_dict()}),
      text=TextConfig(**{"kind": "llama", "vocab_size": arch.vocab_size,
                         "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"],
                         **arch.text.to_dict()}),
      image_token_id=ids["<image>"], pad_token_id=ids["<pad>"],
      **arch.get("llava", ml_collections.ConfigDict()).to_dict())


class Heads(nn.Module):
  """Readouts of the tower's feature layer: per-patch cell labels, and from the CLS
  token per-colour counts (`counts`: glyph_vqa's images)."""
  has_cls: bool = True
  counts: bool = True

  @nn.compact
  def __call__(self, hidden):
    """hidden: f32[B, C + P, D] (C: 1 with a CLS token) -> digit f32[B, P, 11],
    colour f32[B, P, 7], counts f32[B, 6, MAX_COUNT + 1] (None without `counts`)."""
    x = nn.LayerNorm()(hidden)
    counts = None
    if self.counts:
      counts = nn.Dense(len(glyphs.COLOURS) * (glyphs.MAX_COUNT + 1))(x[:, 0])
      counts = counts.reshape(-1, len(glyphs.COLOURS), glyphs.MAX_COUNT + 1)
    patches = x[:, int(self.has_cls):]
    return nn.Dense(NUM_DIGITS)(patches), nn.Dense(NUM_COLOURS)(patches), counts


def patch_labels(cells: np.ndarray, grid: int, empty_class: int) -> np.ndarray:
  """i32[..., G, G] cell labels (EMPTY = -1) -> i32[..., grid * grid] per patch."""
  up = grid // cells.shape[-1]
  labels = np.where(cells == glyphs.EMPTY, empty_class, cells)
  return labels.repeat(up, -2).repeat(up, -1).reshape(*cells.shape[:-2], grid * grid)


def tile_labels(items: np.ndarray, size_hw: tuple[int, int], spec: anyres.AnyresSpec,
                num_crops: int) -> tuple[np.ndarray, np.ndarray]:
  """Digit and colour classes i32[num_crops, g * g] of the patches of a tile_vqa image's
  anyres crops: a tile's patch that a digit's box overlaps takes its classes, the others
  "empty"; the base crop (where digits are too small to read) and padding crops IGNORE."""
  g, s = spec.grid, spec.crop_size
  rows, cols = anyres.grid_shape(size_hw, spec.pinpoints, s)
  digits = np.full((num_crops, g, g), IGNORE, np.int32)
  colours = digits.copy()
  digits[1:1 + rows * cols], colours[1:1 + rows * cols] = NUM_DIGITS - 1, NUM_COLOURS - 1
  (top, down), (left, across) = tile_vqa.spans(size_hw)
  for y, x, digit, colour in items.tolist():
    y0, x0 = top + y * down, left + x * across  # the box in the tile grid's pixels
    y1, x1 = y0 + tile_vqa.DIGIT_H * down, x0 + tile_vqa.DIGIT_W * across
    crop = 1 + int(y0 // s) * cols + int(x0 // s)  # each digit lies whole in one tile
    ys = slice(int((y0 % s) * g // s), math.ceil((y1 - y0 // s * s) * g / s))
    xs = slice(int((x0 % s) * g // s), math.ceil((x1 - x0 // s * s) * g / s))
    digits[crop, ys, xs], colours[crop, ys, xs] = digit, colour
  return digits.reshape(num_crops, -1), colours.reshape(num_crops, -1)


class _Targets(grain.transforms.Map):
  """An example -> the tower's inputs and per-patch labels: glyph_vqa's image, tile_vqa's
  anyres crops (`tile_labels`) or video_vqa's frames (each frame's cell labels)."""

  def __init__(self, cfg: LlavaConfig, dataset: str, num_frames: int):
    self._cfg, self._name, self._num_frames = cfg, generated.name_of(dataset), num_frames

  def map(self, element):
    grid = self._cfg.vision.image_size // self._cfg.vision.patch_size
    if self._name == "tile_vqa":
      spec = batching.spec_for(self._cfg)
      bucket = visual.training_bucket(spec)
      image = np.asarray(element["image"])
      digits, colours = tile_labels(element["items"], image.shape[:2], spec, bucket.num_crops)
      return {"pixels": visual.anyres_arrays(image, spec, bucket)["crops"],
              "digits": digits, "colours": colours}
    if self._name == "video_vqa":
      arrays = visual.video_arrays(element["frames"], batching.spec_for(self._cfg),
                                   self._num_frames)
      n, kept = len(element["frames"]), int(arrays["frame_valid"].sum())
      picked = np.arange(n) if n == kept else video.sample_frame_indices(n, kept)
      pad = ((0, self._num_frames - kept), (0, 0))
      label = lambda cells, empty: np.pad(patch_labels(cells[picked], grid, empty), pad,
                                          constant_values=IGNORE)
      return {"pixels": arrays["frames"],
              "digits": label(element["cell_digits"], NUM_DIGITS - 1),
              "colours": label(element["cell_colours"], NUM_COLOURS - 1)}
    colours = element["cell_colours"]
    counts = np.array([(colours == c).sum() for c in range(len(glyphs.COLOURS))])
    return {"pixels": processing.preprocess_images(element["image"], self._cfg.vision)[0],
            "digits": patch_labels(element["cell_digits"], grid, NUM_DIGITS - 1),
            "colours": patch_labels(colours, grid, NUM_COLOURS - 1),
            "counts": np.minimum(counts, glyphs.MAX_COUNT).astype(np.int32)}


def batches(config: ml_collections.ConfigDict, cfg: LlavaConfig, split: str, shuffle: bool):
  source = generated.source(config.data.dataset, split, config.data.data_dir)
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(config.seed).repeat(None)
  ds = ds.map(_Targets(cfg, config.data.dataset, config.data.num_frames))
  ds = ds.batch(config.data.batch_size, drop_remainder=shuffle)
  if shuffle and config.data.worker_count:
    ds = ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.worker_count))
  return ds


def losses(tower, heads, params, batch):
  """The summed cross-entropies and the metrics of a batch: pixels f32[B, S, S, 3] with
  labels i32[B, P] (glyph_vqa, with counts), or f32[B, K, S, S, 3] crops or frames with
  labels i32[B, K, P], IGNORE on patches that learn nothing."""
  pixels = batch["pixels"]
  hidden = tower.apply({"params": params["vision"]}, pixels.reshape((-1,) + pixels.shape[-3:]))
  digit, colour, counts = heads.apply({"params": params["heads"]}, hidden)
  ce = optax.softmax_cross_entropy_with_integer_labels
  if counts is not None:
    terms = {"digit": ce(digit, batch["digits"]).mean(),
             "colour": ce(colour, batch["colours"]).mean(),
             "counts": ce(counts, batch["counts"]).mean()}
    correct = {"digit_acc": (digit.argmax(-1) == batch["digits"]).mean(),
               "colour_acc": (colour.argmax(-1) == batch["colours"]).mean(),
               "counts_acc": (counts.argmax(-1) == batch["counts"]).mean()}
    return sum(terms.values()), {**terms, **correct}
  terms, correct = {}, {}
  for name, logits in (("digit", digit), ("colour", colour)):
    labels = batch[f"{name}s"].reshape(logits.shape[:-1])
    learn = labels != IGNORE
    count = jnp.maximum(learn.sum(), 1)
    terms[name] = jnp.where(learn, ce(logits, jnp.maximum(labels, 0)), 0).sum() / count
    correct[f"{name}_acc"] = (learn & (logits.argmax(-1) == labels)).sum() / count
  return sum(terms.values()), {**terms, **correct}


def train(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Pretrains the tower; writes and returns WORKDIR/export (a new LLaVA checkpoint).
  ValueError for bad input, before anything is built; `Diverged` for a non-finite loss."""
  train_checks.check_config(config, ("float32",))
  train_checks.check_workdir(workdir, create=True)
  train_checks.check_data(config)
  with workdir_lock(workdir):
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> str:
  tok_path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
  # Byte-level BPE on the data set's sentences: every word becomes one token.
  glyph = generated.name_of(config.data.dataset) == "glyph_vqa"
  corpus = glyphs.corpus() if glyph else generated.corpus(config.data.dataset)
  ids = processing.train_tokenizer(corpus, config.arch.vocab_size, tok_path)
  cfg = model_config(config.arch, ids)
  visual.input_kind(cfg, config.data.dataset)  # the model can train on the data set
  visual.check_generated(config.data.dataset, cfg)
  rng = jax.random.PRNGKey(config.seed)
  params = llava.init_params(cfg, rng)
  tower = VisionTower(cfg.vision, cfg.vision_layers_used)
  heads = Heads(cfg.vision.has_cls, counts=glyph)
  hidden_shape = jax.ShapeDtypeStruct((1, cfg.vision.seq_len, cfg.vision.hidden_size),
                                      jnp.float32)
  trainable = {"vision": params["vision"],
               "heads": heads.init(jax.random.fold_in(rng, 1), jnp.zeros(hidden_shape.shape,
                                                                         jnp.float32))["params"]}
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.optim.learning_rate,
                                                int(config.num_steps * 0.05), config.num_steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=config.optim.weight_decay))
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, batch):
    (_, metrics), grads = jax.value_and_grad(
        lambda p: losses(tower, heads, p, batch), has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, metrics

  data = iter(batches(config, cfg, "train", shuffle=True))
  start = time.perf_counter()
  bar = tqdm.tqdm(range(1, config.num_steps + 1), desc="tower", unit="step")
  for i in bar:
    trainable, opt_state, metrics = step(trainable, opt_state, next(data))
    if i % config.log_every == 0 or i == config.num_steps:
      loss = float(sum(v for k, v in metrics.items() if "acc" not in k))
      if not np.isfinite(loss):
        raise Diverged(f"step {i}: the loss is not finite ({loss}); stopped without "
                       "writing the export: lower optim.learning_rate.")
      bar.set_postfix({k: f"{float(v):.3f}" for k, v in metrics.items() if "acc" in k})
  minutes = (time.perf_counter() - start) / 60

  evaluate = jax.jit(lambda p, b: losses(tower, heads, p, b)[1])
  scores = [evaluate(trainable, b) for b in batches(config, cfg, "validation", shuffle=False)]
  summary = {k: float(np.mean([s[k] for s in scores])) for k in scores[0] if "acc" in k}
  print(f"tower pretrained in {minutes:.1f} min; validation per-patch accuracy: " +
        ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
  params = dict(params, vision=trainable["vision"])
  out = os.path.join(workdir, "export")
  checkpoint.save_checkpoint(out, cfg, jax.tree_util.tree_map(np.asarray, params), tok_path)
  return out


def main(argv):
  del argv
  try:
    print(f"wrote {train(_CONFIG.value, _WORKDIR.value)}")
  except Diverged as e:
    raise cli.fail(e) from None


if __name__ == "__main__":
  _CONFIG = cli.define_config("config", None, "configs/glyph_llava.py:tower",
                              lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "The checkpoint goes to WORKDIR/export.",
                                 required=True)
  flags.mark_flags_as_required(["config"])
  cli.run(main)
