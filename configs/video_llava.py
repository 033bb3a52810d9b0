r"""A small LLaVA-OneVision-style model for video_vqa: 16 frames of 64 px (none is shipped yet).

glyph-llava's sizes (configs/glyph_llava.py) with a SigLIP-style tower (no CLS token;
the last layer's features, all of them) at 64 px in 8 px patches, whose 8 x 8 tokens a
frame OneVision pools to 4 x 4 (one a cell), and a Qwen2-style LLM (q/k/v bias): a
video of up to 16 frames is 16 x 16 + 1 = 257 visual slots. Four stages, each reading
the previous one's export (DATA: a TFDS data dir; leave out --config.data.data_dir to
generate the examples on the fly; RUN: a work dir):

  python -m tokred_jax.data.video_vqa --data_dir=$DATA
  # 1. tower: each frame's patches learn their cell's digit and colour.
  python -m tokred_jax.proj.glyph_vqa.tower_pretrain --config=configs/video_llava.py:tower \
      --workdir=$RUN/tower --config.data.data_dir=$DATA
  # 2. align: projector + LLM learn to read the frames ("List the digits in the first
  #    frame." and in the last).
  python train.py --config=configs/video_llava.py:align --workdir=$RUN/align \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/tower/export
  # 3. instruct: projector + LLM on the six question types.
  python train.py --config=configs/video_llava.py:instruct --workdir=$RUN/instruct \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/align/export
  # 4. finetune: a shorter pass at a lower learning rate.
  python train.py --config=configs/video_llava.py:finetune --workdir=$RUN/finetune \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/instruct/export
  python -m benchmarks.evaluate --checkpoint=$RUN/finetune/export --dataset=video_vqa/default \
      --data_dir=$DATA --variants= --json=video.json --markdown=video.md --plot=video.png

Videos of 8 frames are padded to 16 (their empty frames masked); the tower stage sees
the 8 frames every video has at least (16-frame videos sampled uniformly). A step runs a
sequence 2.2x glyph-llava's (T = 448 against 208) and 16 frames through the tower. The
step counts are glyph-llava's, not yet tried here.
"""

import ml_collections

from configs import glyph_llava
from tokred_jax.data import video_vqa

STAGES = ("tower", "align", "instruct", "finetune")
MAX_LENGTH = 448  # 1 BOS + 257 visual slots + the longest conversation (175 tokens), rounded
NUM_FRAMES = max(video_vqa.FRAME_COUNTS)
TOWER_FRAMES = min(video_vqa.FRAME_COUNTS)


def architecture() -> ml_collections.ConfigDict:
  """glyph-llava's widths and depths: a SigLIP-style tower at video_vqa's frame size,
  a Qwen2-style LLM."""
  arch = glyph_llava.architecture()
  arch.vision.update(kind="siglip", image_size=video_vqa.FRAME, hidden_act="gelu_pytorch_tanh",
                     layer_norm_eps=1e-6, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
  arch.text.update(kind="qwen2", attention_bias=True)
  # OneVision's image input tiles too; these pinpoints only matter for images.
  arch.llava = dict(arch="llava_onevision", image_grid_pinpoints=((64, 64),),
                    vision_feature_layer=-1, vision_feature_select="full", template="tokred")
  return arch


def get_config(arg="instruct"):
  """arg: the stage, one of STAGES."""
  if arg not in STAGES:
    raise ValueError(f"unknown stage {arg!r}; use one of {STAGES}.")
  config = glyph_llava.get_config(arg)
  config.data.dataset = "video_vqa/default"
  config.data.max_length = MAX_LENGTH
  config.data.num_frames = NUM_FRAMES
  if arg == "tower":
    config.arch = architecture()
    config.data.num_frames = TOWER_FRAMES
  return config
