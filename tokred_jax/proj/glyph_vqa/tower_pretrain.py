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

  python -m tokred_jax.proj.glyph_vqa.tower_pretrain --config=configs/glyph_llava.py:tower \
      --workdir=/tmp/glyph/tower --config.data.data_dir=/tmp/tfds

writes WORKDIR/export: a whole LLaVA checkpoint in Hugging Face format (the trained
tower, a new projector and LLM, the glyph tokenizer) that the next stage loads. The
config is checked as train.py checks it before anything is built; a non-finite loss
stops the run (exit status 1) without writing the export; one run at a time holds
WORKDIR.
"""

from __future__ import annotations

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
from tokred_jax.data import glyph_vqa, glyphs
from tokred_jax.io import checkpoint, processing
from tokred_jax.models import llava
from tokred_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from tokred_jax.models.vit import VisionTower
from tokred_jax.train import checks as train_checks
from tokred_jax.train.checkpoint import Diverged, workdir_lock

NUM_DIGITS, NUM_COLOURS = 11, 7  # classes per cell, "empty" last


def model_config(arch: ml_collections.ConfigDict, ids: dict[str, int]) -> LlavaConfig:
  """The LlavaConfig of `config.arch` (VisionConfig / TextConfig fields)."""
  return LlavaConfig(
      vision=VisionConfig(kind="clip", **arch.vision.to_dict()),
      text=TextConfig(kind="llama", vocab_size=arch.vocab_size, bos_token_id=ids["<s>"],
                      eos_token_id=ids["</s>"], **arch.text.to_dict()),
      image_token_id=ids["<image>"], pad_token_id=ids["<pad>"])


class Heads(nn.Module):
  """Readouts of the tower's feature layer: per-patch cell labels, per-colour counts."""

  @nn.compact
  def __call__(self, hidden):
    """hidden: f32[B, 1 + P, D] -> digit f32[B, P, 11], colour f32[B, P, 7],
    counts f32[B, 6, MAX_COUNT + 1]."""
    x = nn.LayerNorm()(hidden)
    counts = nn.Dense(len(glyphs.COLOURS) * (glyphs.MAX_COUNT + 1))(x[:, 0])
    return (nn.Dense(NUM_DIGITS)(x[:, 1:]), nn.Dense(NUM_COLOURS)(x[:, 1:]),
            counts.reshape(-1, len(glyphs.COLOURS), glyphs.MAX_COUNT + 1))


def patch_labels(cells: np.ndarray, grid: int, empty_class: int) -> np.ndarray:
  """i32[..., G, G] cell labels (EMPTY = -1) -> i32[..., grid * grid] per patch."""
  up = grid // cells.shape[-1]
  labels = np.where(cells == glyphs.EMPTY, empty_class, cells)
  return labels.repeat(up, -2).repeat(up, -1).reshape(*cells.shape[:-2], grid * grid)


class _Targets(grain.transforms.Map):
  def __init__(self, cfg: LlavaConfig):
    self._cfg = cfg

  def map(self, element):
    grid = self._cfg.vision.image_size // self._cfg.vision.patch_size
    colours = element["cell_colours"]
    counts = np.array([(colours == c).sum() for c in range(len(glyphs.COLOURS))])
    return {"pixels": processing.preprocess_images(element["image"], self._cfg.vision)[0],
            "digits": patch_labels(element["cell_digits"], grid, NUM_DIGITS - 1),
            "colours": patch_labels(colours, grid, NUM_COLOURS - 1),
            "counts": np.minimum(counts, glyphs.MAX_COUNT).astype(np.int32)}


def batches(config: ml_collections.ConfigDict, cfg: LlavaConfig, split: str, shuffle: bool):
  source = glyph_vqa.source(config.data.dataset, split, config.data.data_dir)
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(config.seed).repeat(None)
  ds = ds.map(_Targets(cfg)).batch(config.data.batch_size, drop_remainder=shuffle)
  if shuffle and config.data.worker_count:
    ds = ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.worker_count))
  return ds


def losses(tower, heads, params, batch):
  hidden = tower.apply({"params": params["vision"]}, batch["pixels"])
  digit, colour, counts = heads.apply({"params": params["heads"]}, hidden)
  ce = optax.softmax_cross_entropy_with_integer_labels
  terms = {"digit": ce(digit, batch["digits"]).mean(),
           "colour": ce(colour, batch["colours"]).mean(),
           "counts": ce(counts, batch["counts"]).mean()}
  correct = {"digit_acc": (digit.argmax(-1) == batch["digits"]).mean(),
             "colour_acc": (colour.argmax(-1) == batch["colours"]).mean(),
             "counts_acc": (counts.argmax(-1) == batch["counts"]).mean()}
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
  # Byte-level BPE on glyph_vqa's sentences: every word becomes one token.
  ids = processing.train_tokenizer(glyphs.corpus(), config.arch.vocab_size, tok_path)
  cfg = model_config(config.arch, ids)
  rng = jax.random.PRNGKey(config.seed)
  params = llava.init_params(cfg, rng)
  tower = VisionTower(cfg.vision, cfg.vision_layers_used)
  heads = Heads()
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
      loss = float(metrics["digit"] + metrics["colour"] + metrics["counts"])
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
