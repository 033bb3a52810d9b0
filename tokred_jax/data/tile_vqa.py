r"""tile_vqa: high-resolution scenes for anyres (LLaVA-NeXT-style) models, as a TFDS builder.

  python -m tokred_jax.data.tile_vqa --data_dir=/tmp/tfds            # full size
  python -m tokred_jax.data.tile_vqa --data_dir=/tmp/tfds --config=small

glyph_vqa's coloured digits and questions, on images of varied size and aspect ratio
and with digits so small that reading them needs the anyres tiles. The model these are
made for cuts an image as LLaVA-NeXT does (`tokred_jax.io.anyres`) into S x S crops,
S = TILE = 64 px, over the grids GRIDS (2x2, 2x3, 3x2, 3x3, 2x4, 4x2 tiles; `PINPOINTS`):

  image size:  a side of n tiles is 128 px for n = 2, else uniform in
               [(n - 1) * 64 + 16, n * 64] (144-192, 208-256), so the grid is picked
               uniformly and anyres keeps the image whole or enlarges it (x1 to x1.33)
               before tiling; grid_of(size) is the grid it picks.
  digits:      glyph_vqa's 5 x 7 font at one pixel a font pixel, in 16 px cells (the
               image's whole cells), 6 to 12 of them, in glyph_vqa's six colours;
               each lies whole in one tile, as the tower sees each tile alone.
  legibility:  in the tiles a digit is at least 5 x 7 px; the base crop (the whole image
               squashed to 64 x 64) shrinks every side at least 2x, to at most 2.5 x 3.5
               px, half the font's resolution or less: colours survive there, digits do
               not (tests/test_tile_vqa.py checks both on the crops anyres makes).

Questions (`QUESTION_TYPES`, glyph_vqa's four; each has one right answer, made so as
glyph_vqa's are, and all but the colour of a reading question need the digits read):

  reading:   "Which digit is red?" (that colour occurs once)        -> "0".."9"
  attribute: "What colour is the 3?" (that digit occurs once)       -> a colour
  existence: "Is there a green 5?" (half yes; the no's near misses) -> "yes" / "no"
  counting:  "How many 7s are there?" (the answer uniform)          -> "0".."4"

Splits, as glyph_vqa's: train (one scene, its four questions in a random order),
describe ("List the digits from top to bottom." -> "red 7, blue 3, ..."), validation
and test (one question each, the types in turn: index % 4). Every example is a pure
function of (split, index); `source(config, split)` generates them when no data_dir is
given.

Features: id, image u8[H, W, 3] at its true size (a variable-shape tensor, zlib
compressed: TFDS reads it without TensorFlow; 128 <= H, W <= 256), conversations,
question_types, items i32[n, 4] (y, x, digit, colour index) with (y, x) the top left
pixel of each digit's 5 x 7 box, in reading order.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import tensorflow_datasets as tfds

from tokred_jax.data import generated, glyphs
from tokred_jax.io import anyres

NAME = "tile_vqa"
TILE = 64  # S, the crop side of the anyres model these images are for
GRIDS = ((2, 2), (2, 3), (3, 2), (3, 3), (2, 4), (4, 2))  # (rows, cols) of tiles
PINPOINTS = tuple((rows * TILE, cols * TILE) for rows, cols in GRIDS)
CELL = 16
FONT_SCALE = 1  # image pixels per font pixel: a digit is 5 x 7 px
DIGIT_H, DIGIT_W = glyphs.FONT_H * FONT_SCALE, glyphs.FONT_W * FONT_SCALE
MIN_ITEMS, MAX_ITEMS = 6, 12
MAX_COUNT = 4
QUESTION_TYPES = glyphs.QUESTION_TYPES
TEMPLATES = dict(glyphs.TEMPLATES,
                 counting=("How many {digit}s are there?", "Count the {digit}s."))
DESCRIBE = glyphs.DESCRIBE
# Seeds [_SALT, split seed, index]: streams apart from glyph_vqa's and from each other.
_SALT = 17
_SPLIT_SEEDS = {"train": 1, "describe": 2, "validation": 3, "test": 4}


def grid_of(size_hw: tuple[int, int]) -> tuple[int, int]:
  """(rows, cols): the tile grid anyres picks for an image of size (H, W) at PINPOINTS."""
  return anyres.grid_shape(size_hw, PINPOINTS, TILE)


def spans(size_hw: tuple[int, int]) -> tuple[tuple[int, float], tuple[int, float]]:
  """(offset, scale) down and across: image pixel y lands at offset + y * scale in the
  tile grid, once anyres has resized the image into it and padded it (centred)."""
  target = anyres.select_best_resolution(size_hw, PINPOINTS)
  fitted = anyres._fit_size(tuple(size_hw), target)  # pylint: disable=protected-access
  return tuple(((t - f) // 2, f / s) for t, f, s in zip(target, fitted, size_hw))


def _in_one_tile(start: int, length: int, span: tuple[int, float]) -> bool:
  """Whether image pixels [start, start + length) land in one row (column) of tiles."""
  offset, scale = span
  first, last = offset + start * scale, offset + (start + length) * scale
  return math.floor(first / TILE) == math.ceil(last / TILE) - 1


def _side(rng: np.random.Generator, tiles: int) -> int:
  """A side of `tiles` tiles: the grid stays the smallest holding it, and it is at least
  two tiles long, so the base crop halves it at least."""
  if tiles == 2:
    return 2 * TILE
  return int(rng.integers((tiles - 1) * TILE + CELL, tiles * TILE + 1))


@dataclasses.dataclass(frozen=True)
class Scene:
  """One rendered scene.

  Attributes:
    image: u8[H, W, 3].
    items: i32[n, 4], (y, x, digit, colour index) of each digit, in reading order.
    counted: the digit placed a uniform number of times (0..MAX_COUNT), which the
      counting question asks about so that its answers are uniform.
  """
  image: np.ndarray
  items: np.ndarray
  counted: int


def _contents(rng: np.random.Generator, counted: int) -> tuple[list[int], list[int]]:
  """Digits and colours of the items: `counted` a uniform 0..MAX_COUNT times, no digit
  more often than that, and a colour and a digit that occur once (reading, attribute)."""
  count = int(rng.integers(0, MAX_COUNT + 1))
  others = [d for d in range(10) if d != counted]
  while True:
    n = int(rng.integers(max(MIN_ITEMS, count + 2), MAX_ITEMS + 1))
    digits = [counted] * count + [int(d) for d in rng.choice(others, n - count)]
    colours = [int(c) for c in rng.integers(0, len(glyphs.COLOURS), n)]
    tallies = np.bincount(digits, minlength=10)
    if (tallies.max() <= MAX_COUNT and 1 in tallies
        and 1 in np.bincount(colours, minlength=len(glyphs.COLOURS))):
      return digits, colours


def make_scene(rng: np.random.Generator) -> Scene:
  """A scene in which every question type has a well-posed question (see `questions`)."""
  rows, cols = GRIDS[int(rng.integers(len(GRIDS)))]
  height, width = _side(rng, rows), _side(rng, cols)
  counted = int(rng.integers(10))
  digits, colours = _contents(rng, counted)
  n = len(digits)
  cells = rng.choice((height // CELL) * (width // CELL), n, replace=False)
  image = glyphs.background(rng, height, width)
  down, across = spans((height, width))
  items = []
  for cell, k in zip(cells, rng.permutation(n)):
    r, c = divmod(int(cell), width // CELL)
    # Jittered inside its cell but whole inside one tile: the tower sees each tile alone.
    y = int(rng.choice([r * CELL + o for o in range(CELL - DIGIT_H + 1)
                        if _in_one_tile(r * CELL + o, DIGIT_H, down)]))
    x = int(rng.choice([c * CELL + o for o in range(CELL - DIGIT_W + 1)
                        if _in_one_tile(c * CELL + o, DIGIT_W, across)]))
    glyphs.draw_glyph(image, y, x, digits[k], glyphs.glyph_rgb(rng, colours[k]), FONT_SCALE)
    items.append((y // CELL, x // CELL, y, x, digits[k], colours[k]))
  items.sort()
  return Scene(image, np.array([item[2:] for item in items], np.int32), counted)


def questions(scene: Scene, rng: np.random.Generator) -> dict[str, glyphs.Question]:
  """One question of each type about `scene`, each with a single right answer."""
  digits, colours = scene.items[:, 2].tolist(), scene.items[:, 3].tolist()
  name = glyphs.COLOUR_NAMES
  out = {}
  k = int(rng.choice([i for i, c in enumerate(colours) if colours.count(c) == 1]))
  out["reading"] = glyphs.ask(rng, "reading", str(digits[k]), TEMPLATES, colour=name[colours[k]])
  k = int(rng.choice([i for i, d in enumerate(digits) if digits.count(d) == 1]))
  out["attribute"] = glyphs.ask(rng, "attribute", name[colours[k]], TEMPLATES, digit=digits[k])
  digit, colour, answer = glyphs.existence(rng, list(zip(digits, colours)))
  out["existence"] = glyphs.ask(rng, "existence", answer, TEMPLATES, colour=name[colour],
                                digit=digit)
  count = digits.count(scene.counted)
  out["counting"] = glyphs.ask(rng, "counting", str(count), TEMPLATES, digit=scene.counted)
  return out


def describe(items: np.ndarray) -> str:
  """The items in reading order, e.g. "red 7, blue 3, cyan 0"."""
  return ", ".join(f"{glyphs.COLOUR_NAMES[c]} {d}" for _, _, d, c in items.tolist())


def example(split: str, index: int) -> dict:
  """The stored example `index` of `split` (deterministic)."""
  rng = np.random.default_rng([_SALT, _SPLIT_SEEDS[split], index])
  scene = make_scene(rng)
  asked = questions(scene, rng)
  if split == "train":
    turns = [asked[k] for k in rng.permutation(QUESTION_TYPES)]
  elif split == "describe":
    turns = [glyphs.Question("describe", DESCRIBE, describe(scene.items))]
  else:
    turns = [asked[QUESTION_TYPES[index % len(QUESTION_TYPES)]]]
  return {"id": f"{split}-{index}", "image": scene.image,
          "conversations": generated.conversation([(q.text, q.answer) for q in turns]),
          "question_types": [q.kind for q in turns], "items": scene.items}


class TileVqa(generated.Splits, tfds.core.GeneratorBasedBuilder):
  """Small coloured digits on images of varied size and aspect ratio, read in anyres tiles."""

  example = staticmethod(example)

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      generated.SizesConfig(
          name="default", description="Training data for a small LLaVA-NeXT-style model.",
          sizes={"train": 60_000, "describe": 20_000, "validation": 1_000, "test": 4_000}),
      generated.SizesConfig(
          name="small", description="For tests and quick looks.",
          sizes={"train": 256, "describe": 64, "validation": 64, "test": 128}),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                          encoding="zlib"),
            "conversations": tfds.features.Sequence({
                "from": tfds.features.Text(), "value": tfds.features.Text()}),
            "question_types": tfds.features.Sequence(tfds.features.Text()),
            "items": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
        }),
        metadata=tfds.core.MetadataDict(tile_size=TILE, pinpoints=[list(p) for p in PINPOINTS],
                                        colours=list(glyphs.COLOUR_NAMES)),
    )


def source(dataset: str, split: str, data_dir: str | None):
  """`dataset` ("tile_vqa/CONFIG") read from `data_dir`, or generated when it is None."""
  return generated.open_source(TileVqa, NAME, example, dataset, split, data_dir)


def build(data_dir: str, config: str = "default") -> str:
  """Builds (or finds already built) the data set; returns its TFDS name."""
  return generated.build(TileVqa, NAME, data_dir, config)


if __name__ == "__main__":
  generated.main(sys.argv[1:], __doc__, build)
