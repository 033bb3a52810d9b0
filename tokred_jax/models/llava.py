"""LLaVA: vision tower -> 2-layer GELU projector -> decoder LLM, with hook points where
the stages of a plan plug in (models/hooks.py; the stages are in methods/).

The model knows no method: at each hook point it hands its tokens to whatever stages
the plan holds, in order (before the projector, after it, around and after each
decoder layer, on the caches after prefill, ...), and with no plan it is the plain
model. The prompt holds one image token per visual-token slot (`Plan.num_visual`, the
processing step expands the single `<image>` placeholder); the visual tokens replace
them in order. Slots a stage leaves empty are masked, and later tokens' position ids
close the gap. Padding is on the left, so every sample's newest token sits at the last
index and decoding writes all samples' keys at the same cache slot.

Calls (params are a plain nested dict, `apply` is the boundary):
  model = Llava(cfg)
  logits = model.apply({"params": p}, input_ids, pixel_values, attention_mask, positions)
  logits, state = model.apply(..., method="prefill", max_new_tokens=n)
  logits, state = model.apply({"params": p}, tokens, state, method="decode")
Each takes an optional static `plan` (methods.base.make_plan) with its traced `counts`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from tokred_jax.core import sharding, tokens
from tokred_jax.core.stream import Stream, live_slots
from tokred_jax.models import layers, llava_next, llava_onevision
from tokred_jax.models.config import LlavaConfig
from tokred_jax.models.decoder import DecodeCache, Decoder, LayerCache
from tokred_jax.models.hooks import Run
from tokred_jax.models.vit import VisionTower


class LayerOut(NamedTuple):
  """What one decoder layer step gives back (an `llm_layer` hook may make its own).

  stream: the stream after the layer; cache: the LayerCache of the tokens it attended
  over, k/v f32[B, S, K, h]; cache_valid: bool[B, S] which of those are live; q: the
  rotated queries f32[B, S, H, h] (a scorer reads them with cache.k; S = T unless the
  layer ran on a subset); processed: bool[B, T] the stream's visual tokens it processed.
  """
  stream: Stream
  cache: LayerCache
  cache_valid: jax.Array
  q: jax.Array
  processed: jax.Array


class DecodeState(NamedTuple):
  """Everything decoding needs after prefill, one entry per LLM layer where layers differ.

  caches: DecodeCache per layer, k f32[B·K, h, S_l], v f32[B·K, S_l, h]; valid:
  bool[B, S_l] per layer (which cache slots hold a live token); lengths: i32[] per
  layer, the next free slot; positions: i32[B] per layer, the position id the next token
  gets in that layer: the prompt's last position + 1, unless a stage's
  `decode_positions` hook says otherwise.
  """
  caches: tuple[DecodeCache, ...]
  valid: tuple[jax.Array, ...]
  lengths: tuple[jax.Array, ...]
  positions: tuple[jax.Array, ...]


class Projector(nn.Module):
  cfg: LlavaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: f32[B, N, Dv] -> f32[B, N, D]."""
    d = self.cfg.text.hidden_size
    x = layers.dense(d, use_bias=self.cfg.projector_bias, dtype=self.dtype, name="linear_1")(x)
    x = layers.activation(self.cfg.projector_hidden_act)(x)
    return layers.dense(d, use_bias=self.cfg.projector_bias, dtype=self.dtype,
                        name="linear_2")(x)


class Llava(nn.Module):
  """remat: recompute each LLM layer's activations in the backward pass (training)."""
  cfg: LlavaConfig
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.cfg
    self.vision = VisionTower(cfg.vision, cfg.vision_layers_used, self.dtype)
    self.projector = Projector(cfg, self.dtype)
    self.llm = Decoder(cfg.text, self.dtype, self.remat)
    if cfg.arch != "llava":
      d = cfg.text.hidden_size
      self.image_newline = self.param("image_newline", nn.initializers.normal(d ** -0.5), (d,))

  def run(self, plan=None, counts=None, rng=None, carry=None) -> Run:
    """The per-call state for the plan's hooks (counts default to the plan's own)."""
    if counts is None:
      counts = () if plan is None else plan.counts()
    return Run(self, plan, counts, rng, dict(carry or {}))

  # --- The visual tokens -----------------------------------------------------------

  def visual(self, pixel_values, run: Run, ts: tokens.TokenSet | None = None,
             start: int | None = None) -> tokens.TokenSet:
    """The visual tokens the LLM gets from any input: pixels f32[B, S, S, C] (one
    image per prompt), anyres `llava_next.Crops` or video `llava_onevision.Frames`.
    ts, start: the tower's tokens entering its layer `start` when an earlier program ran
    the layers before (the segmented prefill); then only the layout of `pixel_values`
    is read. Anyres sets then go through the plan's `after_packing` hooks."""
    crops = getattr(pixel_values, "pixels", None)
    if ts is None:
      ts = self.tower(pixel_values if crops is None else llava_next.crop_pixels(crops), run)
    if isinstance(pixel_values, llava_next.Crops):
      capacity = None if run.plan is None else run.plan.num_visual
      packed = llava_next.pack(self.visual_tokens(ts, run, start), pixel_values,
                               self.image_newline, capacity)
      return run.chain("after_packing", packed)
    if isinstance(pixel_values, llava_onevision.Frames):
      grid = self.cfg.vision.grid
      ts = self.visual_tokens(ts, run, start, lambda t: llava_onevision.pool(t, grid))
      return run.chain("after_packing", llava_onevision.pack(ts, pixel_values,
                                                             self.image_newline))
    return self.visual_tokens(ts, run, start)

  def tower(self, pixel_values, run: Run, stop: int | None = None) -> tokens.TokenSet:
    """The embedding and tower layers 0..stop−1 (default: all it runs), as a TokenSet
    over the N tower tokens (CLS first for CLIP)."""
    if self.is_initializing():  # create every parameter, also those LLaVA never reads
      self.vision(pixel_values)
    ts = tokens.from_features(self.vision.embed(pixel_values))
    return self.vision.run_layers(ts, run, 0, self.cfg.vision_layers_used if stop is None
                                  else stop)

  def visual_tokens(self, ts: tokens.TokenSet, run: Run, start: int | None = None,
                    resample=None) -> tokens.TokenSet:
    """From the tower's layer `start` on (default: its output) to the tokens the LLM
    gets: the rest of the tower, CLS dropped, the projector (then `resample`, e.g.
    video pooling), with the plan's hooks."""
    if start is not None:
      ts = self.vision.run_layers(ts, run, start, self.cfg.vision_layers_used)
    if run.vision_masked:  # empty slots carry nothing on
      ts = ts._replace(features=jnp.where(ts.valid[..., None], ts.features,
                                          jnp.zeros((), ts.features.dtype)))
    ts = run.chain("tower_output", ts)
    if self.cfg.drops_cls:
      ts = tokens.drop_first(ts)
    ts = run.chain("before_projector", ts)
    ts = ts._replace(features=self.projector(ts.features))
    if resample is not None:
      ts = resample(ts)
    ts = run.chain("after_projector", ts)
    return ts._replace(features=sharding.constrain(ts.features, sharding.STREAM))

  def embed_inputs(self, input_ids, visual: tokens.TokenSet):
    """Text embeddings with the i-th image token of each row replaced by visual token i.

    input_ids: i32[B, T]; visual: a TokenSet with features f32[B, N_v, D].
    Returns (f32[B, T, D], visual slot i32[B, T] (-1 on text), slot valid bool[B, T]).
    """
    is_image = input_ids == self.cfg.image_token_id
    if self.cfg.video_token_id is not None:  # OneVision: a video's slots are <video>
      is_image |= input_ids == self.cfg.video_token_id
    x = self.llm.embed_tokens(input_ids)
    n = visual.features.shape[1]
    rank = jnp.cumsum(is_image, axis=1) - 1
    slot = jnp.clip(rank, 0, n - 1)
    spliced = jnp.take_along_axis(visual.features, slot[..., None], axis=1)
    x = jnp.where(is_image[..., None], spliced.astype(x.dtype), x)
    # The prompt may hold more image slots than the set (a cut set): those are empty.
    slot_valid = ~is_image | (jnp.take_along_axis(visual.valid, slot, axis=1) & (rank < n))
    return sharding.constrain(x, sharding.STREAM), jnp.where(is_image, slot, -1), slot_valid

  def splice(self, input_ids, visual, attention_mask, positions) -> Stream:
    """The prompt with the visual tokens spliced in, as the LLM's first Stream."""
    x, vslot, slot_valid = self.embed_inputs(input_ids, visual)
    # Empty visual slots leave no gap in the positions of the tokens after them.
    positions = positions - jnp.cumsum(attention_mask & ~slot_valid, axis=1)
    valid = attention_mask & slot_valid
    t = input_ids.shape[1]
    return Stream(x, positions, valid, jnp.ones_like(valid), vslot >= 0, vslot,
                  jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), valid.shape))

  # --- The LLM ---------------------------------------------------------------------

  def run_layers(self, stream: Stream, run: Run, start: int, stop: int):
    """Decoder layers start..stop−1, each wrapped by the plan's `llm_layer` hooks and
    followed by its `after_llm_layer` hooks. `run.visual_slots` must hold the visual
    slots per sample of `stream`; `run.num_visual` the slots of the spliced set.
    Returns (Stream, per-layer (LayerCache, cache_valid), per-layer processed visual
    slots bool[B, N_v])."""
    caches, live = [], []
    for index in range(start, stop):
      layer = self.llm.layers[index]
      step = run.around("llm_layer", lambda s, layer=layer: self.layer_step(layer, s),
                        index, layer)
      out = step(stream)
      live.append(live_slots(stream, run.num_visual, out.processed))
      caches.append((out.cache, out.cache_valid))
      stream = run.chain("after_llm_layer", out.stream, index, out.q, out.cache.k)
    return stream, caches, live

  @staticmethod
  def layer_step(layer, stream: Stream) -> LayerOut:
    """One decoder layer on the whole stream (its dead and empty slots masked)."""
    x, cache, q = layer(stream.x, stream.positions, layers.causal_mask(stream.keys_valid))
    return LayerOut(stream._replace(x=sharding.constrain(x, sharding.STREAM)), cache,
                    stream.keys_valid, q, stream.live_visual)

  def _prefill_stream(self, input_ids, pixel_values, attention_mask, positions, run: Run):
    """Every stage in one program. Returns (final Stream, per-layer (LayerCache,
    cache_valid) after the `prefill_caches` hooks, the visual TokenSet, per-layer
    processed visual slots bool[B, N_v]). Stages whose counts depend on the input only
    mask here; the segmented prefill (engine/segmented.py) compacts between programs."""
    visual = self.visual(pixel_values, run)
    stream = self.splice(input_ids, visual, attention_mask, positions)
    # The prompt's image slots: the plan's capacity, which a set may fill only in part
    # (pooling's grid is smaller than its bucketed capacity).
    run.num_visual = visual.valid.shape[1]
    run.visual_slots = run.num_visual if run.plan is None else run.plan.num_visual
    run.carry["visual_in"] = jnp.sum(stream.live_visual, axis=1, dtype=jnp.int32)
    stream, caches, live = self.run_layers(stream, run, 0, self.cfg.text.num_layers)
    return stream, run.chain("prefill_caches", caches), visual, live

  def __call__(self, input_ids, pixel_values, attention_mask, positions, plan=None,
               counts=None, rng=None, return_aux: bool = False):
    """input_ids, positions: i32[B, T]; attention_mask: bool[B, T] -> logits f32[B, T, V]
    (zeros at positions a fast-mode stage pruned). With return_aux also a dict:
    `sources` i32[B, P] patch -> visual slot, `live` bool[L, B, N_v] visual slots each
    LLM layer processed, and `visual_per_layer` i32[L, B] and `equivalent_tokens` f32[B]
    (their mean over layers) from it: the counts each sample really got; stages may add
    their own entries (`aux` hooks)."""
    run = self.run(plan, counts, rng)
    stream, _, visual, live = self._prefill_stream(input_ids, pixel_values, attention_mask,
                                                   positions, run)
    logits = self.llm.logits(stream.x)
    if stream.x.shape[1] != input_ids.shape[1]:
      b = input_ids.shape[0]
      logits = jnp.zeros(input_ids.shape + logits.shape[-1:], logits.dtype).at[
          jnp.arange(b)[:, None], stream.index].set(logits)
    if return_aux:
      return logits, run.chain("aux", visual_aux(visual.sources, live))
    return logits

  def prefill(self, input_ids, pixel_values, attention_mask, positions, max_new_tokens: int,
              plan=None, counts=None, rng=None):
    """Runs the prompt and sizes each layer's cache for `max_new_tokens` more tokens.

    Returns (logits of the last position f32[B, V], DecodeState). Each layer's cache
    holds the tokens that layer processed, so pruned layers have shorter caches.
    """
    run = self.run(plan, counts, rng)
    stream, caches, _, _ = self._prefill_stream(input_ids, pixel_values, attention_mask,
                                                positions, run)
    logits = self.llm.logits(stream.x[:, -1:])[:, 0]
    return logits, self.decode_state(run, caches, stream.positions[:, -1] + 1, max_new_tokens)

  def decode_state(self, run: Run, caches, next_position, max_new_tokens: int,
                   lengths=None) -> "DecodeState":
    """The DecodeState of per-layer (LayerCache, cache_valid) with room for
    `max_new_tokens`; lengths: each layer's next free slot (default: its cache length)."""
    grow = lambda a: jnp.pad(a, [(0, 0), (0, max_new_tokens)] + [(0, 0)] * (a.ndim - 2))
    cache_valid = [v for _, v in caches]
    if lengths is None:
      lengths = tuple(jnp.asarray(c.k.shape[1], jnp.int32) for c, _ in caches)
    positions = run.chain("decode_positions", (next_position,) * len(caches), cache_valid)
    return DecodeState(tuple(DecodeCache.of(jax.tree.map(grow, c)) for c, _ in caches),
                       tuple(grow(v) for v in cache_valid), tuple(lengths), tuple(positions))

  def decode(self, tokens_, state: "DecodeState"):
    """One step. tokens_: i32[B] -> (logits f32[B, V], the state advanced by one)."""
    x = self.llm.embed_tokens(tokens_[:, None])
    valid = tuple(v.at[:, n].set(True) for v, n in zip(state.valid, state.lengths))
    caches = []
    # Decoder.__call__'s loop, with each layer's own position.
    for layer, position, v, cache, n in zip(self.llm.layers, state.positions, valid,
                                            state.caches, state.lengths):
      x, cache, _ = layer(x, position[:, None], v[:, None, :], cache, n)
      x = sharding.constrain(x, sharding.STREAM)
      caches.append(cache)
    logits = self.llm.logits(x)[:, 0]
    lengths = tuple(n + 1 for n in state.lengths)
    return logits, DecodeState(tuple(caches), valid, lengths,
                               tuple(p + 1 for p in state.positions))


def visual_aux(sources, live) -> dict:
  """The aux dict of a forward: sources i32[B, P]; live: L masks bool[B, N_v] of the
  visual slots each layer processed."""
  live = jnp.stack(live)
  per_layer = jnp.sum(live, axis=-1, dtype=jnp.int32)
  return {"sources": sources, "live": live, "visual_per_layer": per_layer,
          "equivalent_tokens": jnp.mean(per_layer.astype(jnp.float32), axis=0)}


def init_params(cfg: LlavaConfig, rng: jax.Array, dtype=jnp.float32) -> Any:
  """Random parameters (every tensor a checkpoint holds), as a plain nested dict."""
  s = cfg.vision.image_size
  ids = jnp.full((1, cfg.num_image_tokens), cfg.image_token_id, jnp.int32)
  pixels = jnp.zeros((1, s, s, cfg.vision.num_channels), jnp.float32)
  mask = jnp.ones(ids.shape, bool)
  pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
  return Llava(cfg, dtype).init(rng, ids, pixels, mask, pos)["params"]
