"""Token-reduction methods, one file per method, and their registry.

  red = methods.get("aim", cfg)                    # AIM's preset for the model
  red = methods.get("fastv", cfg, retention=0.25)  # FastV keeping 25% on average
"""

from tokred_jax.methods.registry import (METHODS, PRESETS, get, mustdrop_filter_layers)

__all__ = ["METHODS", "PRESETS", "get", "mustdrop_filter_layers"]
