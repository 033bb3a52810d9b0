"""Anyres crops, token counts, layouts and buckets, against transformers' LLaVA-NeXT and
LLaVA-OneVision image processors, processors and `pack_image_features`."""

import types
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil)
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil)
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from tests import hf_fixtures
from tokred_jax.io import anyres

# Tiny configs (g = 4) with small pinpoints, then the published ones.
TINY_NEXT = anyres.AnyresSpec.llava_next(
    56, 14, pinpoints=((56, 112), (112, 56), (112, 112), (168, 56), (56, 168)))
TINY_OV = anyres.AnyresSpec.onevision(56, 14)
NEXT = anyres.AnyresSpec.llava_next()
OV = anyres.AnyresSpec.onevision()
SPECS = {"tiny_next": TINY_NEXT, "tiny_ov": TINY_OV, "next": NEXT, "ov": OV}
# (height, width): square, wide, tall, tiny, extreme strips, and ones shrunk by anyres_max_9.
TINY_SIZES = [(56, 56), (37, 90), (120, 45), (9, 13), (300, 310), (20, 330), (331, 170),
              (200, 201)]
REAL_SIZES = [(480, 640), (1000, 300), (2100, 2300)]


def _image(size_hw, seed=0):
  rng = np.random.default_rng(seed)
  return PIL.Image.fromarray(rng.integers(0, 256, (*size_hw, 3), dtype=np.uint8))


def _hf_image_processor(spec):
  common = dict(image_grid_pinpoints=[list(p) for p in spec.pinpoints],
                image_mean=list(spec.image_mean), image_std=list(spec.image_std))
  s = spec.crop_size
  if spec.max_patches is None:
    return LlavaNextImageProcessorPil(size={"shortest_edge": s},
                                      crop_size={"height": s, "width": s}, **common)
  return LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, **common)


def _cases():
  for name in ("tiny_next", "tiny_ov"):
    for size in TINY_SIZES:
      yield name, size
  for name in ("next", "ov"):
    for size in REAL_SIZES[:2]:
      yield name, size
  yield "ov", REAL_SIZES[2]


@pytest.mark.parametrize("name,size_hw", list(_cases()))
def test_crops_match_transformers(name, size_hw):
  spec = SPECS[name]
  image = _image(size_hw)
  want = _hf_image_processor(spec)(image, return_tensors="np")["pixel_values"][0]
  got = anyres.anyres_crops(image, spec)
  assert got.dtype == np.float32
  assert got.shape == (anyres.num_crops(size_hw, spec), spec.crop_size, spec.crop_size, 3)
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_multi_image_crops_match_transformers():
  spec = TINY_OV
  images = [_image((37, 90), 1), _image((120, 45), 2), _image((56, 56), 3)]
  want = _hf_image_processor(spec)([images], return_tensors="np")["pixel_values"]
  got = np.concatenate([anyres.single_crop(i, spec) for i in images])
  np.testing.assert_allclose(got, want[:, 0].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_best_resolution_matches_transformers():
  rng = np.random.default_rng(0)
  for spec in (NEXT, OV):
    for h, w in rng.integers(1, 4000, (200, 2)):
      want = transformers.image_processing_utils.select_best_resolution(
          (h, w), [list(p) for p in spec.pinpoints])
      assert anyres.select_best_resolution((h, w), spec.pinpoints) == tuple(want)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  hf_fixtures._train_tokenizer(out, add_bos=False)
  return transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))


def _hf_processor(spec, tokenizer):
  image_processor = _hf_image_processor(spec)
  if spec.max_patches is None:
    # As llava-v1.6 publishes it: the CLS token counted, then dropped by "default".
    return transformers.LlavaNextProcessor(
        image_processor, tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
  # Its video processor needs torchvision, which the test environment lacks; the
  # processor's type check of that (absent) argument is skipped.
  with mock.patch.object(transformers.ProcessorMixin, "check_argument_for_proper_class",
                         lambda *args: None):
    return transformers.LlavaOnevisionProcessor(
        image_processor, tokenizer, num_image_tokens=spec.grid ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{spec.max_patches}")


@pytest.mark.parametrize("name", list(SPECS))
def test_token_counts_match_processors(name, tokenizer):
  spec = SPECS[name]
  processor = _hf_processor(spec, tokenizer)
  rng = np.random.default_rng(1)
  high = 400 if name.startswith("tiny") else 4000
  sizes = [tuple(int(v) for v in s) for s in rng.integers(1, high, (300, 2))]
  want = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
  assert [anyres.num_image_tokens(s, spec) for s in sizes] == want
  assert [anyres.image_layout(s, spec).num_tokens for s in sizes[:40]] == want[:40]
  # The full path: the processor expands <image> for real pixels.
  image_id = tokenizer.convert_tokens_to_ids("<image>")
  for size in (TINY_SIZES if name.startswith("tiny") else REAL_SIZES[:2])[:4]:
    ids = processor(text="<image>", images=_image(size), return_tensors="np")["input_ids"]
    assert (ids == image_id).sum() == anyres.num_image_tokens(size, spec)


def _stub(spec):
  """The parts of a model `pack_image_features` and `apply_pooling` read."""
  vision = types.SimpleNamespace(image_size=spec.crop_size, patch_size=spec.patch_size)
  return types.SimpleNamespace(config=types.SimpleNamespace(
      vision_config=vision, image_grid_pinpoints=[list(p) for p in spec.pinpoints]))


def _hf_pack(spec, features, sizes_hw, newline):
  features = [torch.from_numpy(f) for f in features]
  sizes, newline = torch.tensor(sizes_hw), torch.from_numpy(newline)
  if spec.max_patches is None:
    packed, _ = LlavaNextModel.pack_image_features(_stub(spec), features, sizes, "default",
                                                   image_newline=newline)
  else:
    packed, _ = LlavaOnevisionModel.pack_image_features(
        _stub(spec), features, sizes, image_newline=newline,
        vision_aspect_ratio=f"anyres_max_{spec.max_patches}")
  return [p.numpy() for p in packed]


def apply_layout(layout, tokens, newline):
  """f32[N, D]: the layout applied to flat crop tokens f32[T, D]."""
  out = (layout.weight[..., None] * tokens[layout.src]).sum(1)
  return np.where(layout.newline[:, None], newline, out)


@pytest.mark.parametrize("name", list(SPECS))
def test_layout_matches_pack_image_features(name):
  spec = SPECS[name]
  rng = np.random.default_rng(2)
  sizes = REAL_SIZES
  if name.startswith("tiny"):
    sizes = TINY_SIZES + [tuple(int(v) for v in s) for s in rng.integers(20, 400, (40, 2))]
  dim, g2 = 3, spec.grid ** 2
  features = [rng.standard_normal((anyres.num_crops(s, spec), g2, dim), np.float32)
              for s in sizes]
  newline = rng.standard_normal(dim, np.float32)
  want = _hf_pack(spec, features, sizes, newline)
  # One sample holding every image: crop offsets run on from image to image.
  offsets = np.cumsum([0] + [len(f) for f in features])
  layout = anyres.concat_layouts([anyres.image_layout(s, spec, int(o))
                                  for s, o in zip(sizes, offsets)])
  tokens = np.concatenate(features).reshape(-1, dim)
  got = apply_layout(layout, tokens, newline)
  np.testing.assert_allclose(got, np.concatenate(want), atol=1e-6, rtol=0)
  if spec.max_patches:  # The cases include shrunk grids (four-tap tokens).
    assert (np.count_nonzero(layout.weight, axis=1) > 1).any()

  n = layout.num_tokens
  padded = anyres.pad_layout(layout, n + 7)
  assert padded.num_tokens == n + 7 and padded.valid.sum() == n and not padded.valid[n:].any()
  assert not padded.weight[n:].any() and not padded.newline[n:].any()
  np.testing.assert_allclose(apply_layout(padded, tokens, newline)[:n], got)
  with pytest.raises(ValueError, match="capacity"):
    anyres.pad_layout(layout, n - 1)


def test_single_crop_layout_matches_pack_image_features():
  for spec in (TINY_NEXT, TINY_OV):
    rng = np.random.default_rng(3)
    features = [rng.standard_normal((1, spec.grid ** 2, 5), np.float32) for _ in range(3)]
    newline = rng.standard_normal(5, np.float32)
    want = np.concatenate(_hf_pack(spec, features, [(30, 40)] * 3, newline))
    layout = anyres.concat_layouts([anyres.single_crop_layout(spec, i) for i in range(3)])
    got = apply_layout(layout, np.concatenate(features).reshape(-1, 5), newline)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(SPECS))
def test_capacity_bounds_every_size(name):
  spec = SPECS[name]
  rng = np.random.default_rng(4)
  high = 400 if name.startswith("tiny") else 5000
  most: dict = {}
  for h, w in rng.integers(1, high, (3000, 2)):
    grid = anyres.grid_shape((h, w), spec.pinpoints, spec.crop_size)
    most[grid] = max(most.get(grid, 0), anyres.num_image_tokens((h, w), spec))
  for grid, tokens in most.items():
    assert tokens <= anyres.layout_capacity(grid, spec), grid


@pytest.mark.parametrize("name", list(SPECS))
def test_buckets_cover_every_grid(name):
  spec = SPECS[name]
  buckets = anyres.crop_buckets(spec)
  for h, w in spec.pinpoints:
    grid = (h // spec.crop_size, w // spec.crop_size)
    assert any(b.num_crops >= 1 + grid[0] * grid[1]
               and b.capacity >= anyres.layout_capacity(grid, spec) for b in buckets), grid
  rng = np.random.default_rng(5)
  sizes = [tuple(s) for s in rng.integers(1, 3000, (50, 2))]
  bucket = anyres.bucket_for(sizes[:4], spec)
  assert all(anyres.num_crops(s, spec) <= bucket.num_crops for s in sizes[:4])
  waste = anyres.bucket_waste(sizes, spec)
  assert sum(w.images for w in waste) == len(sizes)
  for w in waste:
    assert w.crops_used + w.crops_padded == w.images * w.bucket.num_crops
    assert w.tokens_used + w.tokens_padded == w.images * w.bucket.capacity
    assert w.crops_padded >= 0 and w.tokens_padded >= 0


def test_bucket_shapes():
  assert [b.num_crops for b in anyres.crop_buckets(NEXT)] == [3, 4, 5]
  assert [b.num_crops for b in anyres.crop_buckets(OV)] == [2, 5, 10, 17, 26, 37]


def test_frame_bucket():
  size, mask = anyres.frame_bucket(9)
  assert size == 16 and mask.sum() == 9 and mask[:9].all()
  assert anyres.frame_bucket(8)[0] == 8
  with pytest.raises(ValueError, match="ladder"):
    anyres.frame_bucket(65)


def test_bad_specs_and_sizes():
  with pytest.raises(ValueError, match="multiple of crop_size"):
    anyres.AnyresSpec.llava_next(56, 14, pinpoints=((56, 100),))
  with pytest.raises(ValueError, match="patch_size"):
    anyres.AnyresSpec(10, 14, ((10, 10),))
  with pytest.raises(ValueError, match="positive"):
    anyres.num_image_tokens((0, 10), NEXT)
