"""The public entry point: a loaded model with its tokenizer and image preprocessing.

  pipe = tokred_jax.Pipeline.load("path/to/llava-1.5-7b-hf")
  batch = pipe.prepare(["cat.jpg"], ["What is in the image?"])
  logits = pipe.forward(batch)            # f32[B, T, V]
  answers = pipe.generate(["cat.jpg"], ["What is in the image?"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokred_jax import checkpoint, cost, processing, sharding
from tokred_jax.config import LlavaConfig
from tokred_jax.generate import Generator, SamplingConfig
from tokred_jax.llava import Llava

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "assets", "tiny-llava")


def default_prompt(checkpoint: str) -> str:
  """The question stored beside a checkpoint's sample image, or a generic one."""
  path = os.path.join(checkpoint, "sample_prompt.txt")
  if os.path.exists(path):
    with open(path) as f:
      return f.read().strip()
  return "What is in the image?"


@dataclasses.dataclass
class Timings:
  prefill_s: float
  decode_s: float
  new_tokens: int


@dataclasses.dataclass
class Pipeline:
  """A LLaVA model ready to run: config, params, tokenizer and compiled functions."""
  cfg: LlavaConfig
  params: Any
  tokenizer: processing.Tokenizer
  dtype: Any = jnp.float32
  buckets: tuple[int, ...] | None = None
  mesh: jax.sharding.Mesh | None = None
  rules: tuple = sharding.DEFAULT_RULES

  def __post_init__(self):
    self.model = Llava(self.cfg, self.dtype)
    if self.mesh is not None:
      self.params = sharding.shard_params(self.params, self.mesh, self.rules)
    if self.buckets is None:
      self.buckets = tuple(processing.default_buckets(self.cfg.text.max_position_embeddings))
    self._forward = jax.jit(lambda p, b: self.model.apply(
        {"params": p}, b["input_ids"], b["pixel_values"], b["attention_mask"], b["positions"]))
    self._generators: dict[SamplingConfig, Generator] = {}

  @classmethod
  def load(cls, path: str = DEFAULT_CHECKPOINT, dtype: str = "float32",
           mesh_shape: dict[str, int] | None = None, **kwargs) -> "Pipeline":
    """Loads a Hugging Face LLaVA directory (config.json, safetensors, tokenizer.json).

    mesh_shape: e.g. {"data": 2, "fsdp": 1, "tensor": 4} (-1: the remaining devices)
    shards the parameters by logical axis over a device mesh; batches must then be a
    multiple of data x fsdp.
    """
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
    cfg, params = checkpoint.load_checkpoint(path)
    tokenizer = processing.Tokenizer.load(path, cfg)
    if mesh_shape is not None:
      kwargs["mesh"] = sharding.make_mesh(mesh_shape)
    else:
      params = jax.tree_util.tree_map(jnp.asarray, params)
    return cls(cfg, params, tokenizer, DTYPES[dtype], **kwargs)

  def prepare(self, images: Sequence[Any], prompts: Sequence[str], max_new_tokens: int = 0,
              chat_template: bool = True) -> dict[str, np.ndarray]:
    """Images (paths, PIL images or uint8 arrays) and prompts -> padded model inputs.

    Every check runs here, before anything is compiled or computed.
    """
    if len(images) != len(prompts):
      raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; LLaVA-1.5 "
                       "takes exactly one image per prompt.")
    if chat_template:
      prompts = [processing.build_prompt(p) for p in prompts]
    max_length = self.cfg.text.max_position_embeddings - max_new_tokens
    batch = processing.encode_batch(self.tokenizer, prompts, self.cfg,
                                    self.cfg.num_image_tokens, self.buckets, max_length)
    batch["pixel_values"] = processing.preprocess_images(images, self.cfg.vision)
    return batch

  def _validate(self, batch: dict[str, np.ndarray]):
    """Checks a batch and places it on the mesh, split on the batch axis."""
    processing.validate_pixels(batch["pixel_values"], self.cfg.vision)
    images, prompts = len(batch["pixel_values"]), len(batch["input_ids"])
    if images != prompts:
      raise ValueError(f"pixel_values holds {images} images for {prompts} prompts; LLaVA-1.5 "
                       "takes exactly one image per prompt.")
    if self.mesh is None:
      return batch
    split = math.prod(self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape)
    if prompts % split:
      raise ValueError(f"a batch of {prompts} does not split over the mesh's data x fsdp = "
                       f"{split} devices; send a multiple of {split} prompts.")
    return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, np.ndim(v), self.rules))
            for k, v in batch.items()}

  def _sharded(self):
    """Traces inside it lay activations out on the mesh (a no-op without one)."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.activation_sharding(self.mesh, self.rules)

  def forward(self, batch: dict[str, np.ndarray]) -> jax.Array:
    """Logits f32[B, T, V] for every position of a prepared batch."""
    batch = self._validate(batch)
    with self._sharded():
      return self._forward(self.params, batch)

  def generator(self, sampling: SamplingConfig) -> Generator:
    if sampling not in self._generators:
      pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
      self._generators[sampling] = Generator(self.model, sampling, pad)
    return self._generators[sampling]

  def generate_tokens(self, batch: dict[str, np.ndarray], sampling: SamplingConfig,
                      rng: jax.Array | None = None) -> tuple[np.ndarray, Timings]:
    """New tokens i32[B, max_new_tokens] for a prepared batch, and how long it took."""
    batch = self._validate(batch)
    gen = self.generator(sampling)
    with self._sharded():
      start = time.perf_counter()
      logits, state = gen.prefill(self.params, batch)
      jax.block_until_ready(logits)
      mid = time.perf_counter()
      tokens = gen.decode(self.params, logits, state, rng)
      end = time.perf_counter()
    new = int(np.max(np.sum(tokens != gen.pad_token_id, axis=1))) if tokens.size else 0
    return tokens, Timings(mid - start, end - mid, new)

  def generate(self, images: Sequence[Any], prompts: Sequence[str],
               sampling: SamplingConfig = SamplingConfig(), rng: jax.Array | None = None
               ) -> list[str]:
    """Answers, one string per prompt."""
    batch = self.prepare(images, prompts, sampling.max_new_tokens)
    tokens, _ = self.generate_tokens(batch, sampling, rng)
    return [self.tokenizer.decode(row) for row in tokens]

  def token_counts(self, batch: dict[str, np.ndarray], new_tokens: int = 0) -> dict[str, int]:
    """Real (unpadded) token counts of the first sample, and the padded bucket length."""
    mask = np.asarray(batch["attention_mask"][0])
    visual = int(np.sum(np.asarray(batch["input_ids"][0]) == self.cfg.image_token_id))
    return {"visual tokens": visual, "text tokens": int(mask.sum()) - visual,
            "bucket length": mask.shape[0], "new tokens": new_tokens}

  def cost(self, batch: dict[str, np.ndarray], new_tokens: int = 0) -> dict[str, Any]:
    """Analytic prefill FLOPs per stage and KV-cache bytes for a prepared batch."""
    batch_size, length = batch["input_ids"].shape
    num_visual = self.cfg.num_image_tokens
    flops = cost.prefill_flops(self.cfg, length - num_visual, num_visual, batch=batch_size)
    kv = cost.kv_cache_bytes(self.cfg, [length + new_tokens] * self.cfg.text.num_layers,
                             batch=batch_size,
                             bytes_per_element=jnp.dtype(self.dtype).itemsize)
    return {"flops": flops, "kv_bytes": kv}
