"""LLaVA-NeXT and LLaVA-OneVision "anyres" inputs: crops, visual-token layouts, buckets.

An image is split as transformers' PIL image processors for LLaVA-NeXT and
LLaVA-OneVision split it (`LlavaNextImageProcessorPil`, `LlavaOnevisionImageProcessorPil`):
the best grid resolution is picked from the pinpoints, the image is resized into it
keeping its aspect ratio, zero-padded to fill it and cut into S x S tiles; the whole image
squashed to S x S goes first. The tower turns each crop into g x g tokens (g = S // patch);
the model then packs them as `pack_image_features` does: base tokens, then the tile grid
with the padding cut off (`unpad_image`), optionally shrunk bilinearly ("anyres_max_9"),
one newline embedding after each row.

Packing is expressed as a `Layout`, a static gather plan over the flat crop tokens of a
sample (crop c, patch p at index c * g * g + p): every output token is a weighted sum of
at most four crop tokens (four for a bilinear sample, one otherwise) or the newline
embedding. Layouts are padded to bucket capacities so that each bucket compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import PIL.Image

from tokred_jax.io.processing import ImageLike, _to_rgb, pad_to_square
from tokred_jax.models.config import CLIP_MEAN, CLIP_STD
from tokred_jax.models.llava_onevision import bilinear_taps

# llava-v1.6 (LLaVA-NeXT) grid resolutions, (height, width).
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def onevision_pinpoints(crop_size: int = 384, max_tiles: int = 6) -> tuple[tuple[int, int], ...]:
  """LLaVA-OneVision's grid resolutions: every (i·S, j·S) for 1 <= i, j <= max_tiles,
  in the order of its preprocessor_config.json (height major)."""
  return tuple((i * crop_size, j * crop_size)
               for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1))


@dataclasses.dataclass(frozen=True)
class AnyresSpec:
  """How images are cut into crops and how their tokens are packed.

  crop_size: S, the tower's input side (every crop and tile is S x S).
  patch_size: the tower's patch side; g = S // patch_size tokens a side per crop (a
    remainder is dropped, as SigLIP's 384 px at patch 14 gives 27).
  pinpoints: candidate grid resolutions (height, width), each a multiple of S.
  image_mean, image_std: per-channel normalisation.
  resample: the PIL filter of every resize (both processors use bicubic).
  max_patches: None for LLaVA-NeXT; 9 for OneVision's "anyres_max_9", whose tile grid is
    shrunk bilinearly when it holds over 1.1² · 9 crops' worth of tokens.

  Both processors make the base crop the same way (the whole image squashed to S x S:
  NeXT's later shortest-edge resize and centre crop are no-ops on it when its `size` and
  `crop_size` are both S, as in every published config), so there is no field for it.
  """
  crop_size: int
  patch_size: int
  pinpoints: tuple[tuple[int, int], ...]
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  resample: int = PIL.Image.Resampling.BICUBIC
  max_patches: int | None = None

  def __post_init__(self):
    size, patch = self.crop_size, self.patch_size
    if patch < 1 or size < patch:
      raise ValueError(f"crop_size {size} must be at least patch_size {patch} (positive).")
    object.__setattr__(self, "pinpoints", tuple(tuple(int(v) for v in p) for p in self.pinpoints))
    if not self.pinpoints:
      raise ValueError("pinpoints is empty; give at least one (height, width) resolution.")
    for h, w in self.pinpoints:
      if h < size or w < size or h % size or w % size:
        raise ValueError(f"pinpoint ({h}, {w}) is not a multiple of crop_size {size}; every "
                         "grid resolution must be a whole number of crops a side.")
    if self.max_patches is not None and self.max_patches < 1:
      raise ValueError(f"max_patches must be None or positive, got {self.max_patches}.")

  @property
  def grid(self) -> int:
    """g: tokens a side of one crop."""
    return self.crop_size // self.patch_size

  @classmethod
  def llava_next(cls, crop_size: int = 336, patch_size: int = 14,
                 pinpoints: Sequence[Sequence[int]] = NEXT_PINPOINTS, **kwargs) -> AnyresSpec:
    """llava-v1.6: CLIP at 336 px, five grids of two or more tiles."""
    return cls(crop_size, patch_size, tuple(pinpoints), **kwargs)

  @classmethod
  def onevision(cls, crop_size: int = 384, patch_size: int = 14,
                pinpoints: Sequence[Sequence[int]] | None = None, **kwargs) -> AnyresSpec:
    """LLaVA-OneVision: SigLIP at 384 px, grids 1..6 x 1..6, "anyres_max_9"."""
    pinpoints = onevision_pinpoints(crop_size) if pinpoints is None else pinpoints
    kwargs = dict(image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, max_patches=9) | kwargs
    return cls(crop_size, patch_size, tuple(pinpoints), **kwargs)


def _check_size(size_hw: Sequence[int]) -> tuple[int, int]:
  h, w = (int(v) for v in size_hw)
  if h < 1 or w < 1:
    raise ValueError(f"image size must be (height, width) with both positive; got {size_hw}.")
  return h, w


def select_best_resolution(size_hw: Sequence[int],
                           pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The pinpoint (h, w) that keeps the most of the image's pixels once it is resized
  into it, then the one that wastes the fewest; the first wins ties (as transformers)."""
  height, width = _check_size(size_hw)
  best, best_effective, best_waste = None, 0, math.inf
  for h, w in pinpoints:
    scale = min(w / width, h / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    waste = w * h - effective
    if effective > best_effective or (effective == best_effective and waste < best_waste):
      best, best_effective, best_waste = (int(h), int(w)), effective, waste
  return best


def grid_shape(size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]],
               crop: int) -> tuple[int, int]:
  """(rows, cols) of S x S tiles (S = `crop`) the image is cut into."""
  h, w = select_best_resolution(size_hw, pinpoints)
  return h // crop, w // crop


def _fit_size(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
  """transformers' get_patch_output_size: the image scaled into target, ceil-rounded."""
  (height, width), (th, tw) = size_hw, target_hw
  scale_w, scale_h = tw / width, th / height
  if scale_w < scale_h:
    return min(math.ceil(height * scale_w), th), tw
  return th, min(math.ceil(width * scale_h), tw)


def _normalize(pixels: np.ndarray, spec: AnyresSpec) -> np.ndarray:
  """u8[..., 3] -> f32: rescaled in float64, then normalised in float32 (transformers'
  order, as processing.preprocess_images does)."""
  pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (pixels - np.asarray(spec.image_mean, np.float32)) / np.asarray(spec.image_std,
                                                                        np.float32)


def anyres_crops(image: ImageLike, spec: AnyresSpec) -> np.ndarray:
  """f32[1 + rows * cols, S, S, 3]: the base crop (whole image at S x S), then the
  tiles row-major, normalised: the pixel_values of transformers' LLaVA-NeXT and
  LLaVA-OneVision PIL image processors for one image, in NHWC.

  `image`: a PIL image, an image file path or a u8[H, W, 3] array.
  """
  image = _to_rgb(image)
  size_hw = (image.height, image.width)
  target = select_best_resolution(size_hw, spec.pinpoints)
  new_h, new_w = _fit_size(size_hw, target)
  fitted = np.asarray(image.resize((new_w, new_h), spec.resample))
  top, left = (target[0] - new_h) // 2, (target[1] - new_w) // 2
  canvas = np.zeros(target + (3,), np.uint8)  # Zero (black) padding, before normalising.
  canvas[top:top + new_h, left:left + new_w] = fitted
  s = spec.crop_size
  rows, cols = target[0] // s, target[1] // s
  tiles = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(-1, s, s, 3)
  base = np.asarray(image.resize((s, s), spec.resample))
  return _normalize(np.concatenate([base[None], tiles]), spec)


def single_crop(image: ImageLike, spec: AnyresSpec) -> np.ndarray:
  """f32[1, S, S, 3]: one image of a multi-image OneVision sample, as its processor
  makes it: padded to a square with the mean colour (int(m * 255)), resized to S x S."""
  image = pad_to_square(_to_rgb(image), spec.image_mean)
  s = spec.crop_size
  return _normalize(np.asarray(image.resize((s, s), spec.resample))[None], spec)


class Layout(NamedTuple):
  """A gather plan from a sample's flat crop tokens to its N visual tokens.

  src: i32[N, 4] crop-token indices (crop c, patch p at c * g * g + p).
  weight: f32[N, 4]; token n = sum_k weight[n, k] * tokens[src[n, k]] (unused: 0, src 0).
  newline: bool[N], the token is the image_newline embedding (its weights are all 0).
  valid: bool[N], False on padding slots.
  """
  src: np.ndarray
  weight: np.ndarray
  newline: np.ndarray
  valid: np.ndarray

  @property
  def num_tokens(self) -> int:
    """N, padding slots included."""
    return int(self.valid.shape[0])


def _layout(src: np.ndarray, weight: np.ndarray, newline: np.ndarray) -> Layout:
  return Layout(src.astype(np.int32), weight.astype(np.float32), newline.astype(bool),
                np.ones(newline.shape, bool))


def _newline_tokens(n: int) -> Layout:
  return _layout(np.zeros((n, 4)), np.zeros((n, 4)), np.ones(n, bool))


def _copy_tokens(indices: np.ndarray) -> Layout:
  """Tokens that are crop tokens as they are."""
  n = indices.size
  src, weight = np.zeros((n, 4)), np.zeros((n, 4))
  src[:, 0], weight[:, 0] = indices.reshape(-1), 1
  return _layout(src, weight, np.zeros(n, bool))


def _bilinear(index: np.ndarray, out_hw: tuple[int, int]) -> Layout:
  """The tokens of torch's bilinear interpolate of the map `index` (i[h, w] of crop-token
  indices) to `out_hw`, row-major."""
  (rows, row_w), (cols, col_w) = (bilinear_taps(n, m) for n, m in zip(index.shape, out_hw))
  src = index[rows[:, None, :, None], cols[None, :, None, :]]  # [oh, ow, 2, 2]
  weight = row_w[:, None, :, None] * col_w[None, :, None, :]
  n = out_hw[0] * out_hw[1]
  return _layout(src.reshape(n, 4), weight.reshape(n, 4), np.zeros(n, bool))


def _unpadded(size_hw: tuple[int, int], current_hw: tuple[int, int]) -> tuple[slice, slice]:
  """transformers' unpad_image: the rows and columns of the tile-grid token map that the
  image covers (padding, as rounded there, cut off symmetrically)."""
  (height, width), (ch, cw) = size_hw, current_hw
  if width / height > cw / ch:
    new_h = int(round(height * (cw / width), 7))
    pad = (ch - new_h) // 2
    return slice(pad, ch - pad), slice(0, cw)
  new_w = int(round(width * (ch / height), 7))
  pad = (cw - new_w) // 2
  return slice(0, ch), slice(pad, cw - pad)


def _shrunk(hw: tuple[int, int], spec: AnyresSpec) -> tuple[int, int] | None:
  """The size "anyres_max_N" shrinks an unpadded h x w token map to; None if it keeps it."""
  if spec.max_patches is None:
    return None
  h, w = hw
  ratio = math.sqrt(h * w / (spec.max_patches * spec.grid ** 2))
  return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else None


def _tile_count(hw: tuple[int, int], spec: AnyresSpec) -> int:
  """Tokens of an unpadded h x w tile map after any shrink, newlines included."""
  h, w = _shrunk(hw, spec) or hw
  return h * w + h


def image_layout(size_hw: Sequence[int], spec: AnyresSpec, crop_offset: int = 0) -> Layout:
  """The packed visual tokens of one anyres image of original size `size_hw` (H, W), whose
  1 + rows * cols crops start at crop `crop_offset` of the sample: as transformers'
  LLaVA-NeXT / OneVision `pack_image_features` builds them (base tokens, then each row of
  the unpadded, possibly shrunk, tile map followed by a newline)."""
  size_hw = _check_size(size_hw)
  g, rows, cols = spec.grid, *grid_shape(size_hw, spec.pinpoints, spec.crop_size)
  first = crop_offset * g * g
  # Token map of the tile grid: (tile row, patch row, tile col, patch col) -> token index.
  tile = 1 + np.arange(rows)[:, None, None, None] * cols + np.arange(cols)[None, None, :, None]
  patch = np.arange(g)[None, :, None, None] * g + np.arange(g)[None, None, None, :]
  index = (first + tile * g * g + patch).reshape(rows * g, cols * g)
  index = index[_unpadded(size_hw, index.shape)]
  shrunk = _shrunk(index.shape, spec)
  body = _bilinear(index, shrunk) if shrunk else _copy_tokens(index)
  h, w = shrunk or index.shape  # h is 0 for a strip thinner than half a token row.
  parts = [_copy_tokens(first + np.arange(g * g))]
  for r in range(h):
    parts += [_slice(body, r * w, (r + 1) * w), _newline_tokens(1)]
  return concat_layouts(parts)


def single_crop_layout(spec: AnyresSpec, crop_offset: int = 0) -> Layout:
  """The g * g tokens of one un-tiled crop and a newline: an image of a multi-image
  OneVision sample (or a NeXT image given as a single crop)."""
  g2 = spec.grid ** 2
  return concat_layouts([_copy_tokens(crop_offset * g2 + np.arange(g2)), _newline_tokens(1)])


def _slice(layout: Layout, start: int, stop: int) -> Layout:
  return Layout(*(a[start:stop] for a in layout))


def concat_layouts(layouts: Sequence[Layout]) -> Layout:
  """The layouts one after the other (their crop offsets must already be distinct)."""
  if not layouts:
    raise ValueError("no layouts to concatenate.")
  return Layout(*(np.concatenate(parts) for parts in zip(*layouts)))


def pad_layout(layout: Layout, capacity: int) -> Layout:
  """`layout` with invalid slots (src 0, weight 0, not newline) appended up to `capacity`."""
  n = layout.num_tokens
  if n > capacity:
    raise ValueError(f"the layout has {n} tokens but the capacity is {capacity}; pick a "
                     "larger bucket (bucket_for).")
  extra = capacity - n
  return Layout(np.concatenate([layout.src, np.zeros((extra, 4), np.int32)]),
                np.concatenate([layout.weight, np.zeros((extra, 4), np.float32)]),
                np.concatenate([layout.newline, np.zeros(extra, bool)]),
                np.concatenate([layout.valid, np.zeros(extra, bool)]))


def num_image_tokens(size_hw: Sequence[int], spec: AnyresSpec) -> int:
  """image_layout(size_hw, spec).num_tokens without building it: the `<image>` slots
  transformers' LlavaNextProcessor / LlavaOnevisionProcessor give one image, configured as
  the published checkpoints are (NeXT: the CLS token counted, then dropped by "default";
  OneVision: "full", num_image_tokens g * g)."""
  size_hw = _check_size(size_hw)
  g, rows, cols = spec.grid, *grid_shape(size_hw, spec.pinpoints, spec.crop_size)
  kept_rows, kept_cols = _unpadded(size_hw, (rows * g, cols * g))
  hw = (kept_rows.stop - kept_rows.start, kept_cols.stop - kept_cols.start)
  return g * g + _tile_count(hw, spec)


def num_crops(size_hw: Sequence[int], spec: AnyresSpec) -> int:
  """1 + rows * cols: the crops anyres_crops makes of an image of size (H, W)."""
  rows, cols = grid_shape(size_hw, spec.pinpoints, spec.crop_size)
  return 1 + rows * cols


def layout_capacity(grid_rows_cols: Sequence[int], spec: AnyresSpec) -> int:
  """The most tokens any image cut into a rows x cols tile grid packs to.

  Unpadding keeps either every row and some columns or every column and some rows, so
  the maximum over all those outcomes (a superset of the reachable ones) bounds it.
  """
  rows, cols = (int(v) for v in grid_rows_cols)
  h, w = rows * spec.grid, cols * spec.grid
  outcomes = [(h, k) for k in range(1, w + 1)] + [(k, w) for k in range(1, h + 1)]
  return spec.grid ** 2 + max(_tile_count(hw, spec) for hw in outcomes)


class Bucket(NamedTuple):
  """A static input shape: crops per image and packed visual tokens per image."""
  num_crops: int
  capacity: int


def _grids(spec: AnyresSpec) -> list[tuple[int, int]]:
  s = spec.crop_size
  return sorted({(h // s, w // s) for h, w in spec.pinpoints})


def crop_buckets(spec: AnyresSpec) -> tuple[Bucket, ...]:
  """Buckets covering every pinpoint grid: a few distinct tile counts are a bucket each
  (llava-v1.6's 2, 3 and 4 tiles: 3, 4 and 5 crops); many are rounded up to a square k²
  (OneVision's 1..36 go to 1 + {1, 4, 9, 16, 25, 36}); each bucket's capacity is the
  largest layout_capacity of its grids."""
  grids = _grids(spec)
  few = len({rows * cols for rows, cols in grids}) <= 4
  buckets: dict[int, int] = {}
  for rows, cols in grids:
    crops = 1 + (rows * cols if few else math.ceil(math.sqrt(rows * cols)) ** 2)
    buckets[crops] = max(buckets.get(crops, 0), layout_capacity((rows, cols), spec))
  return tuple(Bucket(c, buckets[c]) for c in sorted(buckets))


def bucket_for(sizes_hw: Sequence[Sequence[int]], spec: AnyresSpec,
               buckets: Sequence[Bucket] | None = None) -> Bucket:
  """The smallest bucket (default: crop_buckets(spec)) holding every image of a batch."""
  if not sizes_hw:
    raise ValueError("no image sizes given.")
  buckets = crop_buckets(spec) if buckets is None else buckets
  crops = max(num_crops(s, spec) for s in sizes_hw)
  tokens = max(num_image_tokens(s, spec) for s in sizes_hw)
  for bucket in sorted(buckets):
    if bucket.num_crops >= crops and bucket.capacity >= tokens:
      return bucket
  raise ValueError(f"no bucket holds {crops} crops and {tokens} tokens; the largest is "
                   f"{max(buckets)}. Use crop_buckets(spec) for buckets that cover the spec.")


class BucketWaste(NamedTuple):
  """Padding in one bucket over a set of images: slots filled and slots wasted."""
  bucket: Bucket
  images: int
  crops_used: int
  crops_padded: int
  tokens_used: int
  tokens_padded: int


def bucket_waste(sizes_hw: Sequence[Sequence[int]], spec: AnyresSpec,
                 buckets: Sequence[Bucket] | None = None) -> list[BucketWaste]:
  """Per bucket, the crops and tokens that padding wastes when each image of `sizes_hw`
  goes (alone) to its smallest bucket; buckets no image lands in are left out."""
  buckets = crop_buckets(spec) if buckets is None else buckets
  totals: dict[Bucket, list[int]] = {}
  for size in sizes_hw:
    bucket = bucket_for([size], spec, buckets)
    crops, tokens = num_crops(size, spec), num_image_tokens(size, spec)
    t = totals.setdefault(bucket, [0, 0, 0, 0, 0])
    for i, v in enumerate((1, crops, bucket.num_crops - crops, tokens,
                           bucket.capacity - tokens)):
      t[i] += v
  return [BucketWaste(b, *totals[b]) for b in sorted(totals)]


def frame_bucket(num_frames: int, ladder: Sequence[int] = (8, 16, 32, 48, 64)
                 ) -> tuple[int, np.ndarray]:
  """The smallest rung of `ladder` holding `num_frames`, and bool[rung], True on the
  real frames (the first `num_frames`)."""
  fitting = [n for n in sorted(ladder) if n >= num_frames]
  if num_frames < 1 or not fitting:
    raise ValueError(f"{num_frames} frames do not fit the frame ladder {tuple(ladder)}; "
                     "sample at least 1 and at most its largest rung (sample_frame_indices).")
  return fitting[0], np.arange(fitting[0]) < num_frames
