r"""video_vqa: short videos of coloured digits for video (LLaVA-OneVision-style) models, as TFDS.

  python -m tokred_jax.data.video_vqa --data_dir=/tmp/tfds            # full size
  python -m tokred_jax.data.video_vqa --data_dir=/tmp/tfds --config=small

A video is F = 8 or 16 frames (half each: the two smallest rungs of the frame ladder,
`tokred_jax.io.batching.FRAME_LADDER`) of 64 x 64 px, a 4 x 4 grid of glyph_vqa's
16 px cells holding its 10 x 14 px digits in its six colours, on one still background.
With 8 px patches a frame is 8 x 8 patches, which OneVision's 2 x 2 pooling makes 4 x 4
tokens: one per cell. Every digit occurs in one item only, and each video holds

  1-3 still items;   2 that appear (absent from the first frame, there from frame t on);
  1 that moves one cell (up, down, left or right) at some frame;
  1 that changes colour at some frame;
  and, in 4 videos of 5, one that flashes: shown in 1-4 consecutive frames only.

Questions (`QUESTION_TYPES`; temporal ones need the right frames, the last two one):

  appearance:   "Which digit appeared in red?" (a still item may be red too) -> "0".."9"
  colour_change: "What colour did the 5 become?"                         -> a colour
  motion:       "Which way did the 4 move?"                  -> "up" / "down" / "left" / "right"
  frame_count:  "How many frames show a 3?" (the flash, or a digit never shown) -> "0".."4"
  first_frame:  "Which digit is blue in the first frame?" (that colour once)    -> "0".."9"
  last_frame:   "What colour is the 8 in the last frame?"                -> a colour

Splits: train (one video, its six questions in a random order), describe (the digits
of the first and of the last frame, two turns: "List the digits in the first frame."
-> "red 7, blue 3, ..."), validation and test (one question each, the types in turn:
index % 6). Every example is a pure function of (split, index); `source(config,
split)` generates them when no data_dir is given.

Features: id, frames u8[F, 64, 64, 3] (F varies: a variable-length tensor, zlib
compressed, read without TensorFlow), conversations ("<image>\n" stands for the video,
as in LLaVA-Video's data), question_types, and per-frame cell labels cell_digits /
cell_colours i32[F, 4, 4] (-1: empty), what a tower pretraining reads.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import tensorflow_datasets as tfds

from tokred_jax.data import generated, glyphs

NAME = "video_vqa"
FRAME = 64  # S, the frame side
GRID = 4  # cells a side
CELL = glyphs.CELL
FRAME_COUNTS = (8, 16)
MAX_FLASH = 4  # most frames a flashing digit shows in
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
EMPTY = glyphs.EMPTY
QUESTION_TYPES = ("appearance", "colour_change", "motion", "frame_count", "first_frame",
                  "last_frame")
TEMPLATES = {
    "appearance": ("Which digit appeared in {colour}?", "Which {colour} digit came into view?"),
    "colour_change": ("What colour did the {digit} become?",
                      "Which colour does the {digit} turn?"),
    "motion": ("Which way did the {digit} move?", "In which direction does the {digit} move?"),
    "frame_count": ("How many frames show a {digit}?", "In how many frames is there a {digit}?"),
    "first_frame": ("Which digit is {colour} in the first frame?",
                    "In the first frame, which digit is {colour}?"),
    "last_frame": ("What colour is the {digit} in the last frame?",
                   "In the last frame, what colour is the {digit}?"),
}
DESCRIBE = ("List the digits in the first frame.", "List the digits in the last frame.")
# Seeds [_SALT, split seed, index]: streams apart from glyph_vqa's and tile_vqa's.
_SALT = 23
_SPLIT_SEEDS = {"train": 1, "describe": 2, "validation": 3, "test": 4}


@dataclasses.dataclass(frozen=True)
class Item:
  """One digit over time: in `cells[t]` with colour `colours[t]` in frame t (EMPTY
  entries: not shown), drawn at (dy, dx) inside its cell."""
  role: str  # "still", "appear", "move", "change" or "flash"
  digit: int
  cells: tuple[tuple[int, int] | None, ...]
  colours: tuple[int, ...]
  offset: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Video:
  """One rendered video.

  Attributes:
    frames: u8[F, 64, 64, 3].
    digits: i32[F, 4, 4], the digit in each cell of each frame, EMPTY where none.
    colours: i32[F, 4, 4], the colour index of each cell's digit, EMPTY where none.
    items: what was drawn, by role.
    direction: where the moving item went, a key of DIRECTIONS.
  """
  frames: np.ndarray
  digits: np.ndarray
  colours: np.ndarray
  items: tuple[Item, ...]
  direction: str


def _colours(rng: np.random.Generator, n_still: int, flash: bool) -> list[int]:
  """Colours of still, appearing (2), moving, changing and flashing items, in that order:
  the appearing and flashing ones differ, so an appearing colour names one item, and a
  colour occurs once in the first frame (still, moving and changing items)."""
  n = len(glyphs.COLOURS)
  while True:
    colours = [int(c) for c in rng.integers(0, n, n_still + 5)]
    first = colours[:n_still] + colours[n_still + 2:n_still + 4]
    late = colours[n_still:n_still + 2] + ([colours[-1]] if flash else [])
    if len(set(late)) == len(late) and 1 in np.bincount(first, minlength=n):
      return colours


def make_video(rng: np.random.Generator) -> Video:
  """A video in which every question type has a well-posed question (see `questions`)."""
  f = int(rng.choice(FRAME_COUNTS))
  n_still = int(rng.integers(1, 4))
  flash_frames = int(rng.integers(0, MAX_FLASH + 1))
  colours = _colours(rng, n_still, flash_frames > 0)
  roles = ["still"] * n_still + ["appear", "appear", "move", "change"]
  roles += ["flash"] if flash_frames else []
  digits = [int(d) for d in rng.permutation(10)[:len(roles)]]
  # The mover's two cells first (the second next to the first), then one for each other.
  direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
  dy, dx = DIRECTIONS[direction]
  starts = [(r, c) for r in range(GRID) for c in range(GRID)
            if 0 <= r + dy < GRID and 0 <= c + dx < GRID]
  start = starts[int(rng.integers(len(starts)))]
  end = (start[0] + dy, start[1] + dx)
  free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in (start, end)]
  others = [free[int(k)] for k in rng.choice(len(free), len(roles) - 1, replace=False)]
  items = []
  for role, digit, colour in zip(roles, digits, colours):
    t = int(rng.integers(1, f))  # the frame its event happens at
    offset = (int(rng.integers(0, CELL - glyphs.GLYPH_H + 1)),
              int(rng.integers(0, CELL - glyphs.GLYPH_W + 1)))
    shown = [True] * f
    cell = start if role == "move" else others.pop()
    cells, hues = [cell] * f, [colour] * f
    if role == "appear":
      shown = [i >= t for i in range(f)]
    elif role == "move":
      cells = [start if i < t else end for i in range(f)]
    elif role == "change":
      later = int(rng.choice([c for c in range(len(glyphs.COLOURS)) if c != colour]))
      hues = [colour if i < t else later for i in range(f)]
    elif role == "flash":
      first = int(rng.integers(1, f - flash_frames + 1))
      shown = [first <= i < first + flash_frames for i in range(f)]
    items.append(Item(role, digit, tuple(c if s else None for c, s in zip(cells, shown)),
                      tuple(h if s else EMPTY for h, s in zip(hues, shown)), offset))
  return _render(rng, items, direction)


def _render(rng: np.random.Generator, items: list[Item], direction: str) -> Video:
  f = len(items[0].cells)
  still = glyphs.background(rng, FRAME, FRAME)
  # One brightness per item and colour, so that a still item looks still.
  rgb = {(k, c): glyphs.glyph_rgb(rng, c) for k, item in enumerate(items)
         for c in sorted(set(item.colours) - {EMPTY})}
  frames = np.repeat(still[None], f, axis=0)
  digits = np.full((f, GRID, GRID), EMPTY, np.int32)
  colours = np.full((f, GRID, GRID), EMPTY, np.int32)
  for k, item in enumerate(items):
    for t, (cell, colour) in enumerate(zip(item.cells, item.colours)):
      if cell is None:
        continue
      digits[t][cell], colours[t][cell] = item.digit, colour
      glyphs.draw_glyph(frames[t], cell[0] * CELL + item.offset[0],
                        cell[1] * CELL + item.offset[1], item.digit, rgb[k, colour])
  return Video(frames, digits, colours, tuple(items), direction)


def questions(video: Video, rng: np.random.Generator) -> dict[str, glyphs.Question]:
  """One question of each type about `video`, each with a single right answer."""
  by_role = {}
  for item in video.items:
    by_role.setdefault(item.role, []).append(item)
  name = glyphs.COLOUR_NAMES
  out = {}
  item = by_role["appear"][int(rng.integers(2))]
  out["appearance"] = glyphs.ask(rng, "appearance", str(item.digit), TEMPLATES,
                                 colour=name[item.colours[-1]])
  item = by_role["change"][0]
  out["colour_change"] = glyphs.ask(rng, "colour_change", name[item.colours[-1]], TEMPLATES,
                                    digit=item.digit)
  item = by_role["move"][0]
  out["motion"] = glyphs.ask(rng, "motion", video.direction, TEMPLATES, digit=item.digit)
  if "flash" in by_role:
    item = by_role["flash"][0]
    digit, count = item.digit, sum(c is not None for c in item.cells)
  else:
    digit = int(rng.choice(sorted(set(range(10)) - {i.digit for i in video.items})))
    count = 0
  out["frame_count"] = glyphs.ask(rng, "frame_count", str(count), TEMPLATES, digit=digit)
  first = [i for i in video.items if i.cells[0] is not None]
  hues = [i.colours[0] for i in first]
  item = first[int(rng.choice([k for k, c in enumerate(hues) if hues.count(c) == 1]))]
  out["first_frame"] = glyphs.ask(rng, "first_frame", str(item.digit), TEMPLATES,
                                  colour=name[item.colours[0]])
  last = [i for i in video.items if i.cells[-1] is not None]
  item = last[int(rng.integers(len(last)))]
  out["last_frame"] = glyphs.ask(rng, "last_frame", name[item.colours[-1]], TEMPLATES,
                                 digit=item.digit)
  return out


def describe(digits: np.ndarray, colours: np.ndarray) -> str:
  """A frame's digits (i32[4, 4] labels) in reading order, e.g. "red 7, blue 3"."""
  cells = np.argwhere(digits != EMPTY)
  return ", ".join(f"{glyphs.COLOUR_NAMES[colours[r, c]]} {digits[r, c]}" for r, c in cells)


def example(split: str, index: int) -> dict:
  """The stored example `index` of `split` (deterministic)."""
  rng = np.random.default_rng([_SALT, _SPLIT_SEEDS[split], index])
  video = make_video(rng)
  asked = questions(video, rng)
  if split == "train":
    turns = [asked[k] for k in rng.permutation(QUESTION_TYPES)]
  elif split == "describe":
    turns = [glyphs.Question("describe", q, describe(video.digits[t], video.colours[t]))
             for q, t in zip(DESCRIBE, (0, -1))]
  else:
    turns = [asked[QUESTION_TYPES[index % len(QUESTION_TYPES)]]]
  return {"id": f"{split}-{index}", "frames": video.frames,
          "conversations": generated.conversation([(q.text, q.answer) for q in turns]),
          "question_types": [q.kind for q in turns], "cell_digits": video.digits,
          "cell_colours": video.colours}


class VideoVqa(generated.Splits, tfds.core.GeneratorBasedBuilder):
  """Short videos of coloured digits that appear, move, change colour and flash."""

  example = staticmethod(example)

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      generated.SizesConfig(
          name="default", description="Training data for a small LLaVA-OneVision-style model.",
          sizes={"train": 60_000, "describe": 20_000, "validation": 1_200, "test": 4_800}),
      generated.SizesConfig(
          name="small", description="For tests and quick looks.",
          sizes={"train": 192, "describe": 48, "validation": 60, "test": 120}),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    labels = tfds.features.Tensor(shape=(None, GRID, GRID), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "frames": tfds.features.Tensor(shape=(None, FRAME, FRAME, 3), dtype=np.uint8,
                                           encoding="zlib"),
            "conversations": tfds.features.Sequence({
                "from": tfds.features.Text(), "value": tfds.features.Text()}),
            "question_types": tfds.features.Sequence(tfds.features.Text()),
            "cell_digits": labels,
            "cell_colours": labels,
        }),
        metadata=tfds.core.MetadataDict(frame_size=FRAME, frame_counts=list(FRAME_COUNTS),
                                        colours=list(glyphs.COLOUR_NAMES)),
    )


def source(dataset: str, split: str, data_dir: str | None):
  """`dataset` ("video_vqa/CONFIG") read from `data_dir`, or generated when it is None."""
  return generated.open_source(VideoVqa, NAME, example, dataset, split, data_dir)


def build(data_dir: str, config: str = "default") -> str:
  """Builds (or finds already built) the data set; returns its TFDS name."""
  return generated.build(VideoVqa, NAME, data_dir, config)


if __name__ == "__main__":
  generated.main(sys.argv[1:], __doc__, build)
