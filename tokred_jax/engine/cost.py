"""Analytic cost of a LLaVA request: matmul FLOPs per stage, and KV-cache bytes.

Cost is counted from the token counts each stage and layer actually keeps (the counts a
reduction method's static plan fixes), so a table can say what a method saves.

Counting rule. Only matmuls are counted, each at 2·m·k·n FLOPs for an [m, k] × [k, n]
product (one multiply and one add per term), as XLA's HloCostAnalysis counts dot and
convolution (some papers count multiply-adds, half as many). Per stage, with N tokens
in a layer:

  vision tower  patch embedding (a matmul over flattened patches): P·(p·p·C)·Dv·2, then
                per layer run: q, k, v, o projections 4·N·Dv·Dv·2; scores QKᵀ and
                probs·V 2·N·N·Dv each (the full square: the matmul computes every
                entry); MLP fc1 + fc2 2·N·Dv·Fv·2. Only `LlavaConfig.vision_layers_used`
                layers run (LLaVA-1.5 reads layer -2, so 23 of CLIP's 24).
  projector     N_v·(Dv·Dt + Dt·Dt)·2 for the two linear layers.
  LLM           per layer with n query tokens and s key tokens (s = n in prefill): q and
                o projections 2·n·D·H·h each, k and v 2·n·D·K·h each, scores and values
                2·n·s·H·h each (full square again, causal or not), SwiGLU 3·2·n·D·F.
  lm_head       2·n_logits·D·V, where generation's prefill takes logits for the last
                position only (n_logits = 1) and a plain forward for every token.

A padded slot costs as much as a real one: to predict what a compiled program does,
pass the padded (bucketed) counts; to state a method's ideal cost, pass the real ones.

What XLA's `cost_analysis()['flops']` counts beyond these matmuls: one FLOP per element
for elementwise arithmetic and reductions — bias adds, residual adds, LayerNorm/RMSNorm
(square, mean, subtract, scale), RoPE's multiply-adds, the softmax's max, subtract, sum
and divide, the 1/√h scaling, the activations' multiplies (quick_gelu, SwiGLU's gate
product). Transcendentals (exp, tanh, erf, rsqrt, sigmoid, sin/cos) go to a separate
'transcendentals' count. All of these are O(N·D) or O(N·N·H) with small constants
against the matmuls' O(N·D²): on the test config (D = 512, F = 2048, 401 tower and
448 LLM tokens, compiled for CPU) the remainder is 0.4-0.6% of XLA's count per stage
(tests/test_cost.py asserts it is under 2% and prints it on failure). The comparison
holds while attention runs as XLA dots (`jax.nn.dot_product_attention`'s default); a
fused attention kernel is a custom call, whose FLOPs cost analysis does not see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tokred_jax.models.config import LlavaConfig

Counts = int | Sequence[int]


@dataclasses.dataclass(frozen=True)
class StageFlops:
  """Matmul FLOPs of one stage of one sample, and the batch they are multiplied by.

  Attributes:
    per_layer: FLOPs of each layer run, for one sample; empty for stages without layers.
    extra: FLOPs outside the layer stack, for one sample (the patch embedding; the
      projector; the LM head).
    batch: number of samples.
  """
  per_layer: tuple[int, ...]
  extra: int
  batch: int

  @property
  def per_sample(self) -> int:
    return sum(self.per_layer) + self.extra

  @property
  def total(self) -> int:
    return self.batch * self.per_sample


@dataclasses.dataclass(frozen=True)
class PrefillFlops:
  """Matmul FLOPs of a prefill, by stage."""
  vision: StageFlops
  projector: StageFlops
  llm: StageFlops
  lm_head: StageFlops

  @property
  def total(self) -> int:
    return sum(s.total for s in (self.vision, self.projector, self.llm, self.lm_head))

  def as_dict(self) -> dict[str, int]:
    """Batch totals per stage and overall, e.g. for a table row."""
    return dict(vision=self.vision.total, projector=self.projector.total,
                llm=self.llm.total, lm_head=self.lm_head.total, total=self.total)


@dataclasses.dataclass(frozen=True)
class KvBytes:
  """KV-cache bytes of each decoder layer, for the whole batch."""
  per_layer: tuple[int, ...]

  @property
  def total(self) -> int:
    return sum(self.per_layer)


def _per_layer(counts: Counts, num_layers: int, what: str) -> tuple[int, ...]:
  """An int (the same count in every layer) or one count per layer -> a checked tuple."""
  if isinstance(counts, int):
    counts = (counts,) * num_layers
  counts = tuple(counts)
  if len(counts) != num_layers:
    raise ValueError(f"{what}: got {len(counts)} per-layer counts for {num_layers} layers.")
  if any(not isinstance(c, int) or c < 0 for c in counts):
    raise ValueError(f"{what}: counts must be non-negative ints, got {counts}.")
  return counts


def _check_batch(batch: int):
  if not isinstance(batch, int) or batch < 1:
    raise ValueError(f"batch must be a positive int, got {batch!r}.")


def vision_flops(cfg: LlavaConfig, batch: int = 1, tokens_per_layer: Counts | None = None,
                 mlp_tokens_per_layer: Counts | None = None,
                 images_per_sample: int = 1) -> StageFlops:
  """Matmul FLOPs of the vision tower.

  Args:
    cfg: the model.
    batch: number of samples.
    tokens_per_layer: tokens entering each of the `cfg.vision_layers_used` layers run
      (attention side); default: the full sequence (patches, plus CLS for CLIP).
    mlp_tokens_per_layer: tokens entering each layer's MLP, for methods that merge
      between attention and MLP (ToMe); default: `tokens_per_layer`.
    images_per_sample: tower passes per sample (LLaVA-NeXT's base image and tiles).

  Returns:
    StageFlops whose per-layer and extra (patch embedding) figures cover all of a
    sample's images.
  """
  _check_batch(batch)
  v, n_layers = cfg.vision, cfg.vision_layers_used
  attn_n = _per_layer(v.seq_len if tokens_per_layer is None else tokens_per_layer,
                      n_layers, "vision tokens_per_layer")
  mlp_n = attn_n if mlp_tokens_per_layer is None else _per_layer(
      mlp_tokens_per_layer, n_layers, "vision mlp_tokens_per_layer")
  d, f = v.hidden_size, v.intermediate_size
  per_layer = tuple(
      images_per_sample * (4 * 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * m * d * f)
      for n, m in zip(attn_n, mlp_n))
  patch_embed = 2 * v.num_patches * v.patch_size ** 2 * v.num_channels * d
  return StageFlops(per_layer, images_per_sample * patch_embed, batch)


def projector_flops(cfg: LlavaConfig, num_visual_tokens: int | None = None,
                    batch: int = 1) -> StageFlops:
  """Matmul FLOPs of the 2-layer MLP projector on a sample's `num_visual_tokens` (all its
  images, after any pre-LLM reduction; default: one image's `cfg.num_image_tokens`)."""
  _check_batch(batch)
  n = cfg.num_image_tokens if num_visual_tokens is None else num_visual_tokens
  dv, dt = cfg.vision.hidden_size, cfg.text.hidden_size
  return StageFlops((), 2 * n * (dv * dt + dt * dt), batch)


def llm_layer_flops(cfg: LlavaConfig, num_tokens: int, num_kv_tokens: int | None = None) -> int:
  """Matmul FLOPs of one decoder layer: `num_tokens` queries over `num_kv_tokens` keys
  (default: the same tokens, as in prefill), for one sample."""
  t = cfg.text
  s = num_tokens if num_kv_tokens is None else num_kv_tokens
  n, d = num_tokens, t.hidden_size
  q_and_o = 2 * 2 * n * d * t.num_heads * t.head_dim
  k_and_v = 2 * 2 * n * d * t.num_kv_heads * t.head_dim
  scores_and_values = 2 * 2 * n * s * t.num_heads * t.head_dim
  mlp = 3 * 2 * n * d * t.intermediate_size
  return q_and_o + k_and_v + scores_and_values + mlp


def llm_flops(cfg: LlavaConfig, tokens_per_layer: Counts, kv_tokens_per_layer: Counts | None = None,
              batch: int = 1) -> StageFlops:
  """Matmul FLOPs of the decoder layer stack (no LM head).

  Args:
    cfg: the model.
    tokens_per_layer: tokens each layer processes (int for all layers, or one per
      layer: after in-LLM pruning or routing, layers differ).
    kv_tokens_per_layer: keys each layer attends over; default `tokens_per_layer`
      (prefill). For a decode step, the cache length including the new token.
    batch: number of samples.
  """
  _check_batch(batch)
  n_layers = cfg.text.num_layers
  q = _per_layer(tokens_per_layer, n_layers, "llm tokens_per_layer")
  kv = q if kv_tokens_per_layer is None else _per_layer(
      kv_tokens_per_layer, n_layers, "llm kv_tokens_per_layer")
  return StageFlops(tuple(llm_layer_flops(cfg, n, s) for n, s in zip(q, kv)), 0, batch)


def lm_head_flops(cfg: LlavaConfig, logits_tokens: int = 1, batch: int = 1) -> StageFlops:
  """Matmul FLOPs of the LM head on `logits_tokens` positions per sample."""
  _check_batch(batch)
  return StageFlops((), 2 * logits_tokens * cfg.text.hidden_size * cfg.text.vocab_size, batch)


def prefill_flops(cfg: LlavaConfig, num_text_tokens: int, num_visual_tokens: int | None = None,
                  batch: int = 1, llm_tokens_per_layer: Counts | None = None,
                  logits_tokens: int = 1, vision_tokens_per_layer: Counts | None = None,
                  images_per_sample: int = 1) -> PrefillFlops:
  """Matmul FLOPs of a LLaVA prefill, by stage.

  Args:
    cfg: the model.
    num_text_tokens: text tokens of the prompt (the image placeholder excluded).
    num_visual_tokens: visual tokens leaving the projector, after any pre-LLM reduction;
      default: `images_per_sample * cfg.num_image_tokens`.
    batch: number of samples.
    llm_tokens_per_layer: tokens each decoder layer processes (in-LLM pruning and
      routing make them differ); default: all text and visual tokens in every layer.
    logits_tokens: positions per sample given logits: 1 in generation, the whole
      sequence in a plain forward.
    vision_tokens_per_layer: see `vision_flops`'s `tokens_per_layer`.
    images_per_sample: tower passes per sample.
  """
  if num_visual_tokens is None:
    num_visual_tokens = images_per_sample * cfg.num_image_tokens
  if llm_tokens_per_layer is None:
    llm_tokens_per_layer = num_text_tokens + num_visual_tokens
  return PrefillFlops(
      vision=vision_flops(cfg, batch, vision_tokens_per_layer,
                          images_per_sample=images_per_sample),
      projector=projector_flops(cfg, num_visual_tokens, batch),
      llm=llm_flops(cfg, llm_tokens_per_layer, batch=batch),
      lm_head=lm_head_flops(cfg, logits_tokens, batch))


def decode_step_flops(cfg: LlavaConfig, cache_tokens_per_layer: Counts,
                      batch: int = 1) -> StageFlops:
  """Matmul FLOPs of one decode step (decoder layers and LM head on one new token per
  sample), given each layer's cache length before the step. The LM head is in `extra`."""
  kv = _per_layer(cache_tokens_per_layer, cfg.text.num_layers, "decode cache_tokens_per_layer")
  stack = llm_flops(cfg, 1, tuple(s + 1 for s in kv), batch)
  return StageFlops(stack.per_layer, lm_head_flops(cfg, 1).per_sample, batch)


def equivalent_visual_tokens(visual_tokens_per_layer: Sequence[int]) -> float:
  """The field's "equivalent tokens": the mean visual-token count over LLM layers, each
  layer counted with the visual tokens it processed (a MustDrop filter layer with its
  pre-filter count; see `mustdrop.equivalent_tokens_official` for the other convention)."""
  counts = tuple(visual_tokens_per_layer)
  if not counts:
    raise ValueError("equivalent_visual_tokens needs at least one layer's count.")
  return sum(counts) / len(counts)


def kv_cache_bytes(cfg: LlavaConfig, tokens_per_layer: Counts, batch: int = 1,
                   bytes_per_element: int = 2) -> KvBytes:
  """Bytes of the keys and values each decoder layer caches.

  Args:
    cfg: the model.
    tokens_per_layer: cache length of each layer (int for all layers).
    batch: number of samples.
    bytes_per_element: 2 for bfloat16/float16, 4 for float32.

  Returns:
    KvBytes: per layer 2 (k and v) · tokens · K · h · bytes_per_element · batch.
  """
  _check_batch(batch)
  t = cfg.text
  counts = _per_layer(tokens_per_layer, t.num_layers, "kv tokens_per_layer")
  per_token = 2 * t.num_kv_heads * t.head_dim * bytes_per_element * batch
  return KvBytes(tuple(n * per_token for n in counts))


def _stage_extras(cfg: LlavaConfig, plan, num_text: int, visual_in, processed) -> dict:
  """The stages' own FLOPs per sample (scorers, routers, key projections), by stage."""
  extra = {"vision": 0, "llm": 0}
  for stage in plan.stages:
    for where, flops in stage.extra_flops(cfg, num_text, visual_in, processed).items():
      extra[where] += flops
  return extra


def plan_cost(cfg: LlavaConfig, plan, num_text_tokens: int, batch: int = 1,
              new_tokens: int = 0, bytes_per_element: int = 2, exact: bool = False
              ) -> dict:
  """Prefill FLOPs per stage, KV-cache bytes and equivalent tokens of a plan.

  plan: a `methods.base.Plan`. num_text_tokens: the prompt's non-image slots (with the
  padding, to predict the compiled program). exact=False counts the plan's static
  capacities, i.e. what the compiled program computes; exact=True the exact counts
  (the method's ideal). Reference mode only masks, so its LLM layers and caches keep
  every token whatever the plan prunes. Each stage adds its own FLOPs
  (`StagePlan.extra_flops`).
  """
  ex = plan.exact
  if exact:
    vision_in, vision_mlp = ex.vision_tokens, ex.vision_mlp
    visual, projector_in = ex.visual, ex.projector
    llm_visual, mod_visual = ex.llm_visual, ex.mod_visual
  else:
    vision_in, vision_mlp = plan.vision_tokens, plan.vision_mlp
    visual, projector_in = plan.num_visual, plan.projector_tokens
    llm_visual, mod_visual = plan.llm_visual, plan.mod_visual
  # Anyres models run the tower and projector on every crop (or frame) of the bucket.
  crops = 1 if plan.packing is None else plan.packing.crops
  vision = vision_flops(cfg, batch, vision_in, vision_mlp, images_per_sample=crops)
  projector = projector_flops(cfg, crops * projector_in, batch)
  layers = cfg.text.num_layers
  if plan.mode == "reference":
    llm_tokens = (num_text_tokens + visual,) * layers
    visual_in = (visual,) * layers
  else:
    llm_tokens = tuple(num_text_tokens + (v if m is None else m)
                       for v, m in zip(llm_visual, mod_visual))
    visual_in = llm_visual
  extra = _stage_extras(cfg, plan, num_text_tokens, visual_in, llm_tokens)
  vision = dataclasses.replace(vision, extra=vision.extra + crops * extra["vision"])
  llm = dataclasses.replace(llm_flops(cfg, llm_tokens, batch=batch), extra=extra["llm"])
  flops = PrefillFlops(vision, projector, llm, lm_head_flops(cfg, 1, batch))
  kv = kv_cache_bytes(cfg, [n + new_tokens for n in llm_tokens], batch, bytes_per_element)
  return dict(flops=flops, kv_bytes=kv, llm_tokens=llm_tokens,
              equivalent_tokens=equivalent_visual_tokens(plan.visual_per_layer))


def request_cost(cfg: LlavaConfig, plan, num_text_tokens: int, vision_tokens: int,
                 visual_per_layer: Sequence[int], new_tokens: int = 0,
                 bytes_per_element: int = 2) -> dict:
  """Cost of ONE request under a data-dependent plan (MustDrop), from the counts it
  really got (the forward's aux: `vision_tokens`, `visual_per_layer`), as `plan_cost`.

  Vision: layer 0 on the whole sequence, the later layers on CLS + the `vision_tokens`
  left after the vision cut. LLM: each layer on the text and its visual count. The
  data-dependent stages add their own FLOPs, say which tokens each layer caches and
  what else to report (`request_extras`, e.g. MustDrop's key set and filters, its
  output-aware cache and `equivalent_tokens_official`). (`plan_cost` on such a plan
  gives the upper bound: every capacity full.)
  """
  layers = cfg.text.num_layers
  visual = _per_layer(tuple(int(v) for v in visual_per_layer), layers, "visual_per_layer")
  n = int(cfg.vision.has_cls) + int(vision_tokens)
  run = cfg.vision_layers_used
  cut = any(kind == "vision" for kind, _ in plan.cuts)
  vision = vision_flops(cfg, 1, (cfg.vision.seq_len,) + (n if cut else cfg.vision.seq_len,)
                        * (run - 1))
  projector = projector_flops(cfg, int(vision_tokens))
  llm_tokens = tuple(num_text_tokens + v for v in visual)
  extra, cached, report = {"vision": 0, "llm": 0}, list(llm_tokens), {}
  for stage in plan.stages:
    if hasattr(stage, "request_extras"):
      got = stage.request_extras(cfg, num_text_tokens, vision_tokens, llm_tokens)
      extra["vision"] += got["vision"]
      extra["llm"] += got["llm"]
      cached, report = got["cached"], {**report, **got["report"]}
  vision = dataclasses.replace(vision, extra=vision.extra + extra["vision"])
  llm = dataclasses.replace(llm_flops(cfg, llm_tokens), extra=extra["llm"])
  flops = PrefillFlops(vision, projector, llm, lm_head_flops(cfg, 1))
  kv = kv_cache_bytes(cfg, [c + new_tokens for c in cached], 1, bytes_per_element)
  return dict(flops=flops, kv_bytes=kv, llm_tokens=llm_tokens,
              equivalent_tokens=equivalent_visual_tokens(visual), **report)
