r"""A composed recipe in a config file: ToMe in the tower, then FastV in the LLM.

  python infer.py --config=configs/recipe.py
  python infer.py --config=configs/recipe.py --config.retention=0.5
  python infer.py --config=configs/recipe.py --config.budget=0.4   # at 40% of dense FLOPs

The parts share the retention (ToMe keeps its square root, FastV the rest: see
tokred_jax/methods/registry.py); options go per part. Any infer.py option applies.
"""

import ml_collections

from configs import default


def get_config(arg=None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.method = "tome+fastv"
  config.retention = 0.25
  # FastV prunes after its first layer, so a shallow model can reach low retentions.
  config.options = ml_collections.ConfigDict({"fastv": {"k": 1}})
  return config
