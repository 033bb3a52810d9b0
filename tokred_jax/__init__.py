"""tokred-jax: visual-token reduction for LLaVA-family models in JAX/Flax."""

from tokred_jax.config import LlavaConfig, TextConfig, VisionConfig
from tokred_jax.generate import SamplingConfig
from tokred_jax.pipeline import (DEFAULT_CHECKPOINT, PMOD_CHECKPOINT, PMOD_QUARTER_CHECKPOINT,
                                 TINY_CHECKPOINT, Pipeline)

__all__ = ["DEFAULT_CHECKPOINT", "LlavaConfig", "PMOD_CHECKPOINT", "PMOD_QUARTER_CHECKPOINT",
           "Pipeline", "SamplingConfig", "TextConfig", "TINY_CHECKPOINT", "VisionConfig"]
