"""LLaVA: vision tower -> 2-layer GELU projector -> decoder LLM.

The prompt holds `num_image_tokens` copies of the image token per image (the processing
step expands the single `<image>` placeholder); the projected image features replace
them in order. Padding is on the left, so every sample's newest token sits at the last
index and decoding writes all samples' keys at the same cache slot.

Calls (params are a plain nested dict, `apply` is the boundary):
  model = Llava(cfg)
  logits = model.apply({"params": p}, input_ids, pixel_values, attention_mask, positions)
  logits, state = model.apply(..., method="prefill", max_new_tokens=n)
  logits, state = model.apply({"params": p}, tokens, state, method="decode")
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from tokred_jax import layers, sharding
from tokred_jax.config import LlavaConfig
from tokred_jax.llama import Decoder, LayerCache
from tokred_jax.vit import VisionTower


class DecodeState(NamedTuple):
  """Everything decoding needs after prefill, one entry per LLM layer where layers differ.

  caches: LayerCache per layer, k/v f32[B, S_l, K, h]; valid: bool[B, S_l] per layer
  (which cache slots hold a real token); lengths: i32[] per layer, the next free slot;
  positions: i32[B], the position id the next token gets.
  """
  caches: tuple[LayerCache, ...]
  valid: tuple[jax.Array, ...]
  lengths: tuple[jax.Array, ...]
  positions: jax.Array


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
  cfg: LlavaConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.cfg
    self.vision = VisionTower(cfg.vision, cfg.vision_layers_used, self.dtype)
    self.projector = Projector(cfg, self.dtype)
    self.llm = Decoder(cfg.text, self.dtype)

  def encode_images(self, pixel_values):
    """pixel_values: f32[B, S, S, C] -> image features f32[B, N_v, D] for the LLM."""
    hidden = self.vision(pixel_values)
    if self.cfg.vision.has_cls and self.cfg.vision_feature_select == "default":
      hidden = hidden[:, 1:]
    return sharding.constrain(self.projector(hidden), sharding.STREAM)

  def embed_inputs(self, input_ids, image_features):
    """Text embeddings with the i-th image token of each row replaced by feature i.

    input_ids: i32[B, T]; image_features: f32[B, N_v, D] -> f32[B, T, D].
    """
    is_image = input_ids == self.cfg.image_token_id
    x = self.llm.embed_tokens(input_ids)
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
    spliced = jnp.take_along_axis(image_features, slot[..., None], axis=1)
    x = jnp.where(is_image[..., None], spliced.astype(x.dtype), x)
    return sharding.constrain(x, sharding.STREAM)

  def _hidden(self, input_ids, pixel_values, attention_mask, positions):
    x = self.embed_inputs(input_ids, self.encode_images(pixel_values))
    return self.llm(x, positions, layers.causal_mask(attention_mask))

  def __call__(self, input_ids, pixel_values, attention_mask, positions):
    """input_ids, positions: i32[B, T]; attention_mask: bool[B, T] -> logits f32[B, T, V]."""
    x, _ = self._hidden(input_ids, pixel_values, attention_mask, positions)
    return self.llm.logits(x)

  def prefill(self, input_ids, pixel_values, attention_mask, positions, max_new_tokens: int):
    """Runs the prompt and sizes each layer's cache for `max_new_tokens` more tokens.

    Returns (logits of the last position f32[B, V], DecodeState).
    """
    x, caches = self._hidden(input_ids, pixel_values, attention_mask, positions)
    logits = self.llm.logits(x[:, -1:])[:, 0]
    grow = lambda a: jnp.pad(a, [(0, 0), (0, max_new_tokens)] + [(0, 0)] * (a.ndim - 2))
    caches = tuple(LayerCache(grow(c.k), grow(c.v)) for c in caches)
    valid = grow(attention_mask)
    length = jnp.asarray(input_ids.shape[1], jnp.int32)
    n = len(caches)
    state = DecodeState(caches, (valid,) * n, (length,) * n, positions[:, -1] + 1)
    return logits, state

  def decode(self, tokens, state: DecodeState):
    """One step. tokens: i32[B] -> (logits f32[B, V], the state advanced by one)."""
    x = self.llm.embed_tokens(tokens[:, None])
    valid = tuple(v.at[:, n].set(True) for v, n in zip(state.valid, state.lengths))
    masks = [v[:, None, :] for v in valid]
    x, caches = self.llm(x, state.positions[:, None], masks, state.caches, state.lengths)
    logits = self.llm.logits(x)[:, 0]
    lengths = tuple(n + 1 for n in state.lengths)
    return logits, DecodeState(caches, valid, lengths, state.positions + 1)


def init_params(cfg: LlavaConfig, rng: jax.Array, dtype=jnp.float32):
  """Random parameters (every tensor a checkpoint holds), as a plain nested dict."""
  s = cfg.vision.image_size
  ids = jnp.full((1, cfg.num_image_tokens), cfg.image_token_id, jnp.int32)
  pixels = jnp.zeros((1, s, s, cfg.vision.num_channels), jnp.float32)
  mask = jnp.ones(ids.shape, bool)
  pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
  return Llava(cfg, dtype).init(rng, ids, pixels, mask, pos)["params"]
