r"""Trains the embedded tiny model (tokred_jax/assets/tiny-llava) for a few hundred steps.

Run (every field can be overridden, e.g. --config.num_steps=50):

  python train.py --config=configs/train_tiny.py:synthetic --workdir=/tmp/tiny-synthetic
  python train.py --config=configs/train_tiny.py --workdir=/tmp/tiny-run \
      --config.data.dataset=llava_conversations/NAME --config.data.data_dir=/data/tfds
  python train.py --config=configs/train_tiny.py:synthetic --workdir=/tmp/tiny-synthetic \
      --export_only

The data set is one written by tokred_jax.data.build_dataset for this model's vision
tower (112 px). Rerunning a command resumes from the latest complete checkpoint in
--workdir. Metrics go to WORKDIR/tensorboard (`tensorboard --logdir=WORKDIR`), the
trained model to WORKDIR/export as a Hugging Face LLaVA directory (`python infer.py
--checkpoint=WORKDIR/export`).
"""

import ml_collections
from ml_collections import config_dict


ARGS = ("synthetic",)


def get_config(arg=None):
  """arg: "synthetic" trains on the built-in toy set (else set config.data.dataset)."""
  if arg not in (None, *ARGS):
    raise ValueError(f"configs/train_tiny.py takes no argument or one of {ARGS}, not "
                     f"{arg!r}: e.g. --config=configs/train_tiny.py:synthetic.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_steps = 300

  config.model = ml_collections.ConfigDict()
  # A Hugging Face LLaVA directory; None: the embedded random-weight tiny model.
  config.model.checkpoint = config_dict.placeholder(str)
  config.model.dtype = "float32"  # compute dtype; parameters stay float32
  # Recompute each LLM layer's activations in the backward pass (jax.checkpoint per
  # decoder layer): less memory for about a third more compute.
  config.model.remat = False
  # Token reduction during training: a name from tokred_jax.methods ("none": off).
  config.model.method = "none"
  config.model.retention = config_dict.placeholder(float)
  config.model.mode = "fast"
  # A p-MoD schedule name (tokred_jax.methods.pmod.SCHEDULES, e.g. "cosine"): a dense checkpoint
  # gets zero-initialised routers on the layers it routes. "": none added.
  config.model.add_routers = ""

  # The fields of tokred_jax.data.DataConfig; dataset "synthetic" is a toy counting task
  # that needs no files (tokred_jax.train.setup.synthetic_dataset).
  config.data = ml_collections.ConfigDict()
  config.data.dataset = "synthetic" if arg == "synthetic" else config_dict.placeholder(str)
  config.data.data_dir = config_dict.placeholder(str)
  config.data.batch_size = 8  # per host and optimizer step (all micro-batches)
  config.data.max_length = 96  # the tiny model: 1 bos + 64 image slots + 31 text tokens
  config.data.num_epochs = config_dict.placeholder(int)  # None: repeat forever
  config.data.shuffle = True
  config.data.worker_count = 0
  config.data.worker_buffer_size = 8
  config.data.on_bad_sample = "skip"
  # The chat template conversations are rendered in (tokred_jax.io.templates); "": the
  # checkpoint's own. The export records it.
  config.data.template = ""
  # Frames a video sequence holds (llava_onevision models on videos): longer videos are
  # sampled uniformly, shorter ones padded.
  config.data.num_frames = 16

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3
  config.optim.end_learning_rate = 0.0
  config.optim.warmup_fraction = 0.03
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 1.0
  config.optim.accum_steps = 1
  # Parameters whose path ("vision/layers_0/attn/q/kernel") matches are not trained;
  # p-MoD and LLaVA's fine-tuning stage freeze the vision tower.
  config.optim.freeze = "^vision/"

  # Device mesh as "data=1,fsdp=-1,tensor=1" (-1: the remaining devices); "": data
  # parallel over every device.
  config.mesh = "data=1,fsdp=-1,tensor=1"
  config.log_every = 10
  config.checkpoint_every = 100
  config.keep_checkpoints = 2
  config.export = True
  config.export_dir = ""  # "": WORKDIR/export
  return config
