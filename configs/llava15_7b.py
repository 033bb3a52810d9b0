r"""LLaVA-1.5-7B inference (CLIP ViT-L/14-336 + Vicuna-7B), no token reduction.

Run, from a local copy of llava-hf/llava-1.5-7b-hf (the optional config argument is
the checkpoint directory):

  python infer.py --config=configs/llava15_7b.py:/path/to/llava-1.5-7b-hf

`preset` names the same architecture in tokred_jax/models/presets.py, for what needs no
weights (shape checks, cost tables); inference needs the checkpoint.
"""

from configs import default


def get_config(arg=None):
  """arg: optional checkpoint directory (a Hugging Face LLaVA checkpoint)."""
  config = default.get_config(arg)
  config.preset = "llava-1.5-7b"
  config.dtype = "bfloat16"
  config.max_new_tokens = 64
  return config
