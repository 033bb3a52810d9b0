"""tokred-jax: visual-token reduction for LLaVA-family models in JAX/Flax."""

from tokred_jax.config import LlavaConfig, TextConfig, VisionConfig
from tokred_jax.generate import SamplingConfig

__all__ = ["DEFAULT_CHECKPOINT", "LlavaConfig", "Pipeline", "SamplingConfig", "TextConfig",
           "VisionConfig"]


def __getattr__(name):
  # The pipeline pulls in checkpoint and tokenizer code; load it only when asked for.
  if name in ("Pipeline", "DEFAULT_CHECKPOINT", "pipeline"):
    from tokred_jax import pipeline
    return pipeline if name == "pipeline" else getattr(pipeline, name)
  raise AttributeError(f"module 'tokred_jax' has no attribute {name!r}")
