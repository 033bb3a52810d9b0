r"""Inference with the model embedded in the package, on its sample image.

Run (every field can be overridden, e.g. --config.max_new_tokens=8):

  python infer.py
  python infer.py --image=photo.jpg --prompt="What colour is the car?"
  python infer.py --config=configs/default.py --config.checkpoint=/path/to/llava-hf-dir
  python infer.py --config.mesh=data=1,fsdp=1,tensor=-1
  python infer.py --config.method=aim --config.retention=0.25 --config.plot=aim.png
  python infer.py --config.method=fastv --config.budget=0.5   # half the dense FLOPs
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  """arg: optional checkpoint directory (a Hugging Face LLaVA checkpoint)."""
  config = ml_collections.ConfigDict()
  # None means the model embedded in the package (tokred_jax/assets/glyph-llava).
  config.checkpoint = config_dict.placeholder(str)
  if arg:
    config.checkpoint = arg
  config.dtype = "float32"
  # Token reduction: a name from tokred_jax.methods (METHODS or PRESETS), or a recipe of
  # several joined with "+" (e.g. "tome+fastv", "aim.merge+pmod"), and optionally the
  # fraction of visual tokens to keep on average (None: the method's preset).
  config.method = "none"
  config.retention = config_dict.placeholder(float)
  # The method's options (e.g. {"k": 1} for FastV; for a recipe one dict per part, e.g.
  # {"fastv": {"k": 1}}), as `methods.get` takes them: set in a config file of your own.
  config.options = ml_collections.ConfigDict()
  # Or a budget the method's parameters are solved for (tokred_jax.engine.budget), at
  # this prompt's length: a fraction of dense prefill FLOPs (budget_measure "flops"), of the
  # dense KV cache ("kv"), or a count of equivalent visual tokens ("tokens").
  config.budget = config_dict.placeholder(float)
  config.budget_measure = "flops"
  config.mode = "fast"
  # The chat template the question is written in (tokred_jax.io.templates: tokred, llava-hf,
  # vicuna_v1, llava_v1, qwen); "": the checkpoint's own.
  config.template = ""
  # A PNG path: draws which image patches survive each stage ("" draws nothing).
  config.plot = ""
  # Frames sampled uniformly from a --video (LLaVA-OneVision).
  config.num_frames = 32
  config.max_new_tokens = 24
  config.temperature = 0.0
  config.top_p = 1.0
  config.seed = 0
  # Device mesh as "data=1,fsdp=1,tensor=-1" (-1: the remaining devices); "" runs on
  # one device. The prompt is repeated over data x fsdp, which split the batch.
  config.mesh = ""
  # Run once before timing, so the latency printed excludes compilation.
  config.warmup = True
  return config
