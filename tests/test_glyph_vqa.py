"""glyph_vqa: well-posed questions, determinism, the TFDS build equals the generated source,
and the training pipeline reads it."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tokred_jax
from tokred_jax.data import DataConfig, make_dataset
from tokred_jax.data import glyph_vqa, glyphs
from tokred_jax.io import checkpoint, processing
from tokred_jax.proj.glyph_vqa.tower_pretrain import NUM_DIGITS, patch_labels


def _scene_and_questions(seed):
  rng = np.random.default_rng([99, seed])
  scene = glyphs.make_scene(rng)
  return scene, glyphs.questions(scene, rng)


@pytest.mark.parametrize("seed", range(60))
def test_every_question_has_its_single_right_answer(seed):
  scene, asked = _scene_and_questions(seed)
  items = scene.items
  assert 4 <= len(items) <= 8
  by_colour = {c: [d for _, _, d, cc in items if cc == c] for c in range(len(glyphs.COLOURS))}
  # Reading: the asked colour occurs once, on the answered digit.
  colour = next(c for c, name in enumerate(glyphs.COLOUR_NAMES) if name in asked["reading"].text)
  assert by_colour[colour] == [int(asked["reading"].answer)]
  # Attribute: the asked digit occurs once, in the answered colour.
  digit = int(asked["attribute"].text.rstrip("?").split()[-1])
  assert [glyphs.COLOUR_NAMES[c] for _, _, d, c in items if d == digit] == [
      asked["attribute"].answer]
  # Existence: "yes" exactly when that coloured digit is there.
  words = asked["existence"].text.rstrip("?").split()
  present = (glyphs.COLOUR_NAMES.index(words[-2]), int(words[-1])) in {
      (c, d) for _, _, d, c in items}
  assert asked["existence"].answer == ("yes" if present else "no")
  # Counting: the number of items of the asked colour.
  colour = next(c for c, name in enumerate(glyphs.COLOUR_NAMES) if name in asked["counting"].text)
  assert int(asked["counting"].answer) == len(by_colour[colour])


def test_each_item_is_drawn_in_its_cell_and_colour():
  scene, _ = _scene_and_questions(3)
  for row, col, _, colour in scene.items:
    cell = scene.image[row * glyphs.CELL:(row + 1) * glyphs.CELL,
                       col * glyphs.CELL:(col + 1) * glyphs.CELL].reshape(-1, 3).astype(int)
    target = np.array(glyphs.COLOURS[glyphs.COLOUR_NAMES[colour]])
    # Brightness is jittered by at most 15%: the hue (direction) stays the colour's.
    cos = cell @ target / (np.linalg.norm(cell, axis=1) * np.linalg.norm(target) + 1e-9)
    assert (cos > 0.99).sum() >= 20  # glyph pixels (a digit has >= 12 font pixels x 4)
  empty = np.argwhere(scene.digits == glyphs.EMPTY)[0]
  cell = scene.image[empty[0] * glyphs.CELL:(empty[0] + 1) * glyphs.CELL,
                     empty[1] * glyphs.CELL:(empty[1] + 1) * glyphs.CELL]
  assert cell.max() < 80  # background only


def test_answers_are_balanced_enough_to_need_the_image():
  answers = {k: [] for k in glyphs.QUESTION_TYPES}
  for seed in range(400):
    for kind, q in _scene_and_questions(seed)[1].items():
      answers[kind].append(q.answer)
  for kind, values in answers.items():
    _, counts = np.unique(values, return_counts=True)
    assert counts.max() / len(values) < 0.55, kind  # no answer a blind guess gets right
  assert set(answers["counting"]) == {str(n) for n in range(glyphs.MAX_COUNT + 1)}


def test_examples_are_deterministic_and_splits_differ():
  a, b = glyph_vqa.example("test", 7), glyph_vqa.example("test", 7)
  assert np.array_equal(a["image"], b["image"]) and a["conversations"] == b["conversations"]
  assert not np.array_equal(a["image"], glyph_vqa.example("train", 7)["image"])
  train = glyph_vqa.example("train", 0)
  assert sorted(train["question_types"]) == sorted(glyphs.QUESTION_TYPES)
  assert [t["from"] for t in train["conversations"]] == ["human", "gpt"] * 4
  assert train["conversations"][0]["value"].startswith("<image>\n")
  kinds = [glyph_vqa.example("test", i)["question_types"] for i in range(8)]
  assert kinds == [[glyphs.QUESTION_TYPES[i % 4]] for i in range(8)]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  assert glyph_vqa.build(data_dir, "small") == "glyph_vqa/small"
  return data_dir


def test_tfds_build_equals_the_generated_source(small_dir):
  built = tfds.data_source("glyph_vqa/small", split="test", data_dir=small_dir)
  generated = glyph_vqa.source("glyph_vqa/small", "test", None)
  assert len(built) == len(generated) == 128
  by_id = {generated[i]["id"]: generated[i] for i in range(len(generated))}
  for record in built:
    twin = by_id[record["id"]]
    assert np.array_equal(record["image"], twin["image"])
    assert np.array_equal(record["cell_digits"], twin["cell_digits"])
    assert record["conversations"] == twin["conversations"]
    assert list(record["question_types"]) == twin["question_types"]
  with pytest.raises(IndexError):
    generated[128]
  with pytest.raises(ValueError, match="splits"):
    glyph_vqa.source("glyph_vqa/small", "nope", None)


@pytest.mark.parametrize("data_dir", ["built", None])
def test_training_batches_learn_only_the_answers(small_dir, data_dir):
  cfg, _ = checkpoint.load_checkpoint(tokred_jax.DEFAULT_CHECKPOINT)
  tok = processing.Tokenizer.load(tokred_jax.DEFAULT_CHECKPOINT, cfg)
  config = DataConfig("glyph_vqa/small", small_dir if data_dir else None, batch_size=4,
                      max_length=208, shuffle=False)
  batch = next(iter(make_dataset(config, "train", 0, tokenizer=tok, model_cfg=cfg)))
  assert batch["pixel_values"].shape == (4, 96, 96, 3)
  assert (batch["input_ids"] == cfg.image_token_id).sum(1).tolist() == [144] * 4
  learned = [tok.decode(batch["labels"][i][batch["loss_mask"][i]]) for i in range(4)]
  # Four answers per training conversation, each a single word.
  assert all(len(text.split()) == 4 for text in learned), learned


def test_patch_labels_cover_each_cell_with_its_2x2_patches():
  cells = np.full((6, 6), glyphs.EMPTY, np.int32)
  cells[1, 2] = 7
  labels = patch_labels(cells, 12, NUM_DIGITS - 1).reshape(12, 12)
  assert (labels[2:4, 4:6] == 7).all()
  assert (labels == 7).sum() == 4 and (labels == NUM_DIGITS - 1).sum() == 140
