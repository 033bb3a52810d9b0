"""LLaVA: vision tower -> 2-layer GELU projector -> decoder LLM, with the stages where
token-reduction methods plug in (see reduction.py).

The prompt holds one image token per visual-token slot (`Plan.num_visual`, the
processing step expands the single `<image>` placeholder); the visual tokens replace
them in order. Slots a method leaves empty are masked, and later tokens' position ids
close the gap. Padding is on the left, so every sample's newest token sits at the last
index and decoding writes all samples' keys at the same cache slot.

Calls (params are a plain nested dict, `apply` is the boundary):
  model = Llava(cfg)
  logits = model.apply({"params": p}, input_ids, pixel_values, attention_mask, positions)
  logits, state = model.apply(..., method="prefill", max_new_tokens=n)
  logits, state = model.apply({"params": p}, tokens, state, method="decode")
Each takes an optional static `plan` (reduction.make_plan) with its traced `counts`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from tokred_jax.core import sharding, tokens
from tokred_jax.engine import cost
from tokred_jax.methods import mustdrop, pmod, reduction
from tokred_jax.models import layers
from tokred_jax.models.config import LlavaConfig
from tokred_jax.models.decoder import Decoder, LayerCache
from tokred_jax.models.vit import VisionTower


class DecodeState(NamedTuple):
  """Everything decoding needs after prefill, one entry per LLM layer where layers differ.

  caches: LayerCache per layer, k/v f32[B, S_l, K, h]; valid: bool[B, S_l] per layer
  (which cache slots hold a live token); lengths: i32[] per layer, the next free slot;
  positions: i32[B] per layer, the position id the next token gets in that layer. It is
  the same in every layer (the prompt's last position + 1) except in MustDrop's
  reference mode, where each layer continues from its own cache as the official code
  does (`decode_positions`).
  """
  caches: tuple[LayerCache, ...]
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


def _drop_first(ts: tokens.TokenSet) -> tokens.TokenSet:
  """The set without slot 0 (the CLS token, never merged) or its source patch."""
  sources = ts.sources[:, 1:]
  return tokens.TokenSet(ts.features[:, 1:], ts.valid[:, 1:], ts.sizes[:, 1:],
                         jnp.where(sources > 0, sources - 1, -1))


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

  def _plan(self, plan):
    return plan if plan is not None else reduction.make_plan(reduction.Reduction(), self.cfg)

  def encode_images(self, pixel_values, plan=None, counts=None, rng=None):
    """pixel_values: f32[B, S, S, C] -> the visual tokens for the LLM, a TokenSet of
    static length `plan.num_visual` with features f32[B, N_v, D]; `sources` maps each
    image patch to its token (or -1 when it was dropped)."""
    plan = self._plan(plan)
    red = plan.reduction
    counts = counts if counts is not None else plan.counts()
    drop_cls = self.cfg.vision.has_cls and self.cfg.vision_feature_select == "default"
    if red.tome_r:
      caps = plan.vision_tokens[1:] + (plan.num_visual + int(drop_cls),)
      ts = self.vision.with_tome(pixel_values, caps, counts.tome_r)
      hidden = None
    else:
      hidden = self.vision(pixel_values)
      ts = tokens.from_features(hidden)
    if drop_cls:
      ts = _drop_first(ts)

    if red.merge_r and red.merge_metric == "keys":
      # Merge the metric along with the features: one matching, one mean for both.
      metric = self.vision.last_layer_keys(hidden)[:, 1 if drop_cls else 0:]
      ts = self._merge(ts, metric, plan, counts)
    if red.keep_visual is not None:
      ts = tokens.random_keep(ts, rng if rng is not None else jax.random.PRNGKey(red.seed),
                              plan.num_visual, counts.keep_visual)
    ts = ts._replace(features=self.projector(ts.features))
    if red.merge_r and red.merge_metric == "features":
      ts = self._merge(ts, ts.features, plan, counts)
    if red.pool_stride > 1:
      grid = int(round(ts.features.shape[1] ** 0.5))
      ts = tokens.pool(ts, (grid, grid), red.pool_stride)
    return ts._replace(features=sharding.constrain(ts.features, sharding.STREAM))

  def _merge(self, ts, metric, plan, counts):
    """AIM's chained bipartite steps (plain means), the metric merged alongside."""
    d = ts.features.shape[-1]
    ts = ts._replace(features=jnp.concatenate([ts.features, metric.astype(ts.features.dtype)],
                                              axis=-1))
    for step, capacity in enumerate(plan.merge_tokens):
      merged = tokens.bipartite_merge(ts, ts.features[..., d:], counts.merge_r[step],
                                      weighted=False)
      ts = tokens.compact(merged, capacity)
    return ts._replace(features=ts.features[..., :d])

  def embed_inputs(self, input_ids, visual: tokens.TokenSet):
    """Text embeddings with the i-th image token of each row replaced by visual token i.

    input_ids: i32[B, T]; visual: a TokenSet with features f32[B, N_v, D].
    Returns (f32[B, T, D], visual slot i32[B, T] (-1 on text), slot valid bool[B, T]).
    """
    is_image = input_ids == self.cfg.image_token_id
    x = self.llm.embed_tokens(input_ids)
    n = visual.features.shape[1]
    rank = jnp.cumsum(is_image, axis=1) - 1
    slot = jnp.clip(rank, 0, n - 1)
    spliced = jnp.take_along_axis(visual.features, slot[..., None], axis=1)
    x = jnp.where(is_image[..., None], spliced.astype(x.dtype), x)
    # The prompt may hold more image slots than the set (MustDrop's cut): those are empty.
    slot_valid = ~is_image | (jnp.take_along_axis(visual.valid, slot, axis=1) & (rank < n))
    return sharding.constrain(x, sharding.STREAM), jnp.where(is_image, slot, -1), slot_valid

  def _visual(self, pixel_values, plan, counts, rng):
    """The visual TokenSet, and MustDrop's key tokens bool[B, N_v] (None for others)."""
    if plan.reduction.data_dependent:
      return self.mustdrop_visual(*self.mustdrop_merge(pixel_values, plan, counts), plan)
    return self.encode_images(pixel_values, plan, counts, rng), None

  def mustdrop_merge(self, pixel_values, plan, counts):
    """MustDrop's first vision segment: (CLS f32[B, 1, Dv], merged patches TokenSet of
    length P, valid tokens a prefix). A window of 0 merges nothing."""
    window = plan.reduction.window
    if not window:
      x = self.vision.layers[0](self.vision.embed(pixel_values))
      return x[:, :1], tokens.from_features(x[:, 1:])
    return self.vision.window_merge_stage(pixel_values, window, counts.thresholds[0])

  def mustdrop_visual(self, cls, ts, plan):
    """The rest of the tower on CLS + the (cut) merged patches, the key set, the
    projector: (TokenSet f32[B, N, D], key tokens bool[B, N])."""
    ts, key = self.vision.after_window_merge(cls, ts, plan.reduction.key_ratio)
    ts = ts._replace(features=sharding.constrain(self.projector(ts.features), sharding.STREAM))
    return ts, key

  def splice(self, input_ids, visual, attention_mask, positions):
    """The prompt with the visual tokens spliced in, as the LLM's first Stream."""
    x, vslot, slot_valid = self.embed_inputs(input_ids, visual)
    # Empty visual slots leave no gap in the positions of the tokens after them.
    positions = positions - jnp.cumsum(attention_mask & ~slot_valid, axis=1)
    valid = attention_mask & slot_valid
    t = input_ids.shape[1]
    return reduction.Stream(x, positions, valid, jnp.ones_like(valid), vslot >= 0, vslot,
                            jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), valid.shape))

  def _prefill_stream(self, input_ids, pixel_values, attention_mask, positions, plan, counts,
                      rng):
    """Runs every stage in one program. Returns (final Stream, per-layer (LayerCache,
    keys_valid), the visual TokenSet, per-layer live visual slots bool[B, N_v]).

    MustDrop runs here with masks only (no savings; fast mode keeps original positions,
    reference mode renumbers); segmented.py runs it with real compaction."""
    plan = self._plan(plan)
    counts = counts if counts is not None else plan.counts()
    visual, key = self._visual(pixel_values, plan, counts, rng)
    stream = self.splice(input_ids, visual, attention_mask, positions)
    stream, caches, live = self.run_layers(stream, key, 0, self.cfg.text.num_layers, plan,
                                           counts, plan.num_visual, visual.valid.shape[1])
    filters = plan.reduction.filter_layers
    if filters:
      keep = mustdrop.output_aware_keep([v for _, v in caches], None, filters[0])
      caches = [(c, v) for (c, _), v in zip(caches, keep)]
    return stream, caches, visual, live

  def run_layers(self, stream, key, start: int, stop: int, plan, counts, visual_slots: int,
                 num_visual: int):
    """LLM layers start..stop−1 with every in-LLM stage. key: MustDrop's key tokens
    bool[B, N_v] (or None); visual_slots: visual slots per sample in the stream (static);
    num_visual: slots of the visual TokenSet. Returns (Stream, per-layer (LayerCache,
    keys_valid), per-layer live visual slots bool[B, N_v])."""
    caches, live = [], []
    for layer_index in range(start, stop):
      layer = self.llm.layers[layer_index]
      live.append(self._live_slots(stream, num_visual))
      if plan.mod_visual[layer_index] is not None:
        routed = stream
        stream, cache, cache_valid, kept = self._routed_layer(layer, layer_index, stream, plan,
                                                              counts)
        live[-1] = self._live_slots(routed._replace(alive=routed.alive & (~routed.visual | kept)),
                                    num_visual)
        caches.append((cache, cache_valid))
        continue
      x, cache, q = layer(stream.x, stream.positions, layers.causal_mask(stream.keys_valid))
      stream = stream._replace(x=sharding.constrain(x, sharding.STREAM))
      caches.append((cache, stream.keys_valid))
      if layer_index in plan.score_layers:
        scores = reduction.score_visual(plan, stream, q, cache.k)
        stream = reduction.prune(plan, layer_index, stream, scores, counts)
      if layer_index in plan.reduction.filter_layers:
        stream = reduction.mustdrop_filter(plan, stream, key, q, cache.k, counts, visual_slots)
    return stream, caches, live

  def _routed_layer(self, layer, layer_index, stream, plan, counts):
    """A p-MoD layer: the router picks the visual tokens the layer processes (see
    pmod.py). Returns the updated stream, the layer's LayerCache (text + routed visual
    tokens only), which of its slots are valid bool[B, T_sub], and which stream tokens
    were routed through the layer bool[B, T]."""
    capacity, count = plan.mod_visual[layer_index], counts.mod_visual[layer_index]
    w = pmod.tanh_norm(layer.route(stream.x), self.cfg.text.router_alpha)  # [B, T]
    live = stream.visual & stream.keys_valid
    rank_key = jnp.where(stream.visual, jnp.where(live, w, -1e30), -jnp.inf)
    b, t = live.shape
    rows = jnp.arange(b)[:, None]
    _, top = jax.lax.top_k(rank_key, capacity)
    kept_top = (jnp.arange(capacity)[None] < count) & jnp.take_along_axis(live, top, 1)
    chosen = jnp.zeros((b, t), bool).at[rows, top].set(True)
    kept = jnp.zeros((b, t), bool).at[rows, top].set(kept_top)
    # Text and the chosen visual slots, in original order (a fixed count per sample).
    slots = plan.llm_visual[layer_index] if plan.reduction.mode == "fast" else plan.num_visual
    order = jnp.argsort(stream.visual & ~chosen, axis=1, stable=True)[:, :t - slots + capacity]
    take = lambda a: jnp.take_along_axis(a, order[(...,) + (None,) * (a.ndim - 2)], axis=1)
    sub_visual = take(stream.visual)
    sub_valid = take(stream.keys_valid) & (~sub_visual | take(kept))
    h, cache, _ = layer.attention_block(take(stream.x), take(stream.positions),
                                        layers.causal_mask(sub_valid))
    scale = jnp.where(sub_visual, take(w), 1.0)[..., None].astype(h.dtype)
    out = h + scale * layer.mlp_branch(h)
    # Skipped visual tokens: w·x (STRing); text and routed ones: the layer's output.
    x = jnp.where(stream.visual[..., None], w[..., None].astype(stream.x.dtype) * stream.x,
                  stream.x)
    write = (~sub_visual | take(kept))[..., None]
    x = x.at[rows, order].set(jnp.where(write, out, take(x)))
    return stream._replace(x=sharding.constrain(x, sharding.STREAM)), cache, sub_valid, kept

  @staticmethod
  def _live_slots(stream, num_visual):
    b = stream.vslot.shape[0]
    live = stream.visual & stream.keys_valid
    return jnp.zeros((b, num_visual), bool).at[
        jnp.arange(b)[:, None], jnp.maximum(stream.vslot, 0)].max(live)

  def __call__(self, input_ids, pixel_values, attention_mask, positions, plan=None,
               counts=None, rng=None, return_aux: bool = False):
    """input_ids, positions: i32[B, T]; attention_mask: bool[B, T] -> logits f32[B, T, V]
    (zeros at positions a fast-mode method pruned). With return_aux also a dict:
    `sources` i32[B, P] patch -> visual slot, `live` bool[L, B, N_v] visual slots each
    LLM layer processed, and `visual_per_layer` i32[L, B] and `equivalent_tokens` f32[B]
    (their mean over layers) from it: the counts each sample really got; MustDrop adds
    `equivalent_tokens_official` f32[B] (a filter layer counted after its filter, as
    the official script does)."""
    plan = self._plan(plan)
    stream, _, visual, live = self._prefill_stream(input_ids, pixel_values, attention_mask,
                                                   positions, plan, counts, rng)
    logits = self.llm.logits(stream.x)
    if stream.x.shape[1] != input_ids.shape[1]:
      b = input_ids.shape[0]
      logits = jnp.zeros(input_ids.shape + logits.shape[-1:], logits.dtype).at[
          jnp.arange(b)[:, None], stream.index].set(logits)
    if return_aux:
      return logits, visual_aux(visual.sources, live, _filter_layers(plan))
    return logits

  def prefill(self, input_ids, pixel_values, attention_mask, positions, max_new_tokens: int,
              plan=None, counts=None, rng=None):
    """Runs the prompt and sizes each layer's cache for `max_new_tokens` more tokens.

    Returns (logits of the last position f32[B, V], DecodeState). Each layer's cache
    holds the tokens that layer processed, so pruned layers have shorter caches.
    """
    plan = self._plan(plan)
    stream, caches, _, _ = self._prefill_stream(input_ids, pixel_values, attention_mask,
                                                positions, plan, counts, rng)
    logits = self.llm.logits(stream.x[:, -1:])[:, 0]
    grow = lambda a: jnp.pad(a, [(0, 0), (0, max_new_tokens)] + [(0, 0)] * (a.ndim - 2))
    state = DecodeState(
        tuple(LayerCache(grow(c.k), grow(c.v)) for c, _ in caches),
        tuple(grow(valid) for _, valid in caches),
        tuple(jnp.asarray(c.k.shape[1], jnp.int32) for c, _ in caches),
        decode_positions(plan, stream.positions[:, -1] + 1, [v for _, v in caches]))
    return logits, state

  def decode(self, tokens_, state: DecodeState):
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


def decode_positions(plan, next_position, cache_valid) -> tuple[jax.Array, ...]:
  """The position id the first decoded token gets in each LLM layer, i32[B] per layer.

  next_position: i32[B] the prompt's last position + 1; cache_valid: bool[B, S_l] per
  layer, the cache slots holding a token after prefill. Every layer uses next_position,
  except in MustDrop's reference mode: there the official code gives the new token, in
  each layer, that layer's cache length (its live entries: it removes what we mask),
  so layers before the first filter, which keep the whole prompt, continue from the
  prompt's length and the later ones from the last filter's survivors.
  """
  if plan.reduction.data_dependent and plan.reduction.mode == "reference":
    return tuple(jnp.sum(v, axis=1, dtype=jnp.int32) for v in cache_valid)
  return (next_position,) * len(cache_valid)


def visual_aux(sources, live, filter_layers=None) -> dict:
  """The aux dict of a forward: sources i32[B, P]; live: L masks bool[B, N_v];
  filter_layers: MustDrop's (None for other methods), which adds
  `equivalent_tokens_official` f32[B], the official script's count (a filter layer
  counted after its filter)."""
  live = jnp.stack(live)
  per_layer = jnp.sum(live, axis=-1, dtype=jnp.int32)
  aux = {"sources": sources, "live": live, "visual_per_layer": per_layer,
         "equivalent_tokens": jnp.mean(per_layer.astype(jnp.float32), axis=0)}
  if filter_layers is not None:
    official = per_layer[cost.post_filter_layers(per_layer.shape[0], filter_layers)]
    aux["equivalent_tokens_official"] = jnp.mean(official.astype(jnp.float32), axis=0)
  return aux


def _filter_layers(plan):
  """MustDrop's filter layers for `visual_aux`, None for other plans."""
  return plan.reduction.filter_layers if plan.reduction.data_dependent else None


def init_params(cfg: LlavaConfig, rng: jax.Array, dtype=jnp.float32) -> Any:
  """Random parameters (every tensor a checkpoint holds), as a plain nested dict."""
  s = cfg.vision.image_size
  ids = jnp.full((1, cfg.num_image_tokens), cfg.image_token_id, jnp.int32)
  pixels = jnp.zeros((1, s, s, cfg.vision.num_channels), jnp.float32)
  mask = jnp.ones(ids.shape, bool)
  pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
  return Llava(cfg, dtype).init(rng, ids, pixels, mask, pos)["params"]
