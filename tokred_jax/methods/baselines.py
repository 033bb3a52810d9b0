"""The simple baselines every comparison needs: a random subset and average pooling.

  random   a seeded, uniformly random subset of the visual tokens, before the projector
           (each sample draws its own; the subset keeps the tokens' order).
  pooling  s×s average pooling of the visual grid after the projector (LLaVA-OneVision's
           2×2 on video frames; Gemma 3), retention 1/s².

On anyres inputs both act per crop (per frame): LLaVA-NeXT and OneVision images keep or
pool each crop's tokens, and the packing places what is left (llava_next.pack). Video
frames are pooled 2×2 by LLaVA-OneVision itself right after the projector, so on video
both act after that pooling: random keeps the same fraction of each frame's pooled
tokens as it keeps of a crop's (a random subset commutes with the per-token projector,
so it stays the same baseline), and pooling pools the pooled grid further (OneVision-7B:
14×14, strides 2 and 7; the tiny test model's 3×3, stride 3).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from tokred_jax.core import tokens
from tokred_jax.methods.base import Flow, Recipe, Stage, StagePlan, check_retention, \
    floor_count
from tokred_jax.models import llava_onevision
from tokred_jax.models.config import ConfigError, LlavaConfig


@dataclasses.dataclass(frozen=True)
class RandomPlan(StagePlan):
  """capacity: visual tokens kept (static); seed: the subset's seed when the call gives
  no PRNG key; pooled: acts after the projector, on pooled video frames; keep: how many
  are kept (traced)."""
  name: ClassVar[str] = "random"
  capacity: int
  seed: int
  pooled: bool
  keep: int = dataclasses.field(compare=False)

  def traced(self):
    return jnp.asarray(self.keep, jnp.int32)

  def _keep(self, run, c, ts):
    rng = run.rng if run.rng is not None else jax.random.PRNGKey(self.seed)
    return tokens.random_keep(ts, rng, self.capacity, c)

  def before_projector(self, run, c, ts):
    return ts if self.pooled else self._keep(run, c, ts)

  def after_projector(self, run, c, ts):
    return self._keep(run, c, ts) if self.pooled else ts


@dataclasses.dataclass(frozen=True)
class Random(Stage):
  """Keeps `keep` visual tokens, chosen uniformly at random (seeded)."""
  keep: int
  seed: int = 0
  point: ClassVar[str] = "before_projector"
  name: ClassVar[str] = "random"

  def plan(self, flow: Flow) -> RandomPlan:
    if self.keep < 1:
      raise ConfigError(f"random's keep must be >= 1, got {self.keep}.")
    if self.keep > flow.visual.exact:
      raise ConfigError(f"random's keep {self.keep} is more than the {flow.visual.exact} "
                        "visual tokens available.")
    keep, full = self.keep, flow.cfg.num_image_tokens
    pooled = isinstance(flow.packing, llava_onevision.Packing)
    if pooled:  # video: after the frames' own pooling, the same fraction of each frame
      flow.advance("after_projector", self.name)
      keep = max(1, floor_count(flow.visual.exact, keep / full))
    flow.change_visual(self.name)
    flow.visual = flow.bucket_to(keep, full)
    return RandomPlan(flow.visual.cap, self.seed, pooled, keep=keep)


@dataclasses.dataclass(frozen=True)
class PoolPlan(StagePlan):
  name: ClassVar[str] = "pooling"
  stride: int

  def after_projector(self, run, c, ts):
    grid = math.isqrt(ts.features.shape[1])
    return tokens.pool(ts, (grid, grid), self.stride)


@dataclasses.dataclass(frozen=True)
class Pool(Stage):
  """s×s average pooling of the (square, whole) visual grid after the projector."""
  stride: int
  point: ClassVar[str] = "after_projector"
  name: ClassVar[str] = "pooling"

  def plan(self, flow: Flow) -> PoolPlan:
    if self.stride < 1:
      raise ConfigError(f"pooling's stride must be >= 1, got {self.stride}.")
    n = flow.visual.exact
    grid = math.isqrt(n)
    if grid * grid != n or grid % self.stride or flow.visual.cap != n:
      raise ConfigError(f"pooling's stride {self.stride} does not divide the {grid}x{grid} "
                        "token grid (pooling needs the whole grid).")
    flow.change_visual(self.name)
    # The prompt gets a bucketed capacity of image slots; those past the pooled grid stay
    # empty (masked).
    flow.visual = flow.bucket_to((grid // self.stride) ** 2, flow.cfg.num_image_tokens)
    return PoolPlan(self.stride)


def build_random(cfg: LlavaConfig, retention: float = 0.25, seed: int = 0,
                 mode: str = "fast") -> Recipe:
  """A seeded uniformly random subset of visual tokens, before the projector."""
  check_retention(retention)
  keep = max(1, math.floor(retention * cfg.num_image_tokens))
  return Recipe((Random(keep, seed),), "random", mode)


def build_pooling(cfg: LlavaConfig, retention: float | None = None, stride: int = 2,
                  mode: str = "fast") -> Recipe:
  """s×s average pooling of the visual grid after the projector (retention = 1/s²)."""
  del cfg
  if retention is not None:
    check_retention(retention)
    stride = round(retention ** -0.5)
    if abs(stride ** -2 - retention) > 1e-6:
      raise ConfigError(f"pooling retains 1/s² of the tokens (1, 0.25, 0.111, 0.0625, ...); "
                        f"{retention} is none of these.")
  return Recipe((Pool(stride),) if stride > 1 else (), "pooling", mode)
