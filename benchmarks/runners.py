"""What `benchmarks.hf_speed` times: our Generator and transformers on one batch each, with
one interface (prefill, decode, logits, KV bytes), and the clock of jax's compiling."""

import jax
import numpy as np

from tokred_jax.engine.generate import Generator


class Ours:
  """One of our cases: a Generator with programs of its own, on one batch (a dict, or
  the arrays (input_ids, pixel_values, attention_mask, positions))."""

  def __init__(self, gen: Generator, params, batch):
    keys = ("input_ids", "pixel_values", "attention_mask", "positions")
    self.gen, self.params = gen, params
    self.batch = batch if isinstance(batch, dict) else dict(
        zip(keys, (jax.device_put(np.asarray(a)) for a in batch)))

  def prefill(self):
    return jax.block_until_ready(self.gen.prefill(self.params, self.batch))

  def decode(self, out) -> np.ndarray:
    return self.gen.decode(self.params, *out)

  def logits(self, out) -> np.ndarray:
    return np.asarray(out[0])

  def kv_bytes(self, out) -> int:
    return sum(x.nbytes for c in out[1].caches for x in c)

  @property
  def programs(self) -> int:
    return sum(self.gen.trace_counts.values())


class Hf:
  """transformers on one batch: a forward filling the cache, then greedy steps on it."""
  programs = None

  def __init__(self, torch, model, inputs, new_tokens: int):
    ids, pixels, mask, _ = (torch.from_numpy(np.array(a)) for a in inputs)
    self.torch, self.model, self.new_tokens = torch, model, new_tokens
    self.inputs = dict(input_ids=ids.long(), attention_mask=mask.long(),
                       pixel_values=pixels.permute(0, 3, 1, 2).contiguous())  # NCHW

  def prefill(self):
    with self.torch.inference_mode():
      return self.model(**self.inputs, logits_to_keep=1, use_cache=True)

  def decode(self, out) -> np.ndarray:
    token, mask, new = out.logits[:, -1].argmax(-1), self.inputs["attention_mask"], []
    with self.torch.inference_mode():
      for _ in range(self.new_tokens - 1):
        new.append(token)
        mask = self.torch.cat([mask, mask[:, -1:]], 1)
        step = self.model(input_ids=token[:, None], past_key_values=out.past_key_values,
                          attention_mask=mask, use_cache=True)
        token = step.logits[:, -1].argmax(-1)
    return self.torch.stack(new + [token], 1).numpy()

  def logits(self, out) -> np.ndarray:
    return out.logits[:, -1].float().numpy()

  def kv_bytes(self, out) -> int:  # the cache grows in place as decode steps run
    return sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
               for t in (layer.keys, layer.values))


class CompileClock:
  """Wall time inside jax's tracing, lowering and XLA compiling: the union of the time
  spans of `jax.monitoring`'s compile events (nested traces count once)."""
  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.spans = []

  def __call__(self, event: str, start: float, end: float, **_):
    if event in self.EVENTS:
      self.spans.append((start, end))

  def take(self) -> float:
    """Seconds since the last take."""
    total, reached = 0.0, -np.inf
    for start, end in sorted(self.spans):
      total += max(0.0, end - max(start, reached))
      reached = max(reached, end)
    self.spans = []
    return total
