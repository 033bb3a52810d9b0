r"""A small LLaVA-NeXT-style model for tile_vqa: anyres tiles of 64 px (none is shipped yet).

glyph-llava's sizes (configs/glyph_llava.py) with a CLIP tower at 64 px in 8 px patches
(64 visual tokens a crop) that cuts each image at tile_vqa's pinpoints (2x2 to 3x3, 2x4,
4x2 tiles), so a sequence holds up to 64 + 24 x (24 + 1) = 664 visual slots. Four
stages, each reading the previous one's export (DATA: a TFDS data dir; leave out
--config.data.data_dir to generate the examples on the fly; RUN: a work dir):

  python -m tokred_jax.data.tile_vqa --data_dir=$DATA
  # 1. tower: each tile's patches learn the digit and colour they show.
  python -m tokred_jax.proj.glyph_vqa.tower_pretrain --config=configs/tile_llava.py:tower \
      --workdir=$RUN/tower --config.data.data_dir=$DATA
  # 2. align: projector + LLM learn to read the visual tokens ("List the digits ...").
  python train.py --config=configs/tile_llava.py:align --workdir=$RUN/align \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/tower/export
  # 3. instruct: projector + LLM on the four question types.
  python train.py --config=configs/tile_llava.py:instruct --workdir=$RUN/instruct \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/align/export
  # 4. finetune: a shorter pass at a lower learning rate.
  python train.py --config=configs/tile_llava.py:finetune --workdir=$RUN/finetune \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/instruct/export
  python -m benchmarks.evaluate --checkpoint=$RUN/finetune/export --dataset=tile_vqa/default \
      --data_dir=$DATA --variants= --json=tile.json --markdown=tile.md --plot=tile.png

Every batch is padded to the largest bucket (10 crops, 664 slots): a step runs a
sequence 3.5x glyph-llava's (T = 736 against 208) and 10 crops through the tower. The
step counts are glyph-llava's, not yet tried here.
"""

import ml_collections

from configs import glyph_llava
from tokred_jax.data import tile_vqa

STAGES = ("tower", "align", "instruct", "finetune")
MAX_LENGTH = 736  # 1 BOS + 664 visual slots + the longest conversation (58 tokens), rounded


def architecture() -> ml_collections.ConfigDict:
  """glyph-llava's widths and depths, at tile_vqa's crop size and pinpoints."""
  arch = glyph_llava.architecture()
  arch.vision.image_size = tile_vqa.TILE
  arch.text.max_position_embeddings = 1024
  arch.llava = dict(arch="llava_next", image_grid_pinpoints=tile_vqa.PINPOINTS)
  return arch


def get_config(arg="instruct"):
  """arg: the stage, one of STAGES."""
  if arg not in STAGES:
    raise ValueError(f"unknown stage {arg!r}; use one of {STAGES}.")
  config = glyph_llava.get_config(arg)
  config.data.dataset = "tile_vqa/default"
  config.data.max_length = MAX_LENGTH
  if arg == "tower":
    config.arch = architecture()
  return config
