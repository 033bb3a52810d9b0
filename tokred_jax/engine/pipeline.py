"""The public entry point: a loaded model with its tokenizer and image preprocessing.

  pipe = tokred_jax.Pipeline.load("path/to/llava-1.5-7b-hf")
  batch = pipe.prepare(["cat.jpg"], ["What is in the image?"])
  logits = pipe.forward(batch)            # f32[B, T, V]
  answers = pipe.generate(["cat.jpg"], ["What is in the image?"])
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokred_jax import methods
from tokred_jax.core import sharding
from tokred_jax.engine import budget as budgets
from tokred_jax.engine import cost, segmented
from tokred_jax.engine.generate import Generator, SamplingConfig
from tokred_jax.io import batching, checkpoint, processing, templates
from tokred_jax.methods.base import Plan, Recipe, make_plan
from tokred_jax.models.config import ConfigError, LlavaConfig
from tokred_jax.models import llava_next, llava_onevision
from tokred_jax.models.llava import Llava

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
# The default model, trained on glyph_vqa (configs/glyph_llava.py), and its p-MoD
# variants: PRD's cosine at a mean kept ratio of 0.5, and a constant 0.25 on every layer.
DEFAULT_CHECKPOINT = os.path.join(_ASSETS, "glyph-llava")
PMOD_CHECKPOINT = os.path.join(_ASSETS, "glyph-llava-pmod")
PMOD_QUARTER_CHECKPOINT = os.path.join(_ASSETS, "glyph-llava-pmod-quarter")
# Random weights: the smallest model with every part, for tests and smoke runs.
TINY_CHECKPOINT = os.path.join(_ASSETS, "tiny-llava")


def default_prompt(checkpoint: str) -> str:
  """The question stored beside a checkpoint's sample image, or a generic one."""
  path = os.path.join(checkpoint, "sample_prompt.txt")
  if os.path.exists(path):
    with open(path) as f:
      return f.read().strip()
  return "What is in the image?"


def _check_inputs(images: Any, prompts: Any, what: str = "image"):
  """Lists of images (or videos) and prompts, one entry per prompt (raises TypeError /
  ValueError)."""
  if prompts is None or isinstance(prompts, str):
    given = "None" if prompts is None else "one string"
    raise TypeError(f"prompts must be a list of strings, one per image; got {given}: "
                    "pass [prompt].")
  if (isinstance(images, np.ndarray) and images.ndim != 4 or
      not isinstance(images, np.ndarray) and isinstance(images, processing.ImageLike)):
    raise TypeError(f"images must be a list, one image per prompt; got a single "
                    f"{type(images).__name__}: pass [image].")
  for name, given in (("images", images), ("prompts", prompts)):
    if not isinstance(given, (Sequence, np.ndarray)):
      raise TypeError(f"{name} must be a list, got {type(given).__name__}.")
  for b, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise TypeError(f"prompt {b} is {prompt!r}, not a string; write a question about "
                      "its image.")
  if len(images) != len(prompts):
    raise ValueError(f"got {len(images)} {what}s for {len(prompts)} prompts; give one "
                     f"entry per prompt (a list of images for several).")


def _check_sampling(sampling: Any, rng: Any):
  """A SamplingConfig and one PRNG key (or None) (raises TypeError if not)."""
  if not isinstance(sampling, SamplingConfig):
    raise TypeError(f"sampling must be a SamplingConfig, e.g. SamplingConfig("
                    f"max_new_tokens=32, temperature=0.7), got {sampling!r}.")
  if rng is None or isinstance(rng, (jax.Array, np.ndarray)) and (
      rng.shape == () and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) or
      rng.shape == (2,) and rng.dtype == np.uint32):
    return
  given = (f"an array of shape {rng.shape} and dtype {rng.dtype}"
           if hasattr(rng, "shape") and hasattr(rng, "dtype") else f"{rng!r}")
  raise TypeError(f"rng must be one PRNG key, e.g. jax.random.PRNGKey(0), got {given}.")


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
  path: str | os.PathLike | None = None  # The checkpoint directory, for `load_weights`.

  def __post_init__(self):
    self.model = Llava(self.cfg, self.dtype)
    if self.mesh is not None and self.params is not None:
      self.params = sharding.shard_params(self.params, self.mesh, self.rules)
    if self.buckets is None:
      self.buckets = tuple(processing.default_buckets(self.cfg.text.max_position_embeddings))
    self._forward_traces = collections.Counter()  # forward, and its MustDrop segments
    self._forward = jax.jit(self._forward_impl, static_argnames=("plan", "aux"))
    self._generators: dict[tuple[SamplingConfig, Plan], Generator] = {}
    self._segmented: dict[Plan, segmented.SegmentedPrefill] = {}

  def _forward_impl(self, p, b, plan, counts, aux):
    self._forward_traces["forward"] += 1
    return self.model.apply({"params": p}, b["input_ids"], b["pixel_values"],
                            b["attention_mask"], b["positions"], plan=plan, counts=counts,
                            return_aux=aux)

  @classmethod
  def load(cls, path: str = DEFAULT_CHECKPOINT, dtype: str = "float32",
           mesh_shape: dict[str, int] | None = None, template: str | None = None,
           weights: bool = True, **kwargs) -> "Pipeline":
    """Loads a Hugging Face LLaVA, LLaVA-NeXT or LLaVA-OneVision directory (config.json,
    safetensors, tokenizer.json).

    mesh_shape: e.g. {"data": 2, "fsdp": 1, "tensor": 4} (-1: the remaining devices)
    shards the parameters by logical axis over a mesh of this process's devices
    (`jax.local_devices()`: in a job of several processes each holds its own copy);
    batches must then be a multiple of data x fsdp.
    template: the chat template prompts are written in (tokred_jax.io.templates); None:
    the checkpoint's (see checkpoint.read_config).
    weights=False reads only config.json and the tokenizer and makes the mesh: that
    pipeline plans and prepares batches, so every input is checked before the weights
    (the expensive part) are read by `load_weights()`.
    """
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
    if template is not None:
      template = templates.get(template).name
    cfg = checkpoint.read_config(path)
    if template is not None:
      cfg = dataclasses.replace(cfg, template=template)
    tokenizer = processing.Tokenizer.load(path, cfg)
    if mesh_shape is not None:
      kwargs["mesh"] = sharding.make_mesh(mesh_shape, jax.local_devices())
    pipe = cls(cfg, None, tokenizer, DTYPES[dtype], path=path, **kwargs)
    return pipe.load_weights() if weights else pipe

  def load_weights(self) -> "Pipeline":
    """Reads the weights of `path` (checked against the config), sharded over the mesh
    if there is one; returns the pipeline."""
    if self.path is None:
      raise ValueError("this pipeline has no checkpoint path to read weights from; make "
                       "it with Pipeline.load(path, ...).")
    params = checkpoint.load_params(self.cfg, [(self.path, checkpoint.canonical_name)])
    self.params = (jax.tree_util.tree_map(jnp.asarray, params) if self.mesh is None
                   else sharding.shard_params(params, self.mesh, self.rules))
    return self

  @property
  def anyres(self) -> bool:
    """Whether the model takes anyres crops, several images and (OneVision) videos,
    whose plans are made per input bucket."""
    return self.cfg.arch != "llava"

  def recipe(self, method: str | Recipe | None = None, retention: float | None = None,
             mode: str = "fast", **kwargs) -> Recipe:
    """The recipe of a method by name (see `plan`), not yet planned for an input."""
    if isinstance(method, Recipe):
      return method
    return methods.get(method or "none", self.cfg, retention, mode, **kwargs)

  def plan(self, method: str | Recipe | Plan | None = None, retention: float | None = None,
           mode: str = "fast", budget: float | None = None, measure: str = "flops",
           text_tokens: int | None = None, packing=None, **kwargs) -> Plan:
    """The static plan of a token-reduction method for this model: a name from
    `methods.METHODS` / `methods.PRESETS` / `methods.PARTS`, or several joined with "+"
    (optionally at a retention level), a `Recipe`, or a plan already made. None: no
    reduction.

    budget: instead of a retention, the cost the method's parameters must meet, e.g.
    `pipe.plan("aim", budget=0.3)` for 30% of dense prefill FLOPs; measure "flops",
    "kv" (KV-cache bytes) or "tokens" (equivalent visual tokens, a count), at prompts of
    `text_tokens` text tokens (default `budget.TEXT_TOKENS`). See `solve`.
    packing: the input bucket, which the anyres models plan for (`batch_plan` finds it
    in a prepared batch)."""
    if budget is not None:
      return self.solve(method, budget, measure, text_tokens, mode, retention,
                        packing=packing, **kwargs).plan
    if text_tokens is not None:
      raise ConfigError("text_tokens is the prompt length a budget is solved at; give a "
                        "budget too, or leave it out.")
    if isinstance(method, Plan):
      return method
    return make_plan(self.recipe(method, retention, mode, **kwargs), self.cfg, packing)

  def batch_plan(self, batch: dict[str, Any], plan: str | Recipe | Plan | None = None
                 ) -> Plan:
    """`plan` planned for the input bucket of a prepared batch (a Plan as it is)."""
    return self.plan(plan, packing=batching.packing(batch["pixel_values"], self.cfg))

  def solve(self, method: str, budget: float, measure: str = "flops",
            text_tokens: int | None = None, mode: str = "fast",
            retention: float | None = None, packing=None, **kwargs) -> budgets.Solution:
    """The parameters of `method` (a name, composed ones such as "tome+fastv" included)
    that meet `budget` on this model, with the plan, what they achieve and whether that
    is within tolerance (`budget.solve`)."""
    if retention is not None:
      raise ConfigError("give a retention or a budget, not both: the budget sets the "
                        "retention.")
    if not isinstance(method, str):
      raise ConfigError(f"a budget is solved for a method by name (e.g. 'aim'), not "
                        f"{type(method).__name__}.")
    text = budgets.TEXT_TOKENS if text_tokens is None else text_tokens
    if packing is not None:  # the anyres models' input bucket
      kwargs["packing"] = packing
    return budgets.solve(self.cfg, method, budget, measure=measure, num_text_tokens=text,
                         mode=mode, **kwargs)

  def prepare(self, images: Sequence[Any] | None, prompts: Sequence[str],
              max_new_tokens: int = 0, chat_template: bool = True,
              plan: str | Recipe | Plan | None = None, template: str | None = None,
              videos: Sequence[Any] | None = None, num_frames: int = 32
              ) -> dict[str, np.ndarray]:
    """Images (paths, PIL images or uint8 arrays) and prompts -> padded model inputs,
    with as many image-token slots as the plan has visual tokens.

    The anyres models take, per prompt, one image or a list of them, or instead of
    images one video each in `videos` (u8[F, H, W, 3] frames, or a file path whose
    `num_frames` frames are sampled uniformly): LLaVA-OneVision only. A question names
    its images' places with `<image>` (a video's with `<video>` or `<image>`); without
    one they go first. Inputs are padded to a bucket (`batch_plan` plans for it).

    The prompts are questions, written into the chat template `template` (None: the
    model's, `cfg.template`); with chat_template=False, full prompts already in it.

    Every check runs here, before anything is compiled or computed; it needs no
    weights (see `load`).
    """
    if videos is not None and images is not None:
      raise ValueError("give images or videos, not both.")
    given, what = (images, "image") if videos is None else (videos, "video")
    _check_inputs(given, prompts, what)
    template = templates.get(template or self.cfg.template or "tokred")
    self._check_room(max_new_tokens)
    visuals = None
    if self.anyres:
      visuals = (batching.image_batch([i if isinstance(i, (list, tuple)) else [i]
                                       for i in images], self.cfg) if videos is None else
                 batching.video_batch(videos, self.cfg, num_frames))
      plan = self.plan(plan, packing=batching.packing(visuals.pixels, self.cfg))
      slots = [batching.slot_counts(c, plan.num_visual) for c in visuals.counts]
      prompts = [_placeholders(p, len(c)) for p, c in zip(prompts, visuals.counts)]
    else:
      if videos is not None or any(isinstance(i, (list, tuple)) for i in images):
        raise ValueError(f"this {self.cfg.arch} model takes one image per prompt; several "
                         "images and videos need a LLaVA-NeXT or OneVision checkpoint.")
      plan = self.plan(plan)
      slots = plan.num_visual
    if chat_template:
      prompts = [processing.build_prompt(p, template) for p in prompts]
    max_length = self.cfg.text.max_position_embeddings - max_new_tokens
    batch = processing.encode_batch(self.tokenizer, prompts, self.cfg, slots, self.buckets,
                                    max_length, template)
    batch["pixel_values"] = (processing.preprocess_images(images, self.cfg.vision)
                             if visuals is None else visuals.pixels)
    return batch

  def _check_room(self, max_new_tokens: int):
    """The prompt needs positions too: new tokens must leave room for it."""
    positions = self.cfg.text.max_position_embeddings
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
      raise TypeError(f"max_new_tokens must be a whole number, got {max_new_tokens!r}.")
    if not 0 <= max_new_tokens < positions:
      raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt: the "
                       f"model holds {positions} positions in all; ask for fewer new tokens.")

  def _validate(self, batch: dict[str, np.ndarray], plan: Plan):
    """Checks a batch and places it on the mesh, split on the batch axis."""
    if self.params is None:
      raise ValueError("this pipeline has no weights yet (Pipeline.load(..., "
                       "weights=False)); call pipe.load_weights() first.")
    pixels = batch["pixel_values"]
    # Anyres crops and video frames: each prompt's crops as a batch of the tower's inputs.
    crops = getattr(pixels, "pixels", None)
    processing.validate_pixels(pixels if crops is None else
                               crops.reshape((-1,) + crops.shape[2:]), self.cfg.vision)
    slots = np.sum(np.asarray(batch["input_ids"]) == self.cfg.image_token_id, axis=1)
    if np.any(slots != plan.num_visual):
      raise ValueError(f"the prompts hold {sorted(set(slots.tolist()))} image-token slots but "
                       f"the plan has {plan.num_visual} visual tokens; prepare the batch with "
                       "the same plan.")
    images, prompts = len(getattr(pixels, "pixels", pixels)), len(batch["input_ids"])
    if images != prompts:
      raise ValueError(f"pixel_values holds {images} inputs for {prompts} prompts; prepare "
                       "images and prompts together (Pipeline.prepare).")
    if self.mesh is None:
      return batch
    split = math.prod(self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape)
    if prompts % split:
      raise ValueError(f"a batch of {prompts} does not split over the mesh's data x fsdp = "
                       f"{split} devices; send a multiple of {split} prompts.")
    return jax.tree_util.tree_map(
        lambda v: jax.device_put(v, sharding.batch_sharding(self.mesh, np.ndim(v), self.rules)),
        batch)

  def _sharded(self):
    """Traces inside it lay activations out on the mesh (a no-op without one)."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.activation_sharding(self.mesh, self.rules)

  def forward(self, batch: dict[str, np.ndarray], plan: Plan | None = None,
              return_aux: bool = False):
    """Logits f32[B, T, V] for every position of a prepared batch (zeros where a
    fast-mode method pruned the token); with return_aux also which visual tokens
    survive each stage (see `Llava.__call__`)."""
    plan = self.batch_plan(batch, plan)
    batch = self._validate(batch, plan)
    with self._sharded():
      if plan.data_dependent and plan.mode == "fast":
        # Data-dependent counts: segments compacted to the counts met, real savings.
        if plan not in self._segmented:
          self._segmented[plan] = segmented.SegmentedPrefill(self.model, plan,
                                                             self._forward_traces)
        out = self._segmented[plan](self.params, batch, plan.counts())
        return (out["logits"], out["aux"]) if return_aux else out["logits"]
      return self._forward(self.params, batch, plan, plan.counts(), return_aux)

  def generator(self, sampling: SamplingConfig, plan: Plan | None = None
                ) -> Generator:
    plan = self.plan(plan)
    if (sampling, plan) not in self._generators:
      pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
      self._generators[sampling, plan] = Generator(self.model, sampling, pad, plan=plan)
    return self._generators[sampling, plan]

  @property
  def programs(self) -> collections.Counter:
    """Programs traced so far, by kind ("forward", "prefill", "decode", and MustDrop's
    "segments" with its "segment_caches"): one per plan, batch size and length bucket
    met (`buckets`; at most 35 up to 4,096 tokens with the default ladder)."""
    total = collections.Counter(self._forward_traces)
    for gen in self._generators.values():
      total.update(gen.trace_counts)
    return total

  def generate_tokens(self, batch: dict[str, np.ndarray], sampling: SamplingConfig,
                      rng: jax.Array | None = None, plan: Plan | None = None
                      ) -> tuple[np.ndarray, Timings]:
    """New tokens i32[B, max_new_tokens] for a prepared batch, and how long it took."""
    _check_sampling(sampling, rng)
    plan = self.batch_plan(batch, plan)
    batch = self._validate(batch, plan)
    gen = self.generator(sampling, plan)
    with self._sharded():
      start = time.perf_counter()
      logits, state = gen.prefill(self.params, batch, plan.counts())
      jax.block_until_ready(logits)
      mid = time.perf_counter()
      tokens = gen.decode(self.params, logits, state, rng)
      end = time.perf_counter()
    new = int(np.max(np.sum(tokens != gen.pad_token_id, axis=1))) if tokens.size else 0
    return tokens, Timings(mid - start, end - mid, new)

  def generate(self, images: Sequence[Any] | None, prompts: Sequence[str],
               sampling: SamplingConfig = SamplingConfig(), rng: jax.Array | None = None,
               plan: Plan | str | None = None, videos: Sequence[Any] | None = None
               ) -> list[str]:
    """Answers, one string per prompt, with the token reduction `plan` (see `plan`;
    images and videos as `prepare` takes them)."""
    _check_sampling(sampling, rng)
    if not self.anyres:
      plan = self.plan(plan)
    batch = self.prepare(images, prompts, sampling.max_new_tokens, plan=plan, videos=videos)
    tokens, _ = self.generate_tokens(batch, sampling, rng, self.batch_plan(batch, plan))
    return [self.tokenizer.decode(row) for row in tokens]

  def token_counts(self, batch: dict[str, np.ndarray], plan: Plan | None = None,
                   new_tokens: int = 0) -> dict[str, Any]:
    """Token counts of the first sample: real text tokens, the visual tokens the plan
    hands the LLM and its equivalent tokens (mean over LLM layers), the bucket length.
    MustDrop's counts depend on the image, so they are the ones the sample really got
    (one more prefill), its equivalent tokens in both conventions: each layer with the
    tokens it processed, and the official script's (a filter layer after its filter)."""
    plan = self.batch_plan(batch, plan)
    mask = np.asarray(batch["attention_mask"][0])
    slots = int(np.sum(np.asarray(batch["input_ids"][0]) == self.cfg.image_token_id))
    into_llm, per_layer, aux = plan.exact.visual, plan.visual_per_layer, {}
    if plan.data_dependent or plan.packing is not None:  # the sample's own counts
      _, aux = self.forward(batch, plan, return_aux=True)
      per_layer = np.asarray(aux["visual_per_layer"])[:, 0].tolist()
      into_llm = per_layer[0]
    counts = {"visual tokens before reduction": self._visual_tokens(batch["pixel_values"]),
              "visual tokens into the LLM": into_llm,
              "equivalent visual tokens": round(cost.equivalent_visual_tokens(per_layer), 1)}
    if "equivalent_tokens_official" in aux:
      counts["equivalent visual tokens, official MustDrop count"] = round(
          float(aux["equivalent_tokens_official"][0]), 1)
    if plan.packing is not None:
      counts["visual slots (bucket)"] = plan.num_visual
    return {**counts, "text tokens": int(mask.sum()) - slots,
            "bucket length": mask.shape[0], "new tokens": new_tokens}

  def cost(self, batch: dict[str, np.ndarray], plan: Plan | None = None,
           new_tokens: int = 0) -> dict[str, Any]:
    """Analytic prefill FLOPs per stage and KV-cache bytes of what the compiled program
    computes for a prepared batch (padding and bucket capacities included)."""
    plan = self.batch_plan(batch, plan)
    batch_size, length = batch["input_ids"].shape
    return cost.plan_cost(self.cfg, plan, length - plan.num_visual, batch_size, new_tokens,
                          jnp.dtype(self.dtype).itemsize)

  def _visual_tokens(self, pixels) -> int:
    """The first sample's visual tokens before any reduction."""
    if isinstance(pixels, llava_next.Crops):
      return int(np.sum(pixels.valid[0]))
    if isinstance(pixels, llava_onevision.Frames):
      pooled = llava_onevision.pooled_grid(self.cfg.vision.grid) ** 2
      return int(np.sum(pixels.valid[0])) * pooled + 1
    return self.cfg.num_image_tokens


def _placeholders(question: str, count: int) -> str:
  """A question with one `<image>` per image of its prompt (a video's `<video>` read as
  `<image>`: its slots are visual slots like any other); without any, they go first."""
  image = processing.IMAGE_TOKEN
  question = question.replace("<video>", image)
  if image not in question:
    question = f"{image}\n" * count + question.strip()
  return question
