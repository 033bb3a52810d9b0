"""What a model hands the stages of a plan at its hook points.

The models know no method: a plan is any object with a tuple `stages` of stage plans
(methods/base.py lists the hooks), and the traced `counts` hold one entry per stage.
A model builds one `Run` per call and threads it through every hook.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable


@dataclasses.dataclass
class Run:
  """The per-call state hooks read (fixed while tracing, except where noted).

  model: the bound model module (its tower, projector and decoder layers);
  plan: the static plan (None: no reduction); counts: the stages' traced values;
  rng: a PRNG key for stages that sample; carry: arrays one stage leaves for a later
  hook (e.g. MustDrop's key set), a pytree the segmented prefill passes on;
  vision_masked: the tower's token set may hold empty slots, so attention masks them;
  visual_slots: visual slots per sample in the current LLM stream (static, shrinks
  when a stage gathers the stream down); num_visual: slots of the spliced token set.
  """
  model: Any
  plan: Any
  counts: tuple
  rng: Any = None
  carry: dict = dataclasses.field(default_factory=dict)
  vision_masked: bool = False
  visual_slots: int = 0
  num_visual: int = 0

  @property
  def stages(self) -> tuple:
    return () if self.plan is None else self.plan.stages

  @property
  def mode(self) -> str:
    return "fast" if self.plan is None else self.plan.mode

  def chain(self, hook: str, value, *args):
    """`value` through every stage's `hook` in order: stage.hook(run, c, *args, value)."""
    for stage, c in zip(self.stages, self.counts):
      value = getattr(stage, hook)(self, c, *args, value)
    return value

  def around(self, hook: str, default: Callable, *args) -> Callable:
    """`default` wrapped by every stage's around-hook `hook`, the first stage outermost:
    stage.hook(run, c, *args, value, next)."""
    fn = default
    for stage, c in reversed(tuple(zip(self.stages, self.counts))):
      fn = functools.partial(_call_around, getattr(stage, hook), self, c, args, fn)
    return fn


def _call_around(method, run, c, args, next_fn, value):
  return method(run, c, *args, value, next_fn)
