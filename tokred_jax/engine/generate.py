"""Jitted prefill + KV-cache decoding with greedy or temperature / top-p sampling.

Prompts arrive padded to a bucket length (see `processing.encode_batch`), so prefill
compiles once per bucket; the decode loop is a single `lax.while_loop` that stops when
every sample has emitted an end-of-sequence token or `max_new_tokens` are out.
`Generator.trace_counts` counts how often each function was traced (= compiled).
A data-dependent plan (MustDrop, fast mode) prefills in segments (segmented.py), counted
as "segments" and "segment_caches" when they run as one program, else per segment
("merge", "segment0", ...).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tokred_jax.engine import segmented
from tokred_jax.methods.base import Plan, Recipe, make_plan
from tokred_jax.models.llava import DecodeState, Llava


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy; top_p 1 keeps the whole distribution."""
  max_new_tokens: int = 32
  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    whole = isinstance(self.max_new_tokens, (int, np.integer))
    if not whole or isinstance(self.max_new_tokens, bool):
      raise TypeError(f"max_new_tokens must be a whole number, got "
                      f"{self.max_new_tokens!r}.")
    for name in ("temperature", "top_p"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
    if not 0 <= self.temperature < math.inf:  # NaN fails too.
      raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got "
                       f"{self.temperature}.")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 keeps the whole distribution), got "
                       f"{self.top_p}.")


def sample_token(logits, rng, temperature, top_p, greedy: bool):
  """logits: f32[B, V] -> i32[B]. Top-p keeps the smallest set of most likely tokens
  whose probability mass reaches top_p (always at least the most likely one)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = mass_before < top_p
  threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Generator:
  """Holds the jitted prefill and decode loop for one model and one reduction plan, so
  compiled programs are reused across calls. One program per (bucket length, batch
  size); the plan's exact counts are traced, so plans that differ only in them (e.g.
  two retention levels within a token bucket) share the programs."""

  def __init__(self, model: Llava, sampling: SamplingConfig = SamplingConfig(),
               pad_token_id: int = 0, eos_ids: tuple[int, ...] | None = None,
               plan: Plan | None = None):
    """eos_ids: tokens that end a sample (default: the model config's); () never stops.
    plan: the token reduction (default: none; for the anyres models, whose plans are
    made per input bucket, None runs the plain model on any bucket)."""
    self.model = model
    self.sampling = sampling
    if plan is None and model.cfg.arch == "llava":
      plan = make_plan(Recipe(), model.cfg)
    self.plan = plan
    eos_ids = model.cfg.text.eos_ids if eos_ids is None else eos_ids
    self.eos_ids = jnp.asarray(eos_ids or (-1,), jnp.int32)
    self.pad_token_id = pad_token_id
    self.trace_counts = collections.Counter()
    self._prefill = jax.jit(self._prefill_impl)
    self._segmented = None
    if plan is not None and plan.data_dependent and plan.mode == "fast":
      self._segmented = segmented.SegmentedPrefill(model, self.plan, self.trace_counts)
    self._decode = jax.jit(self._decode_impl)

  def _prefill_impl(self, params, input_ids, pixel_values, attention_mask, positions, counts):
    self.trace_counts["prefill"] += 1
    return self.model.apply({"params": params}, input_ids, pixel_values, attention_mask,
                            positions, method="prefill",
                            max_new_tokens=self.sampling.max_new_tokens, plan=self.plan,
                            counts=counts)

  def _decode_impl(self, params, logits, state: DecodeState, rng, temperature, top_p):
    """Samples from the prefill logits, then steps until done. -> i32[B, max_new]."""
    self.trace_counts["decode"] += 1
    greedy = self.sampling.temperature == 0
    batch = logits.shape[0]
    n = self.sampling.max_new_tokens
    pick = functools.partial(sample_token, temperature=temperature, top_p=top_p,
                             greedy=greedy)

    def emit(step, logits, rng, out, done):
      rng, key = jax.random.split(rng)
      token = pick(logits, key)
      token = jnp.where(done, self.pad_token_id, token)
      out = out.at[:, step].set(token)
      done = done | jnp.isin(token, self.eos_ids)
      return token, rng, out, done

    out = jnp.full((batch, n), self.pad_token_id, jnp.int32)
    token, rng, out, done = emit(0, logits, rng, out, jnp.zeros(batch, bool))

    def cond(carry):
      step, _, _, _, _, done = carry
      return (step < n) & ~jnp.all(done)

    def body(carry):
      step, token, state, rng, out, done = carry
      logits, state = self.model.apply({"params": params}, token, state, method="decode")
      token, rng, out, done = emit(step, logits, rng, out, done)
      return step + 1, token, state, rng, out, done

    carry = (jnp.int32(1), token, state, rng, out, done)
    return jax.lax.while_loop(cond, body, carry)[4]

  def prefill(self, params, batch, counts: tuple | None = None):
    """batch: dict with input_ids, attention_mask, positions (i32/bool[B, T]) and
    pixel_values f32[B, S, S, C]; counts: the exact counts (default: the plan's) ->
    (logits f32[B, V] of the last position, DecodeState)."""
    if self._segmented is not None:
      out = self._segmented(params, batch, counts, self.sampling.max_new_tokens)
      return out["logits"], out["state"]
    return self._prefill(params, batch["input_ids"], batch["pixel_values"],
                         batch["attention_mask"], batch["positions"],
                         counts if counts is not None else
                         () if self.plan is None else self.plan.counts())

  def decode(self, params, logits, state: DecodeState, rng=None) -> np.ndarray:
    """The new tokens i32[B, max_new_tokens], padded with `pad_token_id` after each
    sample's end-of-sequence token."""
    if rng is None:
      rng = jax.random.PRNGKey(0)
    tokens = self._decode(params, logits, state, rng,
                          jnp.float32(max(self.sampling.temperature, 1e-6)),
                          jnp.float32(self.sampling.top_p))
    return np.asarray(tokens)

  def __call__(self, params, batch, rng=None, counts=None) -> np.ndarray:
    """Prefill then decode: i32[B, max_new_tokens]."""
    logits, state = self.prefill(params, batch, counts)
    return self.decode(params, logits, state, rng)
