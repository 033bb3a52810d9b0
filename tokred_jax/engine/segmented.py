"""Segmented prefill: MustDrop's data-dependent counts compiled to bucketed shapes.

MustDrop decides per sample how many tokens survive its window merge (after ViT layer
0) and each of its filters (after the LLM layers in `filter_layers`), so no static plan
can fix the shapes. The prefill is therefore split at those points into jitted
segments, each with a static input capacity:

  merge      embedding, ViT layer 0, window merge                  (one program)
  segment 0  cut the merged patches to capacity C_0; ViT layers 1.., the key set, the
             projector, the splice; LLM layers 0..f_0 and the filter after f_0
  segment i  LLM layers f_{i−1}+1..f_i on capacity C_i, the filter after f_i
  last       the layers after the last filter, the logits, the decode state

Between segments the host reads ONE number, the largest surviving count over the batch,
rounds it up to the plan's `token_bucket` (`tokens.bucket_up`), and cuts the stream to
that capacity: each segment ends by moving dead visual slots to the front
(`reduction.front_load`), so the cut is a static slice. A segment compiles once per
capacity it meets; `trace_counts` counts them ("segment0", ...). Samples keep their own
counts inside a capacity (the slots above a sample's count are masked).

The output-aware KV cache (METHODS.md 2c) rides along: the caches of layers >= f_0 are
carried through the later cuts, aligned with the stream, so after the last cut they hold
exactly the text and the last filter's survivors (plus the bucket's masked slack);
layers < f_0 keep the cache of capacity C_0. Nothing pruned is allocated after prefill.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp

from tokred_jax.core import tokens
from tokred_jax.methods import reduction
from tokred_jax.models.decoder import LayerCache
from tokred_jax.models.llava import DecodeState, Llava, decode_positions, visual_aux


def _grow(a, n: int):
  """a [B, S, ...] padded by n empty slots on axis 1 (room for decoding)."""
  return jnp.pad(a, [(0, 0), (0, n)] + [(0, 0)] * (a.ndim - 2))


class SegmentedPrefill:
  """MustDrop's prefill (fast mode) for one model and plan, as jitted segments.

  Call it with a batch (input_ids, attention_mask, positions i32/bool[B, T],
  pixel_values f32[B, S, S, C]). Returns a dict: `logits` (f32[B, T, V] without
  max_new_tokens, else the last position's f32[B, V]), `state` (DecodeState, or None),
  `aux` (as `Llava.__call__(..., return_aux=True)`, plus `vision_tokens` i32[B], each
  sample's count after the window merge) and `capacities` (the capacity C_i of each
  segment, Python ints).
  """

  def __init__(self, model: Llava, plan: reduction.Plan,
               trace_counts: collections.Counter | None = None):
    red = plan.reduction
    if not red.data_dependent or red.mode != "fast":
      raise ValueError("the segmented prefill runs MustDrop in fast mode; other plans and "
                       "reference mode run in one program (Llava.prefill).")
    self.model, self.plan = model, plan
    self.trace_counts = collections.Counter() if trace_counts is None else trace_counts
    num_layers = model.cfg.text.num_layers
    stops = [f + 1 for f in red.filter_layers] + [num_layers]
    self.bounds = tuple(zip([0] + stops[:-1], stops))
    self.first_trimmed = red.filter_layers[0] if red.filter_layers else num_layers
    self._merge = jax.jit(self._merge_impl)
    self._segment = jax.jit(self._segment_impl, static_argnums=(3, 4, 5))

  def _bucket(self, n: int, limit: int) -> int:
    return min(limit, tokens.bucket_up(max(n, 1), self.plan.reduction.token_bucket))

  def _merge_impl(self, params, pixel_values, counts):
    self.trace_counts["merge"] += 1
    cls, ts = self.model.apply({"params": params}, pixel_values, self.plan, counts,
                               method="mustdrop_merge")
    return cls, ts, jnp.sum(ts.valid, axis=1, dtype=jnp.int32)

  def _segment_impl(self, params, inputs, counts, index: int, prompt_len: int,
                    max_new_tokens: int | None):
    """One segment; `inputs` as `__call__` builds them. Returns (stream, key, carried
    caches, early caches, live masks, logits or None, the largest live visual count)."""
    self.trace_counts[f"segment{index}"] += 1
    plan = self.plan
    start, stop = self.bounds[index]
    last = stop == self.model.cfg.text.num_layers
    text_slots = prompt_len - plan.num_visual

    def run(module: Llava):
      if index == 0:
        cls, ts, input_ids, attention_mask, positions = inputs
        visual, key = module.mustdrop_visual(cls, ts, plan)
        stream = module.splice(input_ids, visual, attention_mask, positions)
        stream, _ = reduction.front_load(stream)
        stream, _ = reduction.cut(stream, (), plan.num_visual - ts.valid.shape[1])
        carried = ()
      else:
        stream, key, carried = inputs
      visual_slots = stream.x.shape[1] - text_slots
      stream, caches, live = module.run_layers(stream, key, start, stop, plan, counts,
                                               visual_slots, key.shape[1])
      grow = lambda a: _grow(a, max_new_tokens or 0)
      early = tuple((LayerCache(grow(c.k), grow(c.v)), grow(v))
                    for layer, (c, v) in enumerate(caches, start) if layer < self.first_trimmed)
      carried = carried + tuple(c for layer, (c, _) in enumerate(caches, start)
                                if layer >= self.first_trimmed)
      logits = None
      if not last:
        stream, carried = reduction.front_load(stream, carried)
      elif max_new_tokens is None:
        b = stream.x.shape[0]
        logits = module.llm.logits(stream.x)
        logits = jnp.zeros((b, prompt_len, logits.shape[-1]), logits.dtype).at[
            jnp.arange(b)[:, None], stream.index].set(logits)
      else:
        logits = module.llm.logits(stream.x[:, -1:])[:, 0]
      count = jnp.max(jnp.sum(stream.visual & stream.keys_valid, axis=1, dtype=jnp.int32))
      return stream, key, carried, early, live, logits, count

    return self.model.apply({"params": params}, method=run)

  def __call__(self, params, batch, counts: reduction.Counts | None = None,
               max_new_tokens: int | None = None) -> dict:
    counts = counts if counts is not None else self.plan.counts()
    input_ids = batch["input_ids"]
    prompt_len = input_ids.shape[1]
    if input_ids.shape[1] < self.plan.num_visual:
      raise ValueError(f"the prompt has {prompt_len} slots, fewer than the "
                       f"{self.plan.num_visual} image slots the plan needs.")
    cls, ts, merged = self._merge(params, batch["pixel_values"], counts)
    # The one device-to-host read per cut: the largest count over the batch.
    capacity = self._bucket(int(jnp.max(merged)), ts.valid.shape[1])
    cut_set = tokens.TokenSet(ts.features[:, :capacity], ts.valid[:, :capacity],
                              ts.sizes[:, :capacity], ts.sources)
    inputs = (cls, cut_set, input_ids, batch["attention_mask"], batch["positions"])
    capacities, early, live, visual_slots = [capacity], [], [], capacity
    for index in range(len(self.bounds)):
      stream, key, carried, new_early, new_live, logits, count = self._segment(
          params, inputs, counts, index, prompt_len, max_new_tokens)
      early += new_early
      live += new_live
      if logits is None:
        capacity = self._bucket(int(count), visual_slots)
        stream, carried = reduction.cut(stream, carried, visual_slots - capacity)
        capacities.append(capacity)
        visual_slots = capacity
        inputs = (stream, key, carried)
    aux = visual_aux(ts.sources, live, self.plan.reduction.filter_layers)
    aux["vision_tokens"] = merged
    state = None
    if max_new_tokens is not None:
      grow = lambda a: _grow(a, max_new_tokens)
      late = tuple((LayerCache(grow(c.k), grow(c.v)), grow(stream.keys_valid))
                   for c in carried)
      layers = tuple(early) + late
      state = DecodeState(
          tuple(c for c, _ in layers), tuple(v for _, v in layers),
          tuple(jnp.asarray(v.shape[1] - max_new_tokens, jnp.int32) for _, v in layers),
          decode_positions(self.plan, stream.positions[:, -1] + 1, [v for _, v in layers]))
    return dict(logits=logits, state=state, aux=aux, capacities=tuple(capacities))


def kv_cache_bytes(state: DecodeState) -> tuple[int, ...]:
  """Bytes each layer's KV cache holds (keys and values, as allocated)."""
  return tuple(c.k.nbytes + c.v.nbytes for c in state.caches)
