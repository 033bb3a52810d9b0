"""video_vqa: answers restated from the per-frame labels, questions that need the right
frames, labels that match the pixels, determinism, and the TFDS build equals the source."""

import hashlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tokred_jax
from tokred_jax.data import generated, glyphs, video_vqa
from tokred_jax.eval import evaluate
from tokred_jax.io import video
from tokred_jax.models import llava_onevision

EMPTY = glyphs.EMPTY


def _video_and_questions(seed):
  rng = np.random.default_rng([97, seed])
  clip = video_vqa.make_video(rng)
  return clip, video_vqa.questions(clip, rng)


def _slots(text):
  """The colour (index) and the digit a question names (None where it names none)."""
  words = re.findall(r"[a-z]+|\d", text.lower())
  colour = next((glyphs.COLOUR_NAMES.index(w) for w in words if w in glyphs.COLOUR_NAMES), None)
  digit = next((int(w) for w in words if w.isdigit()), None)
  return colour, digit


def _where(digits, digit):
  """Per frame, the (row, col) holding `digit`, or None."""
  return [tuple(int(v) for v in np.argwhere(frame == digit)[0]) if (frame == digit).any()
          else None for frame in digits]


@pytest.mark.parametrize("seed", range(40))
def test_every_answer_restated_from_the_labels(seed):
  clip, asked = _video_and_questions(seed)
  digits, colours = clip.digits, clip.colours
  f = len(digits)
  assert f in video_vqa.FRAME_COUNTS and clip.frames.shape == (f, 64, 64, 3)
  name = glyphs.COLOUR_NAMES
  # Appearance: the one digit absent from frame 0 and shown later in that colour.
  colour, _ = _slots(asked["appearance"].text)
  late = {int(d) for d in digits[1:][colours[1:] == colour]} - set(digits[0].ravel().tolist())
  assert late == {int(asked["appearance"].answer)}
  # Colour change: the digit's colour in frame 0 differs from its last, the answer.
  _, digit = _slots(asked["colour_change"].text)
  hues = [int(c[d == digit][0]) for d, c in zip(digits, colours)]
  assert hues[0] != hues[-1] and name[hues[-1]] == asked["colour_change"].answer
  assert len(set(hues)) == 2
  # Motion: the direction from its cell in frame 0 to its cell in the last frame.
  _, digit = _slots(asked["motion"].text)
  cells = _where(digits, digit)
  step = tuple(np.subtract(cells[-1], cells[0]).tolist())
  assert video_vqa.DIRECTIONS[asked["motion"].answer] == step
  # Frame count: the frames the digit is shown in.
  _, digit = _slots(asked["frame_count"].text)
  assert asked["frame_count"].answer == str(sum(c is not None for c in _where(digits, digit)))
  # First and last frame: single-frame reading and attribute.
  colour, _ = _slots(asked["first_frame"].text)
  assert digits[0][colours[0] == colour].tolist() == [int(asked["first_frame"].answer)]
  _, digit = _slots(asked["last_frame"].text)
  assert name[int(colours[-1][digits[-1] == digit][0])] == asked["last_frame"].answer
  # Every digit stands in one cell a frame at most.
  for frame in digits:
    shown = frame[frame != EMPTY]
    assert len(shown) == len(set(shown.tolist()))


def test_temporal_questions_need_more_than_one_frame():
  """From the first or the last frame alone these would be guesses in many videos."""
  ambiguous_last, hidden_first = 0, 0
  for seed in range(200):
    clip, asked = _video_and_questions(seed)
    colour, _ = _slots(asked["appearance"].text)
    ambiguous_last += (clip.colours[-1] == colour).sum() > 1  # a still item shares it
    _, digit = _slots(asked["appearance"].text)
    hidden_first += not (clip.digits[0] == digit).any()
  assert hidden_first == 200 and ambiguous_last > 40
  counts = [int(_video_and_questions(s)[1]["frame_count"].answer) for s in range(200)]
  assert max(counts) <= video_vqa.MAX_FLASH < min(video_vqa.FRAME_COUNTS)


def test_labels_match_the_pixels():
  for seed in range(4):
    clip, _ = _video_and_questions(seed)
    for frame, digits, colours in zip(clip.frames, clip.digits, clip.colours):
      for r in range(video_vqa.GRID):
        for c in range(video_vqa.GRID):
          cell = frame[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].reshape(-1, 3).astype(int)
          if digits[r, c] == EMPTY:
            assert cell.max() < 80
            continue
          target = np.array(glyphs.COLOURS[glyphs.COLOUR_NAMES[colours[r, c]]])
          cos = cell @ target / (np.linalg.norm(cell, axis=1) * np.linalg.norm(target) + 1e-9)
          assert (cos > 0.99).sum() == glyphs.GLYPHS[int(digits[r, c])].sum()
    # One still background: frames differ only where labels do.
    same = (clip.digits == clip.digits[:1]) & (clip.colours == clip.colours[:1])
    pixels_same = (clip.frames == clip.frames[:1]).all(-1)
    assert pixels_same.reshape(len(same), 4, 16, 4, 16).all((2, 4))[same].all()


def test_answers_are_balanced_and_both_frame_counts_occur():
  answers = {k: [] for k in video_vqa.QUESTION_TYPES}
  frames = []
  for seed in range(300):
    clip, asked = _video_and_questions(seed)
    frames.append(len(clip.frames))
    for kind, q in asked.items():
      answers[kind].append(q.answer)
  for kind, values in answers.items():
    _, counts = np.unique(values, return_counts=True)
    assert counts.max() / len(values) < 0.35, kind
  assert sorted(set(answers["motion"])) == sorted(video_vqa.DIRECTIONS)
  assert set(answers["frame_count"]) == {str(n) for n in range(video_vqa.MAX_FLASH + 1)}
  assert 0.4 < np.mean(np.array(frames) == 8) < 0.6


def test_frames_pool_to_one_token_a_cell():
  # 8 px patches: 8 x 8 a frame, 2 x 2 pooling -> 4 x 4, the cell grid.
  assert llava_onevision.pooled_grid(video_vqa.FRAME // 8) == video_vqa.GRID
  assert video.video_token_count(16, video_vqa.FRAME // 8) == 16 * 16 + 1


def _digest(ex):
  return hashlib.sha256(ex["frames"].tobytes()).hexdigest()


def test_examples_are_deterministic_and_splits_disjoint():
  a, b = video_vqa.example("test", 5), video_vqa.example("test", 5)
  assert np.array_equal(a["frames"], b["frames"]) and a["conversations"] == b["conversations"]
  small = generated.source("video_vqa/small", "test", None)[5]
  full = video_vqa.source("video_vqa/default", "test", None)[5]
  assert np.array_equal(small["frames"], full["frames"]) and small["id"] == b"test-5"
  digests = {split: {_digest(video_vqa.example(split, i)) for i in range(40)}
             for split in ("train", "describe", "validation", "test")}
  assert all(len(d) == 40 for d in digests.values())
  assert len(set.union(*digests.values())) == 4 * 40
  train = video_vqa.example("train", 0)
  assert sorted(train["question_types"]) == sorted(video_vqa.QUESTION_TYPES)
  assert [t["from"] for t in train["conversations"]] == ["human", "gpt"] * 6
  assert train["conversations"][0]["value"].startswith("<image>\n")
  ex = video_vqa.example("describe", 0)
  assert [t["value"] for t in ex["conversations"][1::2]] == [
      video_vqa.describe(ex["cell_digits"][t], ex["cell_colours"][t]) for t in (0, -1)]


def test_test_split_types_in_turn():
  source = video_vqa.source("video_vqa/small", "test", None)
  n = len(video_vqa.QUESTION_TYPES)
  kinds = [source[i]["question_types"] for i in range(len(source))]
  assert kinds == [[video_vqa.QUESTION_TYPES[i % n].encode()] for i in range(len(source))]


def test_tfds_build_equals_the_generated_source(tmp_path):
  assert video_vqa.build(str(tmp_path), "small") == "video_vqa/small"
  for split in ("test", "describe"):
    built = tfds.data_source("video_vqa/small", split=split, data_dir=str(tmp_path))
    generated_ = video_vqa.source("video_vqa/small", split, None)
    assert len(built) == len(generated_)
    by_id = {generated_[i]["id"]: generated_[i] for i in range(len(generated_))}
    for record in built:
      twin = by_id[record["id"]]
      assert record["frames"].dtype == np.uint8
      assert np.array_equal(record["frames"], twin["frames"])
      assert np.array_equal(record["cell_digits"], twin["cell_digits"])
      assert np.array_equal(record["cell_colours"], twin["cell_colours"])
      assert record["conversations"] == twin["conversations"]
      assert list(record["question_types"]) == twin["question_types"]


def test_registered_as_generated_and_refused_where_videos_are_not_taken():
  examples = evaluate.load_examples("video_vqa/small", None, limit=6)
  assert [e.question_type for e in examples] == list(video_vqa.QUESTION_TYPES)
  assert all(e.image is None and len(e.video) in video_vqa.FRAME_COUNTS for e in examples)
  pipe = tokred_jax.Pipeline.load(tokred_jax.DEFAULT_CHECKPOINT, weights=False)
  with pytest.raises(ValueError, match="videos need a LLaVA-NeXT or OneVision checkpoint"):
    pipe.prepare(None, [examples[0].prompt], videos=[examples[0].video])
