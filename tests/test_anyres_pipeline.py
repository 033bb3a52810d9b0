"""The Pipeline and infer.py on LLaVA-NeXT and LLaVA-OneVision checkpoints: inputs of
many sizes compile once per bucket, several images and videos per prompt, files decoded,
bad input refused before anything compiles."""

import numpy as np
import pytest

import tokred_jax
from tests import faults
from tests.test_pipeline import run_infer
from tokred_jax.io import batching

SAMPLING = tokred_jax.SamplingConfig(max_new_tokens=2)


@pytest.fixture(scope="module")
def next_pipe(llava_next_dir):
  return tokred_jax.Pipeline.load(str(llava_next_dir), template="llava-hf")


@pytest.fixture(scope="module")
def ov_pipe(llava_onevision_dir):
  return tokred_jax.Pipeline.load(str(llava_onevision_dir), template="llava-hf")


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _video(frames, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (frames, 40, 60, 3), dtype=np.uint8)


def _compiles(pipe) -> int:
  programs = pipe.programs
  return programs["forward"] + programs["prefill"]


def test_inputs_of_many_sizes_compile_once_per_bucket(next_pipe, ov_pipe):
  """12 images of different sizes and aspect ratios and 8 videos of 1..16 frames: as many
  programs as buckets they fall in, no more."""
  sizes = [(37, 90), (90, 37), (60, 60), (20, 120), (120, 20), (28, 28), (50, 51), (80, 30),
           (30, 80), (100, 100), (45, 130), (200, 70)]
  keys, before = set(), _compiles(next_pipe)
  for i, size in enumerate(sizes):
    batch = next_pipe.prepare([_image(*size, i)], ["What is it?"])
    next_pipe.forward(batch)
    keys.add((batch["pixel_values"].pixels.shape, batch["input_ids"].shape))
  buckets = batching.spec_for(next_pipe.cfg)
  assert _compiles(next_pipe) - before == len(keys) <= len(
      batching.anyres.crop_buckets(buckets))
  keys, before = set(), _compiles(ov_pipe)
  for n in (1, 2, 3, 5, 8, 9, 12, 16):
    batch = ov_pipe.prepare(None, ["What happens?"], videos=[_video(n, n)])
    ov_pipe.forward(batch)
    keys.add((batch["pixel_values"].pixels.shape, batch["input_ids"].shape))
  ladder = [r for r in batching.FRAME_LADDER if r <= 16]
  assert _compiles(ov_pipe) - before == len(keys) <= len(ladder)


def test_several_images_per_prompt(ov_pipe):
  """A prompt's `<image>` placeholders get their images' slots in place; without any,
  the images go first; a batched answer equals the one alone."""
  images = [_image(60, 90, 1), _image(100, 40, 2)]
  batch = ov_pipe.prepare([images], ["Compare <image> with <image>."])
  ids = batch["input_ids"][0]
  slots = np.flatnonzero(ids == ov_pipe.cfg.image_token_id)
  assert len(slots) == batch["pixel_values"].valid.shape[1]
  assert np.any(np.diff(slots) > 1), "the words between the images stay between them"
  alone = ov_pipe.generate([images], ["Compare them."], SAMPLING)
  together = ov_pipe.generate([images, _image(70, 70, 3)], ["Compare them.", "What?"],
                              SAMPLING)
  assert together[0] == alone[0]


def _write_video(path, frames):
  import av  # The `video` extra, also in the `test` one.
  with av.open(str(path), "w") as container:
    stream = container.add_stream("ffv1", rate=10)
    stream.height, stream.width, stream.pix_fmt = 40, 60, "bgr0"
    for f in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    container.mux(stream.encode())


def test_video_file_is_decoded_and_sampled(ov_pipe, tmp_path):
  frames = _video(12, 4)
  path = tmp_path / "clip.mkv"
  _write_video(path, frames)
  from_file = ov_pipe.prepare(None, ["What?"], videos=[str(path)], num_frames=4)
  from_frames = ov_pipe.prepare(None, ["What?"], videos=[frames[[0, 3, 7, 11]]])
  np.testing.assert_array_equal(from_file["pixel_values"].pixels,
                                from_frames["pixel_values"].pixels)


BAD = [
    ("next", dict(images=None, videos=[_video(3)]), "llava_onevision"),
    ("ov", dict(images=[_image(30, 30)], videos=[_video(3)]), "not both"),
    ("ov", dict(images=[[_image(30, 30), _image(40, 40)]], prompts=["<image> only one"]),
     "1 <image> tokens for 2 images"),
    ("ov", dict(images=[[]]), "has no image"),
    ("next", dict(images=[[_image(30, 30)] * 40]), "more than any bucket holds"),
]


@pytest.mark.parametrize("model, kwargs, message", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_one_line_before_compiling(next_pipe, ov_pipe, model, kwargs, message):
  pipe = next_pipe if model == "next" else ov_pipe
  kwargs = {"prompts": ["What?"], **kwargs}
  before = _compiles(pipe)
  with pytest.raises(ValueError, match=message) as e:
    pipe.prepare(**kwargs)
  assert _compiles(pipe) == before
  faults.record("Pipeline", f"{pipe.cfg.arch}.prepare({sorted(kwargs)})",
                f"ValueError: {e.value}", before="compile")


def test_mustdrop_on_next_runs_in_segments_and_matches_the_masked_program(next_pipe):
  """MustDrop on LLaVA-NeXT: window merge and key set in every crop, the filters on the
  packed sequence. Fast mode runs as compacted segments; its text logits equal the
  one-program run that only masks."""
  recipe = next_pipe.recipe("mustdrop-64", window=2, threshold=-1.0)  # every window merges
  batch = next_pipe.prepare([_image(37, 90, 1), _image(60, 60, 2)], ["What?", "How many?"],
                            plan=recipe)
  plan = next_pipe.batch_plan(batch, recipe)
  logits, aux = next_pipe.forward(batch, plan, return_aux=True)
  assert plan in next_pipe._segmented
  masked = np.asarray(next_pipe._forward(next_pipe.params, batch, plan, plan.counts(), False))
  text = batch["attention_mask"] & (batch["input_ids"] != next_pipe.cfg.image_token_id)
  np.testing.assert_allclose(np.asarray(logits)[text], masked[text], atol=1e-4, rtol=1e-4)
  real = batch["pixel_values"].valid.sum(1)
  assert (np.asarray(aux["visual_per_layer"])[0] < real).all()  # the windows merged


def test_infer_script_answers_about_a_video(llava_onevision_dir, tmp_path):
  path = tmp_path / "clip.mkv"
  _write_video(path, _video(6, 5))
  out = run_infer(f"--checkpoint={llava_onevision_dir}", f"--video={path}",
                  "--config.num_frames=4", "--config.method=random", "--config.retention=0.5",
                  "--config.template=llava-hf", "--config.max_new_tokens=2",
                  "--config.warmup=False", "--prompt=What happens?")
  assert out.returncode == 0, out.stderr[-2000:]
  for line in (f"video: {path}", "answer:", "visual slots (bucket)", "prefill FLOPs, LLM"):
    assert line in out.stdout
  # 4 frames of 3x3 pooled tokens and the newline: 37 before, about half into the LLM.
  assert "visual tokens before reduction  37" in out.stdout
