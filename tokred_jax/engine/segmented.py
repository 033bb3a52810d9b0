"""Segmented prefill: data-dependent counts compiled to bucketed shapes.

A stage whose counts depend on the input (MustDrop's window merge after tower layer 0,
its filters after the LLM layers in `filter_layers`) names the places it changes them
(`StagePlan.cuts`), so no static plan can fix the shapes there. The prefill is split
at those places into segments, each run at a capacity C_i chosen from the counts:

  merge      the embedding and the tower up to the vision cut
  segment 0  cut the tower's tokens to capacity C_0; the rest of the tower, the
             projector, the splice; LLM layers 0..f_0 and the hooks after f_0
  segment i  LLM layers f_{i−1}+1..f_i on capacity C_i
  last       the layers after the last cut, the logits

Each segment ends by moving dead visual slots to the front (`stream.front_load`), so a
cut to capacity C is a static slice. Samples keep their own counts inside a capacity
(the slots above a sample's count are masked). Three ways to choose C_i (`Plan.sizing`):

  learned (default)  ONE jitted program per prompt shape, with no host reads inside, at
      the capacities the earlier prompts of that shape needed. The program checks on
      the device that no count exceeds its capacity; one read after it learns that (with
      the capacities and cache widths). The first prompt of a shape, and any prompt that
      overflows, runs on the host path instead (exact), and the shape's capacities grow
      to hold it, so a new program compiles only when they grow.
  ladder  ONE program per prompt shape whatever the counts: each cut picks, on the
      device, the smallest step of a capacity ladder above the batch's largest count
      (`lax.switch`; every segment compiles once per step, `ladder_steps`, so the
      compile costs about that many times a dense one); a segment's outputs are padded
      to the ladder's largest step (dead slots in front), which costs copies, not layer
      work, but a step holds up to 1/ratio of its count.
  host  Between segments the host reads ONE number, the largest count, rounds it up to
      `token_bucket` and runs the next jitted segment at exactly that capacity: the
      tightest shapes, at a blocking read and a launch per cut.

On both one-program paths one read after the program learns the capacities, and a small
program per pair of capacities gathers the decode caches once, by prompt index.

Caches that a stage trims for decoding (`StagePlan.trim_caches_from`, MustDrop's
output-aware cache) end up holding exactly the text and the last survivors (plus the
capacity's masked slack); earlier layers keep the cache of their own segment. Nothing
pruned is allocated after prefill. `trace_counts` counts the programs traced ("merge",
"segment0", ... on the host path; "segments" and "segment_caches" for one program).
"""

from __future__ import annotations

import collections
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tokred_jax.core import stream as streams
from tokred_jax.core import tokens
from tokred_jax.methods.base import Plan
from tokred_jax.models import llava_next
from tokred_jax.models.decoder import LayerCache
from tokred_jax.models.llava import Llava, visual_aux


def ladder_steps(limit: int, ratio: float, bucket: int) -> tuple[int, ...]:
  """The capacities a cut of at most `limit` tokens may take: limit, then each step
  `ratio` of the one above rounded up to a multiple of `bucket`, down to one bucket."""
  steps, size = {limit}, float(limit)
  while min(steps) > min(bucket, limit):
    size *= ratio
    steps.add(min(limit, tokens.bucket_up(math.ceil(size), bucket)))
  return tuple(sorted(steps))


class Segment(NamedTuple):
  """What one segment gives the next (the one-program paths; see SegmentedPrefill).

  stream: the stream after its layers; caches: (LayerCache, valid) per layer, aligned
  with its input stream's slots; carry: the hooks' carry; live: per layer bool[B, N_v];
  logits: the last segment's, else None; count: i32[] the largest live visual count;
  sources: segment 0's patch -> slot map, else None; capacity: i32[] C_i; widths:
  i32[layers] the slots each layer's cache really holds (before the padding).
  """
  stream: streams.Stream
  caches: tuple
  widths: jax.Array
  carry: dict
  live: tuple
  logits: Any
  count: jax.Array
  sources: Any
  capacity: jax.Array


def _pad_segment(seg: Segment, like: Segment) -> Segment:
  """`seg` with the shapes of `like` (the largest over the ladder): stream and caches
  grow dead slots in front (their slots are front-loaded), everything else (slot-indexed
  arrays) grows zeros at the end of each axis."""
  def front(a, b, fill=0):
    grow = b.shape[1] - a.shape[1]
    return jnp.pad(a, [(0, 0), (grow, 0)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)

  def end(a, b):
    return jnp.pad(a, [(0, n - m) for m, n in zip(a.shape, b.shape)])

  s, t = seg.stream, like.stream
  stream = streams.Stream(front(s.x, t.x), front(s.positions, t.positions),
                          front(s.valid, t.valid, False), front(s.alive, t.alive, False),
                          front(s.visual, t.visual, True), front(s.vslot, t.vslot, -1),
                          front(s.index, t.index, -1))
  caches = jax.tree_util.tree_map(front, seg.caches, like.caches)
  rest = jax.tree_util.tree_map(end, (seg.carry, seg.live, seg.logits, seg.sources),
                                (like.carry, like.live, like.logits, like.sources))
  return Segment(stream, caches, seg.widths, *rest[:3], seg.count, rest[3], seg.capacity)


def _switch(count, steps: tuple[int, ...], branch) -> Segment:
  """branch(C) -> Segment at the smallest of `steps` >= count (chosen on the device),
  every branch padded to the shapes of the largest."""
  if len(steps) == 1:
    return branch(steps[0])
  shapes = [jax.eval_shape(lambda c=c: branch(c)) for c in steps]
  like = jax.tree_util.tree_map(
      lambda *s: jax.ShapeDtypeStruct(tuple(map(max, *(x.shape for x in s))), s[0].dtype),
      *shapes)
  index = jnp.minimum(jnp.searchsorted(jnp.asarray(steps), count), len(steps) - 1)
  return jax.lax.switch(index, [lambda c=c: _pad_segment(branch(c), like) for c in steps])


class SegmentedPrefill:
  """The prefill of a data-dependent plan (fast mode) for one model, as segments.

  Call it with a batch (input_ids, attention_mask, positions i32/bool[B, T],
  pixel_values f32[B, S, S, C] or an anyres `Crops` / `Frames`). Returns a dict: `logits`
  (f32[B, T, V] without max_new_tokens, else the last position's f32[B, V]), `state`
  (DecodeState, or None), `aux` (as `Llava.__call__(..., return_aux=True)`, plus with a
  vision cut `vision_tokens` i32[B] (anyres: i32[B·P], per crop), each tower count after
  it, CLS excluded) and `capacities` (the capacity C_i of each segment, Python ints).
  `launch` is the one program alone (no host reads).
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
    self._program = jax.jit(self._program_impl, static_argnums=(3, 4))
    self.learned: dict = {}  # prompt shape -> the capacities its prompts needed so far
    self._caches = jax.jit(self._caches_impl, static_argnums=(3, 4, 5))

  # --- What both paths run -----------------------------------------------------------

  def _tower(self, params, pixel_values, counts):
    """The tower up to the vision cut: (TokenSet, each sample's count i32[B], CLS out)."""
    def run(module: Llava):
      crops = getattr(pixel_values, "pixels", None)  # anyres: every crop or frame
      pixels = pixel_values if crops is None else llava_next.crop_pixels(crops)
      ts = module.tower(pixels, module.run(self.plan, counts), stop=self.vision_cut)
      return ts, jnp.sum(ts.valid, axis=1, dtype=jnp.int32) - self.cls

    return self.model.apply({"params": params}, method=run)

  def _cut_tower(self, ts: tokens.TokenSet, capacity: int) -> tokens.TokenSet:
    keep = capacity + self.cls
    return tokens.TokenSet(ts.features[:, :keep], ts.valid[:, :keep], ts.sizes[:, :keep],
                           ts.sources)

  def _layers(self, module: Llava, inputs, counts, index: int, prompt_len: int,
              num_visual: int | None):
    """Segment `index`'s layers. inputs: segment 0 (source, tower TokenSet or None,
    input_ids, attention_mask, positions), later ones (stream, carry); num_visual: the
    slots of the spliced set (static; None in segment 0, which splices it). Returns
    (stream, Run, per-layer (LayerCache, cache_valid), live masks, sources or None)."""
    plan = self.plan
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
      sources = visual.sources
    else:
      stream, carry = inputs
      run = module.run(plan, counts, carry=carry)
      run.num_visual, sources = num_visual, None
    run.visual_slots = stream.x.shape[1] - (prompt_len - plan.num_visual)
    stream, caches, live = module.run_layers(stream, run, *self.bounds[index])
    return stream, run, caches, live, sources

  @staticmethod
  def _logits(module: Llava, stream: streams.Stream, prompt_len: int,
              max_new_tokens: int | None):
    if max_new_tokens is not None:
      return module.llm.logits(stream.x[:, -1:])[:, 0]
    b = stream.x.shape[0]
    logits = module.llm.logits(stream.x)
    index = jnp.where(stream.index < 0, prompt_len, stream.index)  # padding: dropped
    return jnp.zeros((b, prompt_len, logits.shape[-1]), logits.dtype).at[
        jnp.arange(b)[:, None], index].set(logits, mode="drop")

  @staticmethod
  def _max_live(stream: streams.Stream) -> jax.Array:
    return jnp.max(jnp.sum(stream.live_visual, axis=1, dtype=jnp.int32))

  def __call__(self, params, batch, counts: tuple | None = None,
               max_new_tokens: int | None = None) -> dict:
    counts = counts if counts is not None else self.plan.counts()
    prompt_len = batch["input_ids"].shape[1]
    if prompt_len < self.plan.num_visual:
      raise ValueError(f"the prompt has {prompt_len} slots, fewer than the "
                       f"{self.plan.num_visual} image slots the plan needs.")
    if self.plan.sizing == "host":
      return self._host(params, batch, counts, max_new_tokens)
    fixed = None
    if self.plan.sizing == "learned":
      leaves, tree = jax.tree_util.tree_flatten(batch)
      key = (tree, tuple(jnp.shape(a) for a in leaves))
      fixed = self.learned.get(key)
      if fixed is None:  # the first prompt of its shape: the host path finds the sizes
        out = self._host(params, batch, counts, max_new_tokens)
        self.learned[key] = out["capacities"]
        return out
    out = self.launch(params, batch, counts, max_new_tokens, fixed)
    # The one device-to-host read: the capacities met, each layer's cache width and
    # whether a count overflowed its learned capacity.
    *sizes, overflow = (int(n) for n in jax.device_get(out.pop("sizes")))
    if overflow:  # the answer lost tokens: redo it exactly, and learn the larger sizes
      out = self._host(params, batch, counts, max_new_tokens)
      self.learned[key] = tuple(map(max, fixed, out["capacities"]))
      return out
    capacities, widths = sizes[:len(self.bounds)], sizes[len(self.bounds):]
    parts, state = out.pop("parts"), None
    if max_new_tokens is not None:
      state = self._caches(params, parts, counts, tuple(widths), max_new_tokens, prompt_len)
    return dict(out, state=state, capacities=tuple(capacities))

  # --- One program: learned capacities, or the ladder --------------------------------

  def launch(self, params, batch, counts: tuple | None = None,
             max_new_tokens: int | None = None, fixed: tuple[int, ...] | None = None
             ) -> dict:
    """The prefill as one program, at the capacities `fixed` (one per segment) or, with
    None, on the ladder: a dict of `logits`, `aux`, `sizes` (i32[segments + layers + 1]:
    each segment's capacity, each layer's cache width, 1 if a count overflowed `fixed`)
    and the `parts` the decode caches are cut from, all still on the device."""
    counts = counts if counts is not None else self.plan.counts()
    return self._program(params, batch, counts, max_new_tokens, fixed)

  def _program_impl(self, params, batch, counts, max_new_tokens: int | None,
                    fixed: tuple[int, ...] | None):
    self.trace_counts["segments"] += 1
    steps = lambda i, slots: ((fixed[i],) if fixed else
                              ladder_steps(slots, self.plan.ladder, self.plan.token_bucket))
    overflow = jnp.zeros((), bool)
    plan = self.plan
    input_ids, source = batch["input_ids"], batch["pixel_values"]
    prompt_len = input_ids.shape[1]
    text = prompt_len - plan.num_visual
    last = len(self.bounds) - 1
    prompt = (input_ids, batch["attention_mask"], batch["positions"])

    def segment(index, inputs, capacity, num_visual):
      def body(module: Llava):
        stream, run, caches, live, sources = self._layers(module, inputs, counts, index,
                                                          prompt_len, num_visual)
        logits = (self._logits(module, stream, prompt_len, max_new_tokens)
                  if index == last else None)
        widths = jnp.asarray([c.k.shape[1] for c, _ in caches], jnp.int32)
        c = run.visual_slots if capacity is None else capacity
        return Segment(stream, tuple(caches), widths, run.carry, tuple(live), logits,
                       self._max_live(stream), sources, jnp.int32(c))
      return self.model.apply({"params": params}, method=body)

    extra = {}
    if self.vision_cut is not None:
      ts, merged = self._tower(params, source, counts)
      extra["vision_tokens"] = merged
      # What segment 0 still reads of the input: an anyres layout, not its pixels.
      layout = source._replace(pixels=None) if hasattr(source, "pixels") else None
      ladder = steps(0, ts.valid.shape[1] - self.cls)
      overflow |= jnp.max(merged) > ladder[-1]
      seg = _switch(jnp.max(merged), ladder, lambda c: segment(
          0, (layout, self._cut_tower(ts, c)) + prompt, c, None))
    else:
      seg = segment(0, (source, None) + prompt, None, None)
    segs, num_visual = [seg], seg.live[0].shape[1]
    for index in range(1, len(self.bounds)):
      stream, _ = streams.front_load(seg.stream)
      slots = stream.x.shape[1] - text
      ladder = steps(index, slots)
      overflow |= seg.count > ladder[-1]
      seg = _switch(seg.count, ladder, lambda c, s=stream, n=slots, carry=seg.carry, i=index:
                    segment(i, (streams.cut(s, (), n - c)[0], carry), c, num_visual))
      segs.append(seg)
    hooks = lambda m: m.run(plan, counts, carry=seg.carry)
    live = [l for s in segs for l in s.live]
    aux = self.model.apply({"params": params}, method=lambda m: hooks(m).chain(
        "aux", visual_aux(segs[0].sources, live)))
    parts = dict(caches=[s.caches for s in segs], index=[s.stream.index for s in segs],
                 last=seg.stream, carry=seg.carry)
    sizes = jnp.concatenate([jnp.stack([s.capacity for s in segs])] + [s.widths for s in segs]
                            + [overflow.astype(jnp.int32)[None]])
    return dict(logits=seg.logits, aux={**aux, **extra}, parts=parts, sizes=sizes)

  def _caches_impl(self, params, parts, counts, widths: tuple[int, ...],
                   max_new_tokens: int, prompt_len: int):
    """The DecodeState from the program's padded caches, cut to the widths it read:
    layers before the first trimmed one keep their segment's cache; the others hold the
    last segment's slots, gathered once by prompt index."""
    self.trace_counts["segment_caches"] += 1
    last = parts["last"]
    w = widths[-1]
    final, final_valid = last.index[:, -w:], last.keys_valid[:, -w:]
    b = final.shape[0]
    rows = jnp.arange(b)[:, None]
    layers, layer = [], 0
    for caches, index in zip(parts["caches"], parts["index"]):
      # Where each prompt index sits in this segment's slots.
      where = jnp.zeros((b, prompt_len + 1), jnp.int32).at[
          rows, jnp.where(index < 0, prompt_len, index)].set(
              jnp.arange(index.shape[1], dtype=jnp.int32)[None])
      at = jnp.take_along_axis(where, jnp.maximum(final, 0), axis=1)
      for cache, valid in caches:
        if layer < self.first_trimmed:
          n = widths[layer]
          layers.append((LayerCache(cache.k[:, -n:], cache.v[:, -n:]), valid[:, -n:]))
        else:
          layers.append((streams.take_all(cache, at), final_valid))
        layer += 1
    return self.model.apply({"params": params}, method=lambda m: m.decode_state(
        m.run(self.plan, counts, carry=parts["carry"]), layers, last.positions[:, -1] + 1,
        max_new_tokens))

  # --- The host path: a read and a program per cut ------------------------------------

  def _bucket(self, n: int, limit: int) -> int:
    return min(limit, tokens.bucket_up(max(n, 1), self.plan.token_bucket))

  def _merge_impl(self, params, pixel_values, counts):
    self.trace_counts["merge"] += 1
    return self._tower(params, pixel_values, counts)

  def _segment_impl(self, params, inputs, counts, index: int, prompt_len: int,
                    max_new_tokens: int | None, num_visual: int | None):
    """One segment; inputs as `_layers` takes them, later ones with the carried caches
    (stream, carry, carried). Returns (stream, carry, carried caches, early caches,
    live masks, logits or None, the largest live visual count, sources or None)."""
    self.trace_counts[f"segment{index}"] += 1
    carried = () if index == 0 else inputs[2]
    last = self.bounds[index][1] == self.model.cfg.text.num_layers

    def segment(module: Llava):
      stream, run, caches, live, sources = self._layers(module, inputs[:2] if index else
                                                        inputs, counts, index, prompt_len,
                                                        num_visual)
      start = self.bounds[index][0]
      early = tuple(cv for layer, cv in enumerate(caches, start) if layer < self.first_trimmed)
      kept = carried + tuple(c for layer, (c, _) in enumerate(caches, start)
                             if layer >= self.first_trimmed)
      logits = None
      if last:
        logits = self._logits(module, stream, prompt_len, max_new_tokens)
      else:
        stream, kept = streams.front_load(stream, kept)
      return stream, run.carry, kept, early, live, logits, self._max_live(stream), sources

    return self.model.apply({"params": params}, method=segment)

  def _host(self, params, batch, counts, max_new_tokens: int | None) -> dict:
    input_ids = batch["input_ids"]
    prompt_len = input_ids.shape[1]
    aux_extra, source, ts = {}, batch["pixel_values"], None
    capacities = []
    if self.vision_cut is not None:
      ts, merged = self._merge(params, source, counts)
      # The one device-to-host read per cut: the largest count over the batch.
      capacity = self._bucket(int(jnp.max(merged)), ts.valid.shape[1] - self.cls)
      ts = self._cut_tower(ts, capacity)
      aux_extra["vision_tokens"] = merged
      capacities.append(capacity)
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
