"""LLaVA-OneVision video inputs: frame sampling, decoding, pixels and visual tokens.

Frames are sampled uniformly as lmms-eval and the LLaVA-OneVision code sample them,
each is squashed to S x S and normalised; the model (models/llava_onevision.py) pools
each frame's g x g tokens bilinearly to ceil(g / 2) a side (`apply_pooling`), then adds
one newline embedding after the whole video. Decoding needs PyAV (the `video` extra); everything else takes
frame arrays.
"""

from __future__ import annotations

import math
import os

import numpy as np
import PIL.Image

from tokred_jax.io.anyres import AnyresSpec, _normalize


def sample_frame_indices(total: int, num_frames: int) -> np.ndarray:
  """i64[num_frames]: np.linspace(0, total - 1, num_frames) truncated, as lmms-eval
  samples (indices repeat when the video has fewer frames than asked for)."""
  if total < 1:
    raise ValueError(f"the video has {total} frames; it must have at least one.")
  if num_frames < 1:
    raise ValueError(f"num_frames must be positive, got {num_frames}.")
  return np.linspace(0, total - 1, num_frames, dtype=int)


def load_video(path: str | os.PathLike, num_frames: int) -> np.ndarray:
  """u8[num_frames, H, W, 3]: `num_frames` RGB frames of the video file at `path`,
  sampled uniformly over all its frames (sample_frame_indices), decoded with PyAV."""
  try:
    import av  # The optional `video` extra: imported where it is needed only.
  except ImportError:
    raise ValueError("decoding videos needs PyAV: pip install 'tokred-jax[video]' (or pass "
                     "decoded u8[F, H, W, 3] frames to video_pixels).") from None
  if not os.path.isfile(path):
    raise ValueError(f"video file {path} does not exist.")

  def decode(total: int | None) -> tuple[dict[int, np.ndarray], int]:
    """The frames at the sampled indices of `total` frames (none if None: a counting
    pass), and how many frames the file holds."""
    wanted = set() if total is None else set(sample_frame_indices(total, num_frames).tolist())
    kept, count = {}, 0
    try:
      with av.open(os.fspath(path)) as container:
        if not container.streams.video:
          raise ValueError(f"video file {path} has no video stream.")
        for count, frame in enumerate(container.decode(video=0), start=1):
          if count - 1 in wanted:
            kept[count - 1] = frame.to_ndarray(format="rgb24")
    except av.FFmpegError as e:
      raise ValueError(f"cannot decode video file {path}: {e}") from e
    if not count:
      raise ValueError(f"video file {path} holds no decodable frames.")
    return kept, count

  try:
    with av.open(os.fspath(path)) as container:
      claimed = container.streams.video[0].frames if container.streams.video else 0
  except av.FFmpegError as e:
    raise ValueError(f"cannot open video file {path}: {e}") from e
  # Containers may not record the frame count (then count by decoding) or get it wrong.
  total = claimed or decode(None)[1]
  kept, count = decode(total)
  if count != total:
    kept, count = decode(count)
  return np.stack([kept[i] for i in sample_frame_indices(count, num_frames)])


def video_pixels(frames: np.ndarray, spec: AnyresSpec) -> np.ndarray:
  """f32[F, S, S, 3]: each frame of u8[F, H, W, 3] squashed to S x S with the spec's
  filter (PIL) and normalised, as the LLaVA-OneVision code preprocesses video frames
  (its SigLIP image processor) and as transformers' PIL image processors resize.

  transformers' LlavaOnevisionVideoProcessor resizes with torchvision instead
  (antialiased bicubic on uint8 tensors), which differs from PIL by one grey level on
  some pixels.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be u8[F, H, W, 3] (RGB, channels last); got "
                     f"{frames.dtype}{list(frames.shape)}. Decode with load_video.")
  if not len(frames):
    raise ValueError("the video has no frames.")
  s = spec.crop_size
  resized = [np.asarray(PIL.Image.fromarray(f).resize((s, s), spec.resample)) for f in frames]
  return _normalize(np.stack(resized), spec)


def video_token_count(num_frames: int, grid: int) -> int:
  """Visual tokens of a video: ceil(g / 2)² per frame and one newline."""
  return num_frames * math.ceil(grid / 2) ** 2 + 1
