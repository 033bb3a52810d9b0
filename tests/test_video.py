"""Video frames, pixels and tokens, against transformers' LLaVA-OneVision pooling and
processor counts and the SigLIP image processor the LLaVA-OneVision code uses on frames."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tests.test_anyres import OV, TINY_OV, _hf_processor, _stub, tokenizer
from tokred_jax.core import tokens as core_tokens
from tokred_jax.io import anyres, video
from tokred_jax.models import llava_onevision

__all__ = ["tokenizer"]  # A module fixture, shared with test_anyres.


def test_sample_frame_indices():
  np.testing.assert_array_equal(video.sample_frame_indices(10, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(video.sample_frame_indices(100, 8),
                                [0, 14, 28, 42, 56, 70, 84, 99])
  np.testing.assert_array_equal(video.sample_frame_indices(3, 5), [0, 0, 1, 1, 2])
  with pytest.raises(ValueError, match="at least one"):
    video.sample_frame_indices(0, 4)


@pytest.mark.parametrize("spec", [TINY_OV, OV], ids=["tiny", "ov"])
def test_video_pixels_match_siglip_processor(spec):
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (3, 70, 123, 3), dtype=np.uint8)
  s = spec.crop_size
  hf = SiglipImageProcessorPil(size={"height": s, "width": s}, resample=spec.resample,
                               image_mean=list(spec.image_mean), image_std=list(spec.image_std))
  want = hf(list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = video.video_pixels(frames, spec)
  assert got.shape == (3, s, s, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="channels last"):
    video.video_pixels(frames.transpose(0, 3, 1, 2), spec)


@pytest.mark.parametrize("spec", [TINY_OV, OV], ids=["tiny", "ov"])
def test_frame_pooling_matches_apply_pooling(spec, tokenizer):
  frames, dim, g = 3, 4, spec.grid
  rng = np.random.default_rng(1)
  features = rng.standard_normal((frames, g * g, dim), np.float32)
  want = LlavaOnevisionModel.apply_pooling(_stub(spec), torch.from_numpy(features)).numpy()
  got = llava_onevision.pool(core_tokens.from_features(jnp.asarray(features)), g)
  np.testing.assert_allclose(np.asarray(got.features), want, atol=1e-6, rtol=0)
  n = llava_onevision.pooled_grid(g) ** 2
  assert frames * n + 1 == video.video_token_count(frames, g)
  counts = _hf_processor(spec, tokenizer)._get_num_multimodal_tokens(
      video_sizes=[(n, 100, 100) for n in (1, 8, 32)])["num_video_tokens"]
  assert counts == [video.video_token_count(n, spec.grid) for n in (1, 8, 32)]


def _write_video(av, path, frames, codec):
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=10)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = {"png": "rgb24", "ffv1": "bgr0"}.get(codec, "yuv420p")
    for f in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    container.mux(stream.encode())


# The .mkv records no frame count (frames are counted first); the others do.
@pytest.mark.parametrize("codec,suffix", [("ffv1", "mkv"), ("png", "mov"), ("mpeg4", "mp4")])
def test_load_video(codec, suffix, tmp_path):
  import av  # The `video` extra, also in the `test` one.
  # Frame i is a flat grey of 10 * i, so a decoded frame tells its index.
  frames = np.repeat(np.arange(0, 200, 10, dtype=np.uint8), 16 * 24 * 3).reshape(20, 16, 24, 3)
  path = tmp_path / f"clip.{suffix}"
  _write_video(av, path, frames, codec)
  got = video.load_video(path, 6)
  assert got.shape == (6, 16, 24, 3) and got.dtype == np.uint8
  want = frames[video.sample_frame_indices(20, 6)]
  if codec != "mpeg4":  # Lossless.
    np.testing.assert_array_equal(got, want)
  else:
    np.testing.assert_allclose(got.mean((1, 2, 3)), want.mean((1, 2, 3)), atol=3)


def test_load_video_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="does not exist"):
    video.load_video(tmp_path / "missing.mp4", 4)
  monkeypatch.setitem(sys.modules, "av", None)  # As if PyAV were not installed.
  with pytest.raises(ValueError, match=r"tokred-jax\[video\]"):
    video.load_video(tmp_path / "missing.mp4", 4)


def test_frame_bucket_masks_padded_frames():
  size, mask = anyres.frame_bucket(20)
  pixels = np.zeros((size, 4, 4, 3), np.float32)
  assert size == 32 and pixels[mask].shape[0] == 20
