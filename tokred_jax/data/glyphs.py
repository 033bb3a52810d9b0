"""Glyph scenes: coloured digits on a grid, and questions that need one of them.

Each scene is a 96 x 96 image cut into a 6 x 6 grid of 16-pixel cells; 4 to 8 cells hold
a digit (a 5 x 7 bitmap drawn at 2x, 10 x 14 pixels, jittered inside its cell) in one of
six colours, on a dark, slightly noisy background. A CLIP-style tower with 8-pixel patches
sees 144 patches, so an item covers a 2 x 2 block of them: most patches are background,
and the question decides which few matter. The question types mirror the field's
benchmarks:

  | type      | example                              | answer   | like    |
  |-----------|--------------------------------------|----------|---------|
  | reading   | "Which digit is red?"                | "7"      | TextVQA |
  | attribute | "What colour is the 3?"              | "blue"   | GQA     |
  | existence | "Is there a green 5?"                | "yes"/no | POPE    |
  | counting  | "How many yellow digits are there?"  | "0".."4" | counts  |

Scenes are built so that each question has one right answer (the colour asked about in a
reading question, the digit in an attribute question, appear exactly once), "no" answers
are near misses (the digit is there in another colour, or the colour on another digit, as
in POPE's adversarial split), and counting answers are uniform over 0..4.

Everything is a pure function of an integer seed (numpy's PCG64), so a split is the same
on every machine. The drawing pieces (`glyph_mask`, `background`, `glyph_rgb`,
`draw_glyph`, `ask`) are shared with the tile_vqa and video_vqa scenes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_SIZE = 96
GRID = 6
CELL = IMAGE_SIZE // GRID  # 16 px: 2 x 2 patches of 8 px.
SCALE = 2  # glyph pixels per font pixel
COLOURS = {"red": (225, 45, 45), "green": (45, 190, 70), "blue": (60, 100, 240),
           "yellow": (235, 215, 50), "magenta": (210, 70, 210), "cyan": (50, 205, 215)}
COLOUR_NAMES = tuple(COLOURS)
QUESTION_TYPES = ("reading", "attribute", "existence", "counting")
MAX_COUNT = 4
EMPTY = -1  # cell label of an empty cell

# 5 x 7 bitmaps of the digits, one string per row.
_FONT = {
    0: ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    1: ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    2: ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    3: ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    4: ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    5: ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    6: ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    7: ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    8: ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    9: ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
FONT_H, FONT_W = 7, 5


def glyph_mask(digit: int, scale: int = SCALE) -> np.ndarray:
  """bool[7 * scale, 5 * scale]: the digit's font pixels, each drawn as scale x scale."""
  bitmap = np.array([[c == "1" for c in row] for row in _FONT[digit]])
  return np.kron(bitmap, np.ones((scale, scale), bool))


GLYPHS = {d: glyph_mask(d) for d in _FONT}
GLYPH_H, GLYPH_W = GLYPHS[0].shape  # 14, 10

TEMPLATES = {
    "reading": ("Which digit is {colour}?", "What is the {colour} digit?"),
    "attribute": ("What colour is the {digit}?", "Which colour is the digit {digit}?"),
    "existence": ("Is there a {colour} {digit}?", "Can you see a {colour} {digit}?"),
    "counting": ("How many {colour} digits are there?", "Count the {colour} digits."),
}
DESCRIBE = "List the digits from top to bottom."


@dataclasses.dataclass(frozen=True)
class Scene:
  """One rendered scene.

  Attributes:
    image: u8[96, 96, 3].
    digits: i32[6, 6], the digit in each cell, EMPTY where none.
    colours: i32[6, 6], the index into COLOUR_NAMES of each cell's digit, EMPTY where none.
  """
  image: np.ndarray
  digits: np.ndarray
  colours: np.ndarray

  @property
  def items(self) -> list[tuple[int, int, int, int]]:
    """(row, col, digit, colour) of each item, row-major."""
    rows, cols = np.nonzero(self.digits != EMPTY)
    return [(int(r), int(c), int(self.digits[r, c]), int(self.colours[r, c]))
            for r, c in zip(rows, cols)]


@dataclasses.dataclass(frozen=True)
class Question:
  kind: str  # one of QUESTION_TYPES
  text: str
  answer: str


def make_scene(rng: np.random.Generator) -> Scene:
  """A scene in which every question type has a well-posed question (see `questions`)."""
  count = int(rng.integers(0, MAX_COUNT + 1))
  counted = int(rng.integers(len(COLOURS)))
  others = [c for c in range(len(COLOURS)) if c != counted]
  while True:
    n = int(rng.integers(max(4, count + 2), 9))
    colours = [counted] * count + list(rng.choice(others, n - count))
    digits = list(rng.integers(0, 10, n))
    # Reading and attribute questions need a colour and a digit that occur once.
    if (min(colours.count(c) for c in colours) == 1
        and min(digits.count(d) for d in digits) == 1):
      break
  order = rng.permutation(n)
  cells = rng.choice(GRID * GRID, n, replace=False)
  digit_grid = np.full((GRID, GRID), EMPTY, np.int32)
  colour_grid = np.full((GRID, GRID), EMPTY, np.int32)
  image = background(rng)
  for cell, k in zip(cells, order):
    r, c = divmod(int(cell), GRID)
    digit_grid[r, c], colour_grid[r, c] = digits[k], colours[k]
    _draw(image, rng, r, c, digits[k], colours[k])
  return Scene(image, digit_grid, colour_grid)


def background(rng: np.random.Generator, height: int = IMAGE_SIZE,
               width: int = IMAGE_SIZE) -> np.ndarray:
  """u8[height, width, 3]: a dark grey with a little noise."""
  base = rng.integers(25, 60)
  noise = rng.integers(-6, 7, (height, width, 1))
  return np.clip(base + noise, 0, 255).repeat(3, axis=2).astype(np.uint8)


def glyph_rgb(rng: np.random.Generator, colour: int) -> np.ndarray:
  """u8[3]: the colour (an index into COLOUR_NAMES) with its brightness jittered."""
  rgb = np.clip(np.array(COLOURS[COLOUR_NAMES[colour]]) * rng.uniform(0.85, 1.1), 0, 255)
  return rgb.astype(np.uint8)


def draw_glyph(image: np.ndarray, y: int, x: int, digit: int, rgb: np.ndarray,
               scale: int = SCALE):
  """Paints the digit's font pixels in `rgb`, its top left corner at pixel (y, x)."""
  mask = GLYPHS[digit] if scale == SCALE else glyph_mask(digit, scale)
  image[y:y + mask.shape[0], x:x + mask.shape[1]][mask] = rgb


def _draw(image: np.ndarray, rng: np.random.Generator, row: int, col: int, digit: int,
          colour: int):
  """Draws `digit` in `colour` (brightness jittered) at a random offset inside the cell."""
  y = row * CELL + int(rng.integers(0, CELL - GLYPH_H + 1))
  x = col * CELL + int(rng.integers(0, CELL - GLYPH_W + 1))
  draw_glyph(image, y, x, digit, glyph_rgb(rng, colour))


def existence(rng: np.random.Generator, pairs: list[tuple[int, int]]) -> tuple[int, int, str]:
  """An existence question's (digit, colour, answer) about a scene of (digit, colour)
  `pairs`: one of them half the time ("yes"), else a near miss ("no") that keeps the
  digit or the colour of one and changes the other until no pair matches."""
  present = set(pairs)
  digit, colour = pairs[int(rng.integers(len(pairs)))]
  if rng.random() < 0.5:
    return digit, colour, "yes"
  while (digit, colour) in present:
    if rng.random() < 0.5:
      colour = int(rng.integers(len(COLOURS)))
    else:
      digit = int(rng.integers(10))
  return digit, colour, "no"


def questions(scene: Scene, rng: np.random.Generator) -> dict[str, Question]:
  """One question of each type about `scene`, each with a single right answer."""
  items = scene.items
  colours = [colour for _, _, _, colour in items]
  digits = [digit for _, _, digit, _ in items]
  out = {}

  unique = [i for i, (_, _, _, colour) in enumerate(items) if colours.count(colour) == 1]
  _, _, digit, colour = items[int(rng.choice(unique))]
  out["reading"] = ask(rng, "reading", str(digit), colour=COLOUR_NAMES[colour])

  unique = [i for i, (_, _, digit, _) in enumerate(items) if digits.count(digit) == 1]
  _, _, digit, colour = items[int(rng.choice(unique))]
  out["attribute"] = ask(rng, "attribute", COLOUR_NAMES[colour], digit=digit)

  digit, colour, answer = existence(rng, [(digit, colour) for _, _, digit, colour in items])
  out["existence"] = ask(rng, "existence", answer, colour=COLOUR_NAMES[colour], digit=digit)

  # Pick the answer first, uniformly over the counts this scene has (the scene was built
  # with one colour at a uniform count), so that no count dominates; then a colour.
  counts = np.minimum(np.bincount(colours, minlength=len(COLOURS)), MAX_COUNT)
  count = int(rng.choice(np.unique(counts)))
  colour = int(rng.choice(np.flatnonzero(counts == count)))
  out["counting"] = ask(rng, "counting", str(count), colour=COLOUR_NAMES[colour])
  return out


def ask(rng: np.random.Generator, kind: str, answer: str,
        templates: dict[str, tuple[str, ...]] = TEMPLATES, **slots) -> Question:
  """A question of `kind` in one of its templates, picked at random, with its slots filled."""
  template = templates[kind][int(rng.integers(len(templates[kind])))]
  return Question(kind, template.format(**slots), answer)


def describe(scene: Scene) -> str:
  """The items in reading order, e.g. "red 7, blue 3, cyan 0"."""
  return ", ".join(f"{COLOUR_NAMES[colour]} {digit}" for _, _, digit, colour in scene.items)


def corpus(num_scenes: int = 400, seed: int = 12345) -> list[str]:
  """Sentences covering every question, answer and description word (tokenizer training)."""
  rng = np.random.default_rng(seed)
  lines = [DESCRIBE]
  for kind, templates in TEMPLATES.items():
    for template in templates:
      for colour in COLOUR_NAMES:
        for digit in range(10):
          lines.append(template.format(colour=colour, digit=digit))
  for _ in range(num_scenes):
    lines.append(describe(make_scene(rng)))
  lines += [f"USER: <image>\n{line} ASSISTANT: yes" for line in lines[:50]]
  lines += ["yes", "no"] + [str(d) for d in range(10)] + list(COLOUR_NAMES)
  return lines
