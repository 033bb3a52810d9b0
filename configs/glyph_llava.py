r"""The default model (tokred_jax/assets/glyph-llava): a small LLaVA trained on glyph_vqa.

Five stages, as LLaVA and p-MoD train theirs; each reads the previous stage's export.
`tools/train_default_model.sh` runs them all; one by one (DATA: a TFDS data dir, RUN:
a work dir; every run resumes from its latest checkpoint when rerun):

  python -m tokred_jax.data.glyph_vqa --data_dir=$DATA
  # 1. tower: the vision tower learns each cell's digit and colour (dense labels).
  python -m tokred_jax.proj.glyph_vqa.tower_pretrain --config=configs/glyph_llava.py:tower \
      --workdir=$RUN/tower --config.data.data_dir=$DATA
  # 2. align: projector + LLM learn to read the visual tokens ("List the digits ...").
  python train.py --config=configs/glyph_llava.py:align --workdir=$RUN/align \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/tower/export
  # 3. instruct: projector + LLM on the four question types.
  python train.py --config=configs/glyph_llava.py:instruct --workdir=$RUN/instruct \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/align/export
  # 4. finetune: the dense model, fine-tuned as stage 5 is but without routers (the
  #    shipped default; the dense control for the p-MoD variants).
  python train.py --config=configs/glyph_llava.py:finetune --workdir=$RUN/finetune \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/instruct/export
  # 5. pmod: the p-MoD variant, fine-tuned from the same dense model with routers added.
  python train.py --config=configs/glyph_llava.py:pmod --workdir=$RUN/pmod \
      --config.data.data_dir=$DATA --config.model.checkpoint=$RUN/instruct/export
  # 5b. p-MoD at a quarter of the visual tokens (constant ratio, every layer routed),
  #     fine-tuned from the shipped dense model (tokred_jax/assets/glyph-llava-pmod-quarter).
  python train.py --config=configs/glyph_llava.py:pmod-constant@0.25 \
      --workdir=$RUN/pmod-quarter --config.data.data_dir=$DATA \
      --config.model.checkpoint=$RUN/finetune/export

The tower stays frozen after stage 1 (LLaVA freezes CLIP). Stage 5 takes a schedule:
`configs/glyph_llava.py:pmod-linear` (or -constant, -cosine), all at the same mean kept
ratio, for the schedule ablation, and optionally another mean: `pmod-constant@0.25`
keeps a quarter of the visual tokens on average. A mean that layers 2-5 alone cannot
reach (below 2/6: layers 0 and 1 stay dense) routes every layer.
"""

import ml_collections

from configs import train_tiny
from tokred_jax.core.suggest import closest
from tokred_jax.methods import pmod

STAGES = ("tower", "align", "instruct", "finetune", "pmod")
# A stage's steps at batch 64; see the README for the time each took.
STEPS = {"tower": 1500, "align": 2000, "instruct": 6000, "finetune": 500, "pmod": 500}
LEARNING_RATES = {"tower": 2e-3, "align": 1e-3, "instruct": 5e-4, "finetune": 2e-4,
                  "pmod": 2e-4}
PMOD_RETENTION = 0.5  # mean kept ratio of visual tokens over all LLM layers
PMOD_LAYERS = (2, 3, 4, 5)
NUM_LAYERS = 6


def architecture() -> ml_collections.ConfigDict:
  """VisionConfig / TextConfig fields: 96 px images in 8 px patches = 144 visual tokens."""
  arch = ml_collections.ConfigDict()
  arch.vocab_size = 384
  arch.vision = dict(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                     image_size=96, patch_size=8)
  arch.text = dict(hidden_size=128, intermediate_size=384, num_layers=NUM_LAYERS, num_heads=4,
                   num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
                   max_position_embeddings=512)
  return arch


def get_config(arg="instruct"):
  """arg: the stage, one of STAGES; "pmod-SCHEDULE[@MEAN]" picks stage 5's schedule and
  mean kept ratio (default PMOD_RETENTION)."""
  head, _, mean = arg.partition("@")
  stage, _, schedule = head.partition("-")
  if stage not in STAGES or ((mean or schedule) and stage != "pmod"):
    raise ValueError(f"unknown stage {arg!r}; use one of {STAGES} (pmod-linear, "
                     "pmod-constant@0.25, ...).")
  if schedule and schedule not in pmod.SCHEDULES:
    raise ValueError(f"{arg!r}: unknown p-MoD schedule {schedule!r}"
                     f"{closest(schedule, pmod.SCHEDULES)}; choose from {pmod.SCHEDULES}, "
                     "e.g. pmod-linear.")
  try:
    retention = float(mean) if mean else PMOD_RETENTION
  except ValueError:
    raise ValueError(f"{arg!r}: write the mean kept ratio as a number, e.g. "
                     "pmod-constant@0.25.") from None
  if not 0 < retention <= 1:
    raise ValueError(f"{arg!r}: the mean kept ratio must be in (0, 1].")
  config = train_tiny.get_config()
  config.num_steps = STEPS[stage]
  config.data.dataset = "glyph_vqa/default"
  config.data.split = "describe" if stage == "align" else "train"
  config.data.batch_size = 64
  config.data.max_length = 208  # 1 BOS + 144 image slots + the longest conversation
  config.optim.learning_rate = LEARNING_RATES[stage]
  config.optim.warmup_fraction = 0.05
  config.optim.weight_decay = 0.01
  config.log_every = 50
  config.checkpoint_every = 500
  if stage == "tower":
    config.arch = architecture()
  if stage == "pmod":
    # Every schedule routes the layers PRD routes in 6 layers (2-5) and keeps the same
    # mean ratio, so that the ablation compares the schedules' shapes alone.
    # Below 2/6 even empty routed layers 2-5 keep too much: then every layer routes.
    route_all = retention < (NUM_LAYERS - len(PMOD_LAYERS)) / NUM_LAYERS
    config.model.method = "pmod"
    config.model.retention = retention
    config.model.add_routers = schedule or "cosine"
    config.model.router_layers = tuple(range(NUM_LAYERS)) if route_all else PMOD_LAYERS
    config.model.schedule_args = {}
    if schedule == "constant":
      config.model.schedule_args = {"last_dense": 0, "first_dense": 0 if route_all else 2}
  return config
