r"""p-MoD fine-tuning of LLaVA-1.5-7B: stage 2 trains the LLM, the projector and the new
routers together, the vision tower frozen (METHODS.md, section 3).

Run, from a local copy of llava-hf/llava-1.5-7b-hf and the 665k instruction mix written
by tokred_jax.data.build_dataset for the 336 px CLIP tower:

  python train.py --config=configs/train_pmod_llava15.py:/path/to/llava-1.5-7b-hf \
      --config.data.dataset=llava_conversations/mix665k_336 \
      --config.data.data_dir=/data/tfds --workdir=/ckpt/pmod-llava15-7b

The recipe: plain cross-entropy on the replies, AdamW at 2e-5 with 3% linear warmup and
cosine decay, no weight decay, global batch 128, one epoch. Zero-initialised routers on
the layers PRD's shifted cosine routes (8..31 of 32), so training starts from the dense
model. `data.batch_size` is per host: on H hosts set it to 128 / H. Raise
`optim.accum_steps` where 128 sequences of 2048 tokens do not fit in one step.
"""

import os

from configs import train_tiny


def get_config(arg=None):
  """arg: the LLaVA-1.5 checkpoint directory (Hugging Face layout); without it, set
  --config.model.checkpoint."""
  if arg is not None and not os.path.isdir(arg):
    raise ValueError(f"configs/train_pmod_llava15.py:{arg}: no such directory; give the "
                     "LLaVA-1.5 checkpoint directory, e.g. "
                     "--config=configs/train_pmod_llava15.py:/path/to/llava-1.5-7b-hf.")
  config = train_tiny.get_config()
  config.model.checkpoint = arg
  config.model.dtype = "bfloat16"
  config.model.method = "pmod"
  config.model.add_routers = "cosine"

  config.data.batch_size = 128
  config.data.max_length = 2048
  config.num_steps = 665_298 // 128  # one epoch of llava_v1_5_mix665k

  config.optim.learning_rate = 2e-5
  config.optim.warmup_fraction = 0.03
  config.optim.weight_decay = 0.0
  config.optim.freeze = "^vision/"

  config.log_every = 10
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  return config
