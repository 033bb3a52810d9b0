"""Segmented prefill: data-dependent counts compiled to bucketed shapes.

A stage whose counts depend on the input (MustDrop's window merge after tower layer 0,
its filters after the LLM layers in `filter_layers`) names the places it changes them
(`StagePlan.cuts`), so no static plan can fix the shapes there. The prefill is split
at those places into jitted segments, each with a static input capacity:

  merge      the embedding and the tower up to the vision cut        (one program)
  segment 0  cut the tower's tokens to capacity C_0; the rest of the tower, the
             projector, the splice; LLM layers 0..f_0 and the hooks after f_0
  segment i  LLM layers f_{i−1}+1..f_i on capacity C_i
  last       the layers after the last cut, the logits, the decode state

Between segments the host reads ONE number, the largest surviving count over the batch,
rounds it up to the plan's `token_bucket` (`tokens.bucket_up`), and cuts the stream to
that capacity: each segment ends by moving dead visual slots to the front
(`stream.front_load`), so the cut is a static slice. A segment compiles once per
capacity it meets; `trace_counts` counts them ("merge", "segment0", ...). Samples keep
their own counts inside a capacity (the slots above a sample's count are masked).

Caches that a stage trims for decoding (`StagePlan.trim_caches_from`, MustDrop's
output-aware cache) ride along: the caches of those layers are carried through the
later cuts, aligned with the stream, so after the last cut they hold exactly the text
and the last survivors (plus the bucket's masked slack); earlier layers keep the cache
of their own segment. Nothing pruned is allocated after prefill.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp

from tokred_jax.core import stream as streams
from tokred_jax.core import tokens
from tokred_jax.methods.base import Plan
from tokred_jax.models import llava_next
from tokred_jax.models.llava import Llava, visual_aux


class SegmentedPrefill:
  """The prefill of a data-dependent plan (fast mode) for one model, as jitted segments.

  Call it with a batch (input_ids, attention_mask, positions i32/bool[B, T],
  pixel_values f32[B, S, S, C] or an anyres `Crops` / `Frames`). Returns a dict: `logits`
  (f32[B, T, V] without max_new_tokens, else the last position's f32[B, V]), `state`
  (DecodeState, or None), `aux` (as `Llava.__call__(..., return_aux=True)`, plus with a
  vision cut `vision_tokens` i32[B] (anyres: i32[B·P], per crop), each tower count after
  it, CLS excluded) and
  `capacities` (the capacity C_i of each segment, Python ints).
  """

  def __init__(self, model: Llava, plan: Plan,
               trace_counts: collections.Counter | None = None):
    if not plan.data_dependent or plan.mode != "fast":
      raise ValueError("the segmented prefill runs data-dependent plans in fast mode; "
                       "other plans and reference mode run in one program (Llava.prefill).")
    vision_cuts = [i for kind, i in plan.cuts if kind == "vision"]
    if len(vision_cuts) > 1:
      raise ValueError(f"the segmented prefill cuts the tower once; the plan cuts it after "
                       f"layers {vision_cuts}.")
    self.model, self.plan = model, plan
    self.trace_counts = collections.Counter() if trace_counts is None else trace_counts
    num_layers = model.cfg.text.num_layers
    self.vision_cut = vision_cuts[0] + 1 if vision_cuts else None
    stops = [l + 1 for kind, l in plan.cuts if kind == "llm"] + [num_layers]
    self.bounds = tuple(zip([0] + stops[:-1], stops))
    trims = [s.trim_caches_from for s in plan.stages if s.trim_caches_from is not None]
    self.first_trimmed = min(trims) if trims else num_layers
    self.cls = int(model.cfg.vision.has_cls)
    self._merge = jax.jit(self._merge_impl)
    self._segment = jax.jit(self._segment_impl, static_argnums=(3, 4, 5, 6))

  def _bucket(self, n: int, limit: int) -> int:
    return min(limit, tokens.bucket_up(max(n, 1), self.plan.token_bucket))

  def _merge_impl(self, params, pixel_values, counts):
    self.trace_counts["merge"] += 1

    def run(module: Llava):
      crops = getattr(pixel_values, "pixels", None)  # anyres: every crop or frame
      pixels = pixel_values if crops is None else llava_next.crop_pixels(crops)
      ts = module.tower(pixels, module.run(self.plan, counts), stop=self.vision_cut)
      return ts, jnp.sum(ts.valid, axis=1, dtype=jnp.int32) - self.cls

    return self.model.apply({"params": params}, method=run)

  def _segment_impl(self, params, inputs, counts, index: int, prompt_len: int,
                    max_new_tokens: int | None, num_visual: int | None):
    """One segment; `inputs` as `__call__` builds them; num_visual: the slots of the
    spliced visual set (static: it shapes the live masks; None in segment 0, which
    splices it). Returns (stream, carry, carried caches, early caches, live masks,
    logits or None, the largest live visual count, the visual set's sources (segment 0)
    or None)."""
    self.trace_counts[f"segment{index}"] += 1
    plan = self.plan
    start, stop = self.bounds[index]
    last = stop == self.model.cfg.text.num_layers
    text_slots = prompt_len - plan.num_visual

    def segment(module: Llava):
      if index == 0:
        source, ts, input_ids, attention_mask, positions = inputs
        run = module.run(plan, counts)
        run.vision_masked = ts is not None
        visual = module.visual(source, run, ts, start=self.vision_cut)
        stream = module.splice(input_ids, visual, attention_mask, positions)
        stream, _ = streams.front_load(stream)
        stream, _ = streams.cut(stream, (), plan.num_visual - visual.valid.shape[1])
        run.num_visual = visual.valid.shape[1]
        run.carry["visual_in"] = jnp.sum(stream.live_visual, axis=1, dtype=jnp.int32)
        carried, sources = (), visual.sources
      else:
        stream, carry, carried = inputs
        sources = None
        run = module.run(plan, counts, carry=carry)
        run.num_visual = num_visual
      run.visual_slots = stream.x.shape[1] - text_slots
      stream, caches, live = module.run_layers(stream, run, start, stop)
      early = tuple(cv for layer, cv in enumerate(caches, start) if layer < self.first_trimmed)
      carried = carried + tuple(c for layer, (c, _) in enumerate(caches, start)
                                if layer >= self.first_trimmed)
      logits = None
      if not last:
        stream, carried = streams.front_load(stream, carried)
      elif max_new_tokens is None:
        b = stream.x.shape[0]
        logits = module.llm.logits(stream.x)
        logits = jnp.zeros((b, prompt_len, logits.shape[-1]), logits.dtype).at[
            jnp.arange(b)[:, None], stream.index].set(logits)
      else:
        logits = module.llm.logits(stream.x[:, -1:])[:, 0]
      count = jnp.max(jnp.sum(stream.live_visual, axis=1, dtype=jnp.int32))
      return stream, run.carry, carried, early, live, logits, count, sources

    return self.model.apply({"params": params}, method=segment)

  def __call__(self, params, batch, counts: tuple | None = None,
               max_new_tokens: int | None = None) -> dict:
    counts = counts if counts is not None else self.plan.counts()
    input_ids = batch["input_ids"]
    prompt_len = input_ids.shape[1]
    if input_ids.shape[1] < self.plan.num_visual:
      raise ValueError(f"the prompt has {prompt_len} slots, fewer than the "
                       f"{self.plan.num_visual} image slots the plan needs.")
    aux_extra, source, ts = {}, batch["pixel_values"], None
    capacities = []
    if self.vision_cut is not None:
      ts, merged = self._merge(params, source, counts)
      # The one device-to-host read per cut: the largest count over the batch.
      capacity = self._bucket(int(jnp.max(merged)), ts.valid.shape[1] - self.cls)
      keep = capacity + self.cls
      ts = tokens.TokenSet(ts.features[:, :keep], ts.valid[:, :keep], ts.sizes[:, :keep],
                           ts.sources)
      aux_extra["vision_tokens"] = merged
      capacities.append(capacity)
      # What the segments still read of the input: an anyres layout, not its pixels.
      source = source._replace(pixels=None) if hasattr(source, "pixels") else None
    inputs = (source, ts, input_ids, batch["attention_mask"], batch["positions"])
    early, live, num_visual = [], [], None
    for index in range(len(self.bounds)):
      stream, carry, carried, new_early, new_live, logits, count, new_sources = self._segment(
          params, inputs, counts, index, prompt_len, max_new_tokens, num_visual)
      early += new_early
      live += new_live
      if index == 0:
        sources, num_visual = new_sources, new_live[0].shape[1]
      visual_slots = stream.x.shape[1] - (prompt_len - self.plan.num_visual)
      if index == 0 and self.vision_cut is None:
        capacities.append(visual_slots)
      if logits is None:
        capacity = self._bucket(int(count), visual_slots)
        stream, carried = streams.cut(stream, carried, visual_slots - capacity)
        capacities.append(capacity)
        inputs = (stream, carry, carried)
    hooks = lambda m: m.run(self.plan, counts, carry=carry)
    aux = self.model.apply({"params": params}, method=lambda m: hooks(m).chain(
        "aux", visual_aux(sources, live)))
    state = None
    if max_new_tokens is not None:
      layers = list(early) + [(c, stream.keys_valid) for c in carried]
      state = self.model.apply({"params": params}, method=lambda m: m.decode_state(
          hooks(m), layers, stream.positions[:, -1] + 1, max_new_tokens))
    return dict(logits=logits, state=state, aux={**aux, **aux_extra},
                capacities=tuple(capacities))


def kv_cache_bytes(state) -> tuple[int, ...]:
  """Bytes each layer's KV cache holds (keys and values, as allocated)."""
  return tuple(c.k.nbytes + c.v.nbytes for c in state.caches)
