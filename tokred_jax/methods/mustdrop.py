"""MustDrop: multi-stage vision token dropping (training-free).

Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
Language Model", arXiv 2411.10803; official code liuting20/MustDrop (LLaVA-1.5, built
on SparseVLM). METHODS.md §2 states the semantics. This module holds each stage's
computation as a pure, jit-able function of arrays and Python numbers; every shape is
static and every data-dependent count is a mask.

  vision   `window_merge` after ViT layer 0 (patch tokens, CLS excluded);
           `cls_attention` and `key_tokens` at the tower's last layer.
  prune    `dual_attention_drop` after the LLM layers in `FILTER_LAYERS` (prefill).
  decode   `output_aware_keep`: which entries of each layer's KV cache to keep.
  (reference mode) `renumber_positions`: the official code's position ids.

What the official code does beyond METHODS.md (files under llava/model/):
- Window merge (multimodal_encoder/local_merge.py, clip_encoder.py): it asserts that
  the window divides the 24×24 grid (no remainder handling; we raise ValueError). The
  merged count is the MINIMUM over the batch of the windows passing the threshold, and
  each sample merges that many of its best windows; its evaluation runs batch size 1,
  where this is "every window >= threshold" — what we do, per sample. Similarity is
  on layer 0's output hidden states. The merged token is the plain mean of the window
  (its `size` is discarded: later ViT layers use no proportional attention). Token
  order after the merge: CLS, the merged windows by descending score, then the
  unmerged patches in raster order; the LLM gets the visual tokens (and consecutive
  positions) in this order, so merged windows come first, not at their place.
- Key set (clip_encoder.py): the CLS row of the LAST ViT layer's softmax attention
  (layer 23 of 24, which runs although LLaVA reads the output of layer 22), softmax over
  CLS + all patches, CLS column then dropped without renormalising; head mean; top
  ceil(0.08 · N') with N' the post-merge patch count, as indices in the merged order.
- Filter (language_model/modelling_sparse_llama.py): after 0-based layers
  (2, 6, 10, 14), from that layer's eager attention: full causal softmax rows (all
  keys, in the model's float16), rows = every token after the image, columns = the
  visual tokens still present; Σ_k g_k sums the visual columns only; both tests are
  strict (<). Key tokens are added back (union), and the dropped tokens are removed
  from the sequence for all later layers, with position ids renumbered 0..T'−1. Its
  "equivalent tokens" average counts each filter layer with its post-filter count.
- KV cache: after prefill, layers 0–1 keep their whole cache and every layer >= 2 is
  cut to the tokens that survived layer 14. In decoding the new token's position id in
  each layer is that layer's cache length (so layers 0–1 and the others disagree).

In the model two stages carry it (`build`, `methods.get("mustdrop-64", cfg)`): `Window`,
the window merge after tower layer 0, and `KeyFilter`: the key set, the filters, the
output-aware cache and the official decode positions.
- fast mode (default): the prefill runs in segments cut at the data-dependent points
  (engine/segmented.py), each compacted to a capacity above the batch's largest count
  (by default one program at the capacities the prompt shape needed before, checked on
  the device; `sizing` in `build`), so later layers really run on fewer tokens and layers
  >= the first filter cache only the text and the last survivors. Every sample keeps its own counts
  and every token its position (the official code renumbers: see reference mode).
- reference mode: one program that masks; positions renumbered after each filter
  (`renumber_positions`), and in decoding each layer continues from its own cache's
  live entries, as the official code does. It matches the official code at batch
  size 1 (whose window merge takes the minimum count over a batch).
- fast mode in one program (`Llava.__call__` under one jit) masks with original
  positions: equal to the segmented run wherever both hold a token; no savings.
- Aux `equivalent_tokens` counts each layer with the visual tokens it processed (a
  filter layer before its filter); `equivalent_tokens_official` counts a filter layer
  after its filter, as the official script does.

Axis letters as in layers.py: B batch, T tokens, H query heads, K key/value heads,
h head dim; N tokens of the vision tower, W windows, M patches per window.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from tokred_jax.core import attention, tokens
from tokred_jax.methods.base import SIZINGS, LADDER, Flow, Recipe, Stage, StagePlan
from tokred_jax.models import llava_onevision
from tokred_jax.models.config import ConfigError, LlavaConfig

# Presets (official scripts/v1_5/eval/textvqa_*.sh): (gamma, alpha) = the global and
# individual thresholds. The labels are the AVERAGE visual-token count over the 32
# layers, not caps: the count each filter keeps is data-dependent.
PRESETS = {"192": (0.001, 0.001), "128": (0.0012, 0.001), "64": (0.011, 0.01)}
FILTER_LAYERS = (2, 6, 10, 14)  # 0-based LLM layers whose attention filters.
WINDOW = 3  # The official window side (the paper's figure shows 2).
MERGE_THRESHOLD = 0.8
KEY_RATIO = 0.08

_HIGHEST = jax.lax.Precision.HIGHEST
# torch.nn.functional.cosine_similarity's eps: norms are clamped to at least this.
_COS_EPS = 1e-8


def _window_members(grid: int, window: int) -> np.ndarray:
  """Patch slots of every window, i32[W, M] (M = window²): windows row-major over the
  grid, members row-major inside a window, as the official einops rearrange."""
  g = grid // window
  slots = np.arange(grid * grid, dtype=np.int32).reshape(g, window, g, window)
  return slots.transpose(0, 2, 1, 3).reshape(g * g, window * window)


def _check_grid(n: int, grid: int, window: int) -> None:
  if not isinstance(window, int) or window < 2:
    raise ValueError(f"window must be an int >= 2 (a window of one token has no pairs); "
                     f"got {window!r}.")
  if grid * grid != n:
    raise ValueError(f"a {grid}x{grid} grid has {grid * grid} patches but the set has "
                     f"{n} (pass the patch tokens only, CLS excluded).")
  if grid % window:
    # The official code asserts this; a remainder would need a choice it never made.
    raise ValueError(f"window {window} does not divide the {grid}x{grid} patch grid.")


def window_scores(features: jax.Array, grid: int, window: int = WINDOW) -> jax.Array:
  """Mean pairwise cosine similarity inside each non-overlapping window.

  score_w = Σ_{i≠j} cos(x_i, x_j) / (M (M − 1)) over the M = window² patches of window
  w (self-pairs excluded), in float32; a zero vector has similarity 0 to everything.

  Args:
    features: f32[B, N, D] patch tokens in raster order, N = grid² (CLS excluded).
    grid: side of the patch grid (static).
    window: side of a window (static), dividing `grid`.

  Returns:
    f32[B, W], W = (grid / window)², windows in row-major order.
  """
  _check_grid(features.shape[1], grid, window)
  members = _window_members(grid, window)
  m = members.shape[1]
  x = features.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), _COS_EPS**2))
  xw = x[:, members]  # [B, W, M, D]
  sims = jnp.einsum("bwid,bwjd->bwij", xw, xw, precision=_HIGHEST)
  off_diagonal = ~np.eye(m, dtype=bool)
  return jnp.sum(jnp.where(off_diagonal, sims, 0.0), axis=(-2, -1)) / (m * (m - 1))


def window_merge(ts: tokens.TokenSet, grid: int, window: int = WINDOW,
                 threshold: float = MERGE_THRESHOLD) -> tokens.TokenSet:
  """MustDrop's local spatial merge (after ViT layer 0).

  Cuts the patch grid into non-overlapping window×window windows. Every window whose
  `window_scores` is >= threshold and whose members are all valid becomes ONE token:
  the plain mean of its members (size: the sum of theirs); the other valid patches stay
  as they are. A window with an invalid member never merges, so outputs never depend
  on what invalid slots hold.

  Output order (the official one): the merged windows by descending score (ties: lower
  window first), then the unmerged patches in raster order, then padding. Valid tokens
  are a prefix, so the caller can cut the set to a bucketed capacity with
  `tokens.compact` once it knows a bound on the count, which is data-dependent:
  N − (M − 1) · (merged windows) for a fully valid grid.

  ts: the patch tokens in raster order, features f32[B, N, D], N = grid² (CLS
  excluded); grid, window: sides of the patch grid and of a window (static; the window
  divides the grid, 3 officially); threshold: a Python float or a traced f32[] (changing
  it does not recompile). Returns a TokenSet of length N; `sources` map every patch of
  a merged window to its token.
  """
  b, n, _ = ts.features.shape
  scores = window_scores(ts.features, grid, window)  # Also checks the arguments.
  members = _window_members(grid, window)
  num_windows = members.shape[0]
  window_of = np.empty(n, np.int32)
  window_of[members] = np.arange(num_windows, dtype=np.int32)[:, None]

  merged = ts.valid[:, members].all(-1) & (scores >= threshold)  # [B, W]
  absorbed = merged[:, window_of]  # [B, N] patches inside a merged window
  means = ts.features.astype(jnp.float32)[:, members].mean(axis=2)
  sums = ts.sizes[:, members].sum(axis=2)

  # An extended set, slots 0..N−1 the patches and N..N+W−1 the window tokens, from
  # which one `gather` takes the output in order (it also carries `sources` along).
  slot_map = jnp.where(absorbed, n + window_of, np.arange(n, dtype=np.int32))
  unmerged = ts.valid & ~absorbed
  ext = tokens.TokenSet(
      features=jnp.concatenate([ts.features, means.astype(ts.features.dtype)], axis=1),
      valid=jnp.concatenate([unmerged, merged], axis=1),
      sizes=jnp.concatenate([ts.sizes, sums], axis=1),
      sources=tokens.remap(ts.sources, slot_map))
  # Sort keys: group (merged windows, unmerged patches, empty), then -score within the
  # merged group, then slot (raster order for patches, window index on score ties).
  group = jnp.concatenate([jnp.where(unmerged, 1, 2), jnp.where(merged, 0, 2)], axis=1)
  key = jnp.concatenate([jnp.zeros((b, n), jnp.float32),
                         jnp.where(merged, -scores, 0.0)], axis=1)
  iota = jnp.broadcast_to(jnp.arange(n + num_windows, dtype=jnp.int32), group.shape)
  group, _, order = jax.lax.sort((group.astype(jnp.int32), key, iota), num_keys=3)
  return tokens.gather(ext, order[:, :n], group[:, :n] < 2)


def cls_attention(q_cls: jax.Array, k: jax.Array, valid: jax.Array) -> jax.Array:
  """The CLS query's row of one ViT layer's softmax attention, and nothing else.

  weights = softmax(q_cls · kᵀ / √h) over the valid keys, per head, in float32. As in
  the official code, the CLS token's own key takes part in the softmax; drop its
  column afterwards (`[..., 1:]` in the tower's layout) WITHOUT renormalising, then
  pass the patch columns to `key_tokens`.

  Args:
    q_cls: f32[B, H, h] the layer's query of the CLS token (projected, before scaling).
    k: f32[B, N, H, h] the layer's keys of all tower tokens, CLS included.
    valid: bool[B, N] tokens that may be attended to (False: empty merge capacity).

  Returns:
    f32[B, H, N]: attention weights, 0 at invalid keys.
  """
  b, num_heads, head_dim = q_cls.shape
  n = k.shape[1]
  if k.shape != (b, n, num_heads, head_dim):
    raise ValueError(f"keys {k.shape} do not match the query {q_cls.shape}: expected "
                     f"[{b}, N, {num_heads}, {head_dim}].")
  logits = attention.row_logits(q_cls, k) / math.sqrt(head_dim)
  return jax.nn.softmax(logits, axis=-1, where=valid[:, None, :])


def key_tokens(cls_attention: jax.Array, valid: jax.Array,
               ratio: float = KEY_RATIO) -> jax.Array:
  """MustDrop's key set: the tokens the CLS token attends to most.

  The head mean of the CLS attention ranks the valid tokens; the top ceil(ratio · n)
  are key tokens, n the sample's own valid count (a traced value: changing it does not
  recompile). The static capacity of the selection is ceil(ratio · N). The ceiling is
  taken in float64 as the official code's math.ceil does (0.08 · 576 = 46.08 -> 47).
  Ties go to the lower slot.

  Args:
    cls_attention: f32[B, H, N] CLS row of the last ViT layer's attention over the
      post-merge patch tokens (CLS column dropped; see `cls_attention`).
    valid: bool[B, N] the post-merge tokens that exist.
    ratio: fraction kept as keys, in (0, 1] (static).

  Returns:
    bool[B, N]: True for key tokens (always valid ones).
  """
  n = cls_attention.shape[2]
  if not 0 < ratio <= 1:
    raise ValueError(f"ratio must lie in (0, 1], got {ratio}.")
  # ceil(ratio · count) for every count 0..N, so a traced count gets the exact value.
  table = np.array([math.ceil(ratio * c) for c in range(n + 1)], np.int32)
  count = jnp.asarray(table)[jnp.sum(valid, axis=1)]
  scores = jnp.mean(cls_attention.astype(jnp.float32), axis=1)
  index, kept = tokens.topk_indices(scores, valid, int(table[n]), count)
  return jax.vmap(lambda i, k: jnp.zeros((n,), bool).at[i].set(k))(index, kept)


def dual_attention_stats(q: jax.Array, k: jax.Array, text_query: jax.Array,
                         visual_alive: jax.Array, key_valid: jax.Array,
                         text_capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Global and individual attention each visual token gets from the text.

  With A_h the softmax attention of head h (grouped-query: head i reads kv head
  i // (H / K)), each text query's softmax running over every valid key at or before
  it (causal, the full row as in the official code), and Ā = mean_h A_h:
    g_j = Σ_t Ā[t, j],  m_j = max_t Ā[t, j]
  for text queries t and live visual tokens j. Only the text rows of the logits are
  computed (|text| × T per head: the visual block plus what the row normalisers need),
  in float32; the text rows are first gathered into `text_capacity` slots.

  Args:
    q: f32[B, T, H, h] post-RoPE queries of the filter layer.
    k: f32[B, T, K, h] post-RoPE keys, H % K == 0.
    text_query: bool[B, T] the text tokens after the image (question and assistant
      prefix) whose attention counts.
    visual_alive: bool[B, T] visual tokens not yet dropped.
    key_valid: bool[B, T] tokens that may be attended to (valid and not dropped).
    text_capacity: static bound on text queries per sample (None: T). Rows beyond it
      (in slot order) are ignored, so it must hold them all; with the visual block
      occupying V slots of the stream, T − V is always safe.

  Returns:
    (g, m), each f32[B, T]: the statistics at live visual slots, 0 elsewhere.
  """
  t, head_dim = q.shape[1], q.shape[3]
  attention.check_grouped_heads(q, k)
  capacity = t if text_capacity is None else text_capacity
  rows, row_ok = tokens.compact_indices(text_query, capacity)  # [B, Q]
  q_rows = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
  # At HIGHEST precision: the presets compare attention weights with thresholds of 0.001.
  logits = attention.grouped_logits(q_rows, k) / math.sqrt(head_dim)
  visible = ((jnp.arange(t)[None, None, :] <= rows[:, :, None]) & row_ok[:, :, None]
             & key_valid[:, None, :])  # [B, Q, T]
  # `where` leaves masked entries (junk, even NaN, in invalid slots) at exactly 0.
  probs = jax.nn.softmax(logits, axis=-1, where=visible[:, None])
  visual = visual_alive & key_valid
  mean = jnp.where(visible & visual[:, None, :], jnp.mean(probs, axis=1), 0.0)
  return jnp.sum(mean, axis=1), jnp.max(mean, axis=1)


def dual_attention_drop(q: jax.Array, k: jax.Array, text_query: jax.Array,
                        visual_alive: jax.Array, key_valid: jax.Array,
                        key_token: jax.Array, gamma, alpha,
                        text_capacity: int | None = None) -> jax.Array:
  """MustDrop's dual-attention filter: which live visual tokens survive this layer.

  Visual token j is dropped iff g_j < gamma · Σ_k g_k AND m_j < alpha (both strict;
  the sum over the live visual tokens only), unless it is a key token. g and m as in
  `dual_attention_stats`. gamma = alpha = 0 keeps everything.

  Args:
    q, k, text_query, visual_alive, key_valid, text_capacity: as for
      `dual_attention_stats`.
    key_token: bool[B, T] the key set (from `key_tokens`, spliced into the stream).
    gamma, alpha: the global and individual thresholds (`PRESETS`): Python floats or
      traced f32[] (changing them does not recompile).

  Returns:
    bool[B, T]: True at the live visual tokens that survive, False elsewhere (text
    included: the filter only speaks for visual tokens).
  """
  g, m = dual_attention_stats(q, k, text_query, visual_alive, key_valid, text_capacity)
  visual = visual_alive & key_valid
  total = jnp.sum(jnp.where(visual, g, 0.0), axis=1, keepdims=True)
  drop = (g < gamma * total) & (m < alpha) & ~key_token
  return visual & ~drop


def output_aware_keep(cache_valid: Sequence[jax.Array],
                      cache_index: Sequence[jax.Array] | None = None,
                      first_layers: int = FILTER_LAYERS[0]) -> tuple[jax.Array, ...]:
  """The output-aware KV cache: which entries each layer keeps for decoding.

  Once, after prefill: layers < first_layers keep their whole cache; every later layer
  keeps only the tokens that survived the LAST filter, which are exactly the tokens of
  the last layer's cache (text is never dropped). No re-scoring while decoding.

  cache_valid: L masks bool[B, T_l] (or a stacked bool[L, B, T]), the keys layer l
  attended to in prefill (layer 0 holds the whole prompt); cache_index: L arrays
  i32[B, T_l], each slot's index in the prompt, or None when every cache lies over the
  same T prompt slots (one program); first_layers: how many leading layers keep their
  whole cache (static; officially the first filter layer, 2). Returns L masks
  bool[B, T_l], each within `cache_valid[l]`.
  """
  num_layers = len(cache_valid)
  if not 0 <= first_layers <= num_layers:
    raise ValueError(f"first_layers must lie in [0, {num_layers}], got {first_layers}.")
  if cache_index is None:
    survived = cache_valid[-1]
    cache_index = [None] * num_layers
  else:
    t = cache_valid[0].shape[1]
    survived = jax.vmap(lambda i, v: jnp.zeros((t,), bool).at[i].max(v))(
        cache_index[-1], cache_valid[-1])
  keep = []
  for layer, (valid, index) in enumerate(zip(cache_valid, cache_index)):
    if layer >= first_layers:
      valid = valid & (survived if index is None
                       else jnp.take_along_axis(survived, index, axis=1))
    keep.append(valid)
  return tuple(keep)


def renumber_positions(valid: jax.Array) -> jax.Array:
  """The official code's position ids after a cut: live tokens numbered 0, 1, 2, ...

  The official code removes dropped tokens and gives the rest positions 0..T'−1, so
  later layers see the image and the text closer together than the prompt put them.
  Fast mode keeps every token's ORIGINAL position id, as for FastV and AIM; reference
  mode masks instead of removing and uses these.

  Args:
    valid: bool[B, T] live tokens, in sequence order (padding False).

  Returns:
    i32[B, T]: the live token's rank among the live tokens; an invalid slot gets the
    rank of the last live token before it (0 before any), never read.
  """
  return jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)


# --- The stages ----------------------------------------------------------------------

def post_filter_layers(num_layers: int, filter_layers: Sequence[int]) -> np.ndarray:
  """Which layer's processed count the official script records for each layer: i32[L],
  a filter layer f reads f + 1 (what survives its filter enters the next layer), every
  other layer itself. Index a per-layer count array [L, ...] with it."""
  bad = [f for f in filter_layers if not 0 <= f < num_layers - 1]
  if bad:
    raise ValueError(f"filter layers {bad} are outside [0, {num_layers - 1}): the layer "
                     "after a filter must exist to hold its survivors.")
  index = np.arange(num_layers)
  index[list(filter_layers)] = np.asarray(filter_layers, int) + 1
  return index


def equivalent_tokens_official(visual_per_layer: Sequence[int],
                               filter_layers: Sequence[int]) -> float:
  """The official script's "equivalent tokens": the mean visual-token count over the
  layers, a filter layer counted with the tokens that survive its filter (the next
  layer's count). visual_per_layer: what each layer processed."""
  counts = np.asarray(tuple(visual_per_layer))
  if not counts.size:
    raise ValueError("equivalent_tokens_official needs at least one layer's count.")
  return float(np.mean(counts[post_filter_layers(len(counts), filter_layers)]))


@dataclasses.dataclass(frozen=True)
class WindowPlan(StagePlan):
  """The window merge after tower layer 0; threshold (traced)."""
  name: ClassVar[str] = "MustDrop's window merge"
  cuts: ClassVar[tuple] = (("vision", 0),)
  window: int
  grid: int
  has_cls: bool
  threshold: float = dataclasses.field(compare=False)

  def traced(self):
    return jnp.asarray(self.threshold, jnp.float32)

  def vision_layer(self, run, c, index, layer, ts, next):
    ts = next(ts)
    if index != 0:
      return ts
    run.vision_masked = True  # later layers mask the empty slots it leaves
    if not self.has_cls:
      return window_merge(ts, self.grid, self.window, c)
    first, patches = tokens.split_first(ts)
    return tokens.join_first(first, window_merge(patches, self.grid, self.window, c),
                             ts.sources == 0)


@dataclasses.dataclass(frozen=True)
class Window(Stage):
  """Merges every window×window window of patches whose mean pairwise cosine similarity
  after tower layer 0 is at least `threshold` into its mean (`window_merge`)."""
  window: int = WINDOW
  threshold: float = MERGE_THRESHOLD
  point: ClassVar[str] = "vision"
  name: ClassVar[str] = "MustDrop's window merge"

  def plan(self, flow: Flow) -> WindowPlan:
    if self.window < 2:
      raise ConfigError(f"window must be 0 (no window merge) or >= 2, got {self.window}.")
    grid = math.isqrt(flow.cfg.vision.num_patches)
    if grid % self.window:
      raise ConfigError(f"window {self.window} does not divide the {grid}x{grid} patch grid.")
    if isinstance(flow.packing, llava_onevision.Packing):
      raise ConfigError("video frames are pooled on their whole patch grid after the "
                        "projector; MustDrop's window merge in the tower would change the "
                        "frames' tokens before it.")
    if flow.vision[0][1].cap != flow.cfg.vision.seq_len:
      raise ConfigError("MustDrop's window merge needs the whole patch grid after layer 0; "
                        "put it before stages that merge inside the tower.")
    flow.data_dependent = flow.data_dependent or self.name
    return WindowPlan(self.window, grid, flow.cfg.vision.has_cls, threshold=self.threshold)


@dataclasses.dataclass(frozen=True)
class KeyFilterPlan(StagePlan):
  """The key set, the dual-attention filters after `filter_layers`, the output-aware
  cache of the layers from the first filter on, and (reference mode) the official
  positions; gamma, alpha (traced)."""
  name: ClassVar[str] = "MustDrop's filter"
  key_ratio: float
  filter_layers: tuple[int, ...]
  gamma: float = dataclasses.field(compare=False)
  alpha: float = dataclasses.field(compare=False)

  @property
  def cuts(self):
    return tuple(("llm", f) for f in self.filter_layers)

  @property
  def trim_caches_from(self) -> int | None:
    """Layers from here on keep, for decoding, only the tokens that survive prefill."""
    return self.filter_layers[0] if self.filter_layers else None

  def traced(self):
    return jnp.asarray([self.gamma, self.alpha], jnp.float32)

  def tower_output(self, run, c, ts):
    """The key set: the CLS row of the LAST tower layer's attention, run on the feature
    layer's output (LLaVA's −2); only that row's logits are computed."""
    last = run.model.vision.layers[-1]
    h = last.ln1(ts.features)
    weights = cls_attention(last.attn.q(h[:, 0]), last.attn.k(h), ts.valid)
    run.carry["mustdrop.key"] = key_tokens(weights[..., 1:], ts.valid[:, 1:], self.key_ratio)
    return ts

  def before_projector(self, run, c, ts):
    if run.plan.packing is not None:  # each crop's patch -> slot map, for after_packing
      run.carry["mustdrop.crop_sources"] = ts.sources
    return ts

  def after_packing(self, run, c, ts):
    """Anyres: the key set, chosen in every crop, carried to the packed sequence's slots
    (a slot is key when a patch it holds was in a key token of its crop)."""
    key, crop_sources = run.carry["mustdrop.key"], run.carry.pop("mustdrop.crop_sources")
    held = (crop_sources >= 0) & jnp.take_along_axis(key, jnp.maximum(crop_sources, 0), 1)
    b, slots = ts.valid.shape
    held = held.reshape(b, -1) & (ts.sources >= 0)
    run.carry["mustdrop.key"] = jnp.zeros((b, slots), bool).at[
        jnp.arange(b)[:, None], jnp.maximum(ts.sources, 0)].max(held) & ts.valid
    return ts

  def after_llm_layer(self, run, c, index, q, k, stream):
    if index not in self.filter_layers:
      return stream
    key = run.carry["mustdrop.key"]
    key_token = stream.visual & jnp.take_along_axis(key, jnp.maximum(stream.vslot, 0), axis=1)
    # The text after the image (question and assistant prefix), by prompt index: fast
    # mode moves dead visual slots to the front of the stream.
    last_visual = jnp.max(jnp.where(stream.visual, stream.index, -1), axis=1, keepdims=True)
    text_query = stream.keys_valid & ~stream.visual & (stream.index > last_visual)
    text_capacity = stream.visual.shape[1] - run.visual_slots
    survive = dual_attention_drop(q, k, text_query, stream.visual & stream.alive,
                                  stream.keys_valid, key_token, c[0], c[1],
                                  max(text_capacity, 1))
    # Dropped tokens are marked dead in both modes (the segmented prefill removes them
    # between segments); reference mode renumbers the live ones, as the official code.
    stream = stream._replace(alive=stream.alive & (~stream.visual | survive))
    if run.mode == "reference":
      stream = stream._replace(positions=renumber_positions(stream.keys_valid))
    return stream

  def prefill_caches(self, run, c, caches):
    if not self.filter_layers:
      return caches
    keep = output_aware_keep([v for _, v in caches], None, self.filter_layers[0])
    return [(cache, v) for (cache, _), v in zip(caches, keep)]

  def decode_positions(self, run, c, cache_valid, positions):
    """Reference mode: each layer continues from its own cache's live entries."""
    if run.mode != "reference":
      return positions
    return tuple(jnp.sum(v, axis=1, dtype=jnp.int32) for v in cache_valid)

  def aux(self, run, c, aux):
    per_layer = aux["visual_per_layer"]
    official = per_layer[post_filter_layers(per_layer.shape[0], self.filter_layers)]
    return {**aux, "equivalent_tokens_official": jnp.mean(official.astype(jnp.float32),
                                                          axis=0)}

  def request_extras(self, cfg: LlavaConfig, num_text: int, vision_tokens: int,
                     llm_tokens: Sequence[int]) -> dict:
    """A request's cost beyond its layers (engine/cost.request_cost): the key set's CLS
    row of the last tower layer (its q for one token, k for all, one row of logits),
    each filter's text rows × all keys of logits; layers before the first filter cache
    the post-merge tokens, later ones the last filter's survivors."""
    d, t = cfg.vision.hidden_size, cfg.text
    n = 1 + int(vision_tokens)
    first = self.filter_layers[0] if self.filter_layers else t.num_layers
    visual = [x - num_text for x in llm_tokens]
    return dict(
        vision=2 * d * d + 2 * n * d * d + 2 * n * d,
        llm=sum(2 * num_text * llm_tokens[l] * t.num_heads * t.head_dim
                for l in self.filter_layers),
        cached=[llm_tokens[0] if l < first else llm_tokens[-1] for l in range(t.num_layers)],
        report=dict(equivalent_tokens_official=equivalent_tokens_official(
            visual, self.filter_layers)))


@dataclasses.dataclass(frozen=True)
class KeyFilter(Stage):
  """MustDrop's key set (top key_ratio by the CLS attention) and the dual-attention
  filter after each of `filter_layers` with thresholds (gamma, alpha)."""
  filter_layers: tuple[int, ...] = FILTER_LAYERS
  gamma: float = PRESETS["192"][0]
  alpha: float = PRESETS["192"][1]
  key_ratio: float = KEY_RATIO
  point: ClassVar[str] = "tower_output"
  name: ClassVar[str] = "MustDrop's filter"

  def plan(self, flow: Flow) -> KeyFilterPlan:
    cfg = flow.cfg
    if not 0 < self.key_ratio <= 1:
      raise ConfigError(f"key_ratio must lie in (0, 1], got {self.key_ratio}.")
    if list(self.filter_layers) != sorted(set(self.filter_layers)):
      raise ConfigError(f"filter_layers must increase strictly, got {self.filter_layers}.")
    if self.gamma < 0 or self.alpha < 0:
      raise ConfigError(f"gamma and alpha must be >= 0, got {self.gamma}, {self.alpha}.")
    if not cfg.drops_cls:
      raise ConfigError("MustDrop's key set is the CLS token's attention: it needs a tower "
                        "with a CLS token (CLIP) and vision_feature_select 'default'.")
    if cfg.vision_layers_used != cfg.vision.num_layers - 1:
      raise ConfigError("MustDrop reads the CLS attention of the tower's last layer on the "
                        "feature layer's output; it needs vision_feature_layer -2.")
    layers = cfg.text.num_layers
    bad = [l for l in self.filter_layers if not 0 <= l < layers - 1]
    if bad:
      raise ConfigError(f"filter layers {bad} are outside [0, {layers - 1}) for a "
                        f"{layers}-layer LLM (a filter needs a later layer).")
    flow.locked = "MustDrop's key set"
    flow.data_dependent = flow.data_dependent or self.name
    return KeyFilterPlan(self.key_ratio, tuple(self.filter_layers), gamma=self.gamma,
                         alpha=self.alpha)


def filter_layers_for(num_layers: int) -> tuple[int, ...]:
  """The filter layers: the official (2, 6, 10, 14) for 32 layers, scaled to other
  depths (distinct, each with a later layer)."""
  if num_layers == 32:
    return FILTER_LAYERS
  scaled = {min(num_layers - 2, max(1, round(f * num_layers / 32))) for f in FILTER_LAYERS}
  return tuple(sorted(l for l in scaled if l >= 0))


def build(cfg: LlavaConfig, retention: float | None = None, gamma: float = PRESETS["192"][0],
          alpha: float = PRESETS["192"][1], window: int = WINDOW,
          threshold: float = MERGE_THRESHOLD, key_ratio: float = KEY_RATIO,
          filter_layers: tuple[int, ...] | None = None, token_bucket: int = 16,
          mode: str = "fast", parts=("window", "filter"), sizing: str = SIZINGS[0],
          ladder: float = LADDER) -> Recipe:
  """MustDrop: window merge in the tower (window 0: none), the key set, the
  dual-attention filter with (gamma, alpha) after `filter_layers` (default: the
  official ones, scaled to the depth) and the output-aware KV cache. Its counts are
  data-dependent, so it takes thresholds, not a retention level; each request's real
  equivalent-token count is in the forward's aux (`equivalent_tokens`). parts: "window"
  and/or "filter", for recipes that take one half; sizing, ladder: how fast mode sizes
  the segments (`Recipe`: "learned", "ladder" or "host")."""
  if retention is not None:
    raise ConfigError("MustDrop's token counts depend on the image and the question; ask "
                      "for a preset (mustdrop-192, -128, -64) or gamma and alpha instead "
                      "of a retention level.")
  if window < 0 or window == 1:
    raise ConfigError(f"window must be 0 (no window merge) or >= 2, got {window}.")
  if filter_layers is None:
    filter_layers = filter_layers_for(cfg.text.num_layers)
  stages = []
  if "window" in parts and window:
    stages.append(Window(window, threshold))
  if "filter" in parts:
    stages.append(KeyFilter(tuple(filter_layers), gamma, alpha, key_ratio))
  return Recipe(tuple(stages), "mustdrop", mode, token_bucket, sizing, ladder)
