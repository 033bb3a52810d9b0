"""tokred-jax: visual-token reduction for LLaVA-family models in JAX/Flax."""

from tokred_jax.engine.generate import SamplingConfig
from tokred_jax.engine.pipeline import (DEFAULT_CHECKPOINT, PMOD_CHECKPOINT,
                                        PMOD_QUARTER_CHECKPOINT, TINY_CHECKPOINT, Pipeline)
from tokred_jax.models.config import LlavaConfig, TextConfig, VisionConfig

__all__ = ["DEFAULT_CHECKPOINT", "LlavaConfig", "PMOD_CHECKPOINT", "PMOD_QUARTER_CHECKPOINT",
           "Pipeline", "SamplingConfig", "TextConfig", "TINY_CHECKPOINT", "VisionConfig"]
