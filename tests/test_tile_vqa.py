"""tile_vqa: answers restated from the items, sizes that pick every anyres grid, digits that
only the tiles can read, determinism, and the TFDS build equals the generated source."""

import hashlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tokred_jax
from tokred_jax.data import DataConfig, generated, glyphs, make_dataset, tile_vqa
from tokred_jax.eval import evaluate
from tokred_jax.io import anyres, checkpoint, processing

SPEC = anyres.AnyresSpec(tile_vqa.TILE, 8, tile_vqa.PINPOINTS)


def _scene_and_questions(seed):
  rng = np.random.default_rng([98, seed])
  scene = tile_vqa.make_scene(rng)
  return scene, tile_vqa.questions(scene, rng)


def _slots(text):
  """The colour (index) and the digit a question names (None where it names none)."""
  words = re.findall(r"[a-z]+|\d", text.lower())
  colour = next((glyphs.COLOUR_NAMES.index(w) for w in words if w in glyphs.COLOUR_NAMES), None)
  digit = next((int(w) for w in words if w.isdigit()), None)
  return colour, digit


@pytest.mark.parametrize("seed", range(40))
def test_every_answer_restated_from_the_items(seed):
  scene, asked = _scene_and_questions(seed)
  items = [tuple(row) for row in scene.items.tolist()]
  assert tile_vqa.MIN_ITEMS <= len(items) <= tile_vqa.MAX_ITEMS
  colour, _ = _slots(asked["reading"].text)
  assert [d for _, _, d, c in items if c == colour] == [int(asked["reading"].answer)]
  _, digit = _slots(asked["attribute"].text)
  assert [glyphs.COLOUR_NAMES[c] for _, _, d, c in items if d == digit] == [
      asked["attribute"].answer]
  colour, digit = _slots(asked["existence"].text)
  present = any((d, c) == (digit, colour) for _, _, d, c in items)
  assert asked["existence"].answer == ("yes" if present else "no")
  _, digit = _slots(asked["counting"].text)
  assert asked["counting"].answer == str(sum(d == digit for _, _, d, _ in items))


def test_items_are_drawn_where_labelled():
  for seed in range(5):
    scene, _ = _scene_and_questions(seed)
    h, w, _ = scene.image.shape
    covered = np.zeros((h, w), bool)
    for y, x, digit, colour in scene.items.tolist():
      assert 0 <= y and y + tile_vqa.DIGIT_H <= h and 0 <= x and x + tile_vqa.DIGIT_W <= w
      box = scene.image[y:y + tile_vqa.DIGIT_H, x:x + tile_vqa.DIGIT_W].astype(int)
      target = np.array(glyphs.COLOURS[glyphs.COLOUR_NAMES[colour]])
      cos = box @ target / (np.linalg.norm(box, axis=-1) * np.linalg.norm(target) + 1e-9)
      # The hue marks exactly the font pixels of the labelled digit.
      assert np.array_equal(cos > 0.99, glyphs.glyph_mask(digit, tile_vqa.FONT_SCALE))
      covered[y:y + tile_vqa.DIGIT_H, x:x + tile_vqa.DIGIT_W] = True
    assert scene.image[~covered].max() < 80  # background elsewhere


def test_answers_are_balanced_enough_to_need_the_image():
  answers = {k: [] for k in tile_vqa.QUESTION_TYPES}
  for seed in range(300):
    for kind, q in _scene_and_questions(seed)[1].items():
      answers[kind].append(q.answer)
  for kind, values in answers.items():
    _, counts = np.unique(values, return_counts=True)
    assert counts.max() / len(values) < 0.55, kind
  _, counts = np.unique(answers["counting"], return_counts=True)
  assert len(counts) == tile_vqa.MAX_COUNT + 1 and counts.min() / len(values) > 0.12


def test_every_reachable_size_picks_its_grid_and_all_grids_occur():
  def sides(tiles):
    return [128] if tiles == 2 else range((tiles - 1) * 64 + 16, tiles * 64 + 1)
  for rows, cols in tile_vqa.GRIDS:
    for h in sides(rows):
      for w in sides(cols):
        assert tile_vqa.grid_of((h, w)) == (rows, cols), (h, w)
  grids = [tile_vqa.grid_of(tile_vqa.example("test", i)["image"].shape[:2]) for i in range(240)]
  _, counts = np.unique(np.array(grids), axis=0, return_counts=True)
  assert len(counts) == len(tile_vqa.GRIDS) and counts.min() >= 240 / 6 / 2
  # Several crop counts and visual-token counts: anyres buckets differ across images.
  sizes = [tile_vqa.example("test", i)["image"].shape[:2] for i in range(60)]
  assert len({anyres.num_crops(s, SPEC) for s in sizes}) == 4  # 1 + {4, 6, 8, 9}
  assert len({anyres.num_image_tokens(s, SPEC) for s in sizes}) > 10


def _pixels(crops):
  """anyres_crops' normalised crops back to 0..255."""
  return (crops * np.array(SPEC.image_std) + np.array(SPEC.image_mean)) * 255


@pytest.mark.parametrize("index", range(0, 24, 3))
def test_digits_are_legible_in_the_tiles_only(index):
  image = tile_vqa.example("test", index)["image"]
  h, w, _ = image.shape
  # Geometry: the base crop shrinks a digit to at most half its font size each way.
  assert tile_vqa.DIGIT_W * SPEC.crop_size / w <= glyphs.FONT_W / 2
  assert tile_vqa.DIGIT_H * SPEC.crop_size / h <= glyphs.FONT_H / 2
  crops = _pixels(anyres.anyres_crops(image, SPEC))
  items = tile_vqa.example("test", index)["items"]
  for y, x, digit, _ in items.tolist():
    mask = glyphs.glyph_mask(digit, tile_vqa.FONT_SCALE)
    bare = image.copy()
    bare[y:y + mask.shape[0], x:x + mask.shape[1]][mask] = np.median(image, axis=(0, 1))
    full = np.abs(image.astype(float) - bare).max()
    diff = np.abs(crops - _pixels(anyres.anyres_crops(bare, SPEC))).max(-1)
    # Tiles: the digit keeps its contrast on at least its font pixels, all in one tile.
    strong = diff[1:] > full / 2
    assert strong.sum() >= mask.sum() and np.count_nonzero(strong.any(axis=(1, 2))) == 1
    # Base crop: at most a few pixels keep half of it; a blob, not a 5 x 7 shape.
    assert (diff[0] > full / 2).sum() <= 3


def _digest(ex):
  return hashlib.sha256(ex["image"].tobytes()).hexdigest()


def test_examples_are_deterministic_and_splits_disjoint():
  a, b = tile_vqa.example("test", 7), tile_vqa.example("test", 7)
  assert np.array_equal(a["image"], b["image"]) and a["conversations"] == b["conversations"]
  assert np.array_equal(a["items"], b["items"])
  # An example does not depend on the split's size (config).
  small = generated.source("tile_vqa/small", "test", None)[7]
  full = tile_vqa.source("tile_vqa/default", "test", None)[7]
  assert np.array_equal(small["image"], full["image"]) and small["id"] == b"test-7"
  digests = {split: {_digest(tile_vqa.example(split, i)) for i in range(40)}
             for split in ("train", "describe", "validation", "test")}
  assert all(len(d) == 40 for d in digests.values())
  assert len(set.union(*digests.values())) == 4 * 40
  train = tile_vqa.example("train", 0)
  assert sorted(train["question_types"]) == sorted(tile_vqa.QUESTION_TYPES)
  assert [t["from"] for t in train["conversations"]] == ["human", "gpt"] * 4
  assert train["conversations"][0]["value"].startswith("<image>\n")
  describe = tile_vqa.example("describe", 0)
  assert describe["conversations"][1]["value"] == tile_vqa.describe(describe["items"])


def test_test_split_types_in_turn():
  source = tile_vqa.source("tile_vqa/small", "test", None)
  kinds = [source[i]["question_types"] for i in range(len(source))]
  assert kinds == [[tile_vqa.QUESTION_TYPES[i % 4].encode()] for i in range(len(source))]


def test_tfds_build_equals_the_generated_source(tmp_path):
  assert tile_vqa.build(str(tmp_path), "small") == "tile_vqa/small"
  for split in ("test", "describe"):
    built = tfds.data_source("tile_vqa/small", split=split, data_dir=str(tmp_path))
    generated_ = tile_vqa.source("tile_vqa/small", split, None)
    assert len(built) == len(generated_)
    by_id = {generated_[i]["id"]: generated_[i] for i in range(len(generated_))}
    for record in built:
      twin = by_id[record["id"]]
      assert record["image"].dtype == np.uint8
      assert np.array_equal(record["image"], twin["image"])
      assert np.array_equal(record["items"], twin["items"])
      assert record["conversations"] == twin["conversations"]
      assert list(record["question_types"]) == twin["question_types"]
  with pytest.raises(ValueError, match="splits"):
    tile_vqa.source("tile_vqa/small", "nope", None)


def test_registered_as_generated_and_refused_by_single_image_batches():
  examples = evaluate.load_examples("tile_vqa/small", None, limit=8)
  assert [e.question_type for e in examples] == list(tile_vqa.QUESTION_TYPES) * 2
  assert len({e.image.shape for e in examples}) > 1 and examples[0].prompt.startswith("<image>")
  cfg, _ = checkpoint.load_checkpoint(tokred_jax.DEFAULT_CHECKPOINT)
  tok = processing.Tokenizer.load(tokred_jax.DEFAULT_CHECKPOINT, cfg)
  with pytest.raises(ValueError, match="anyres"):
    make_dataset(DataConfig("tile_vqa/small", None, batch_size=2, max_length=64), "train", 0,
                 tokenizer=tok, model_cfg=cfg)
