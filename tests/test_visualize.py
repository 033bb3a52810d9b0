"""Survival pictures: the masks are right, and a PNG is written."""

import importlib

import matplotlib
import numpy as np
from PIL import Image

from tokred_jax.eval import visualize


def test_patch_masks_follow_sources_and_live_slots():
  sources = np.array([0, 0, 1, -1, 2, 3, 3, 1, 2])  # 3x3 patches, 4 tokens, one dropped
  live = np.array([[True, True, True, True], [True, False, True, False]])
  into_llm, per_layer = visualize.patch_masks(sources, live)
  np.testing.assert_array_equal(into_llm, sources >= 0)
  np.testing.assert_array_equal(per_layer[1], [1, 1, 0, 0, 1, 0, 0, 0, 1])
  groups = visualize.merge_groups(sources)
  assert groups[0] == groups[1] and groups[2] == groups[7] and groups[0] != groups[2]


def test_survival_figure_writes_a_png(tmp_path):
  image = np.full((42, 42, 3), 200, np.uint8)
  sources = np.arange(9)
  live = np.ones((4, 9), bool)
  live[2:, 4:] = False
  path = str(tmp_path / "kept.png")
  titles = visualize.survival_figure(image, sources, live, path, "test")
  assert titles == ["input", "into the LLM: 9 tokens", "LLM layer 0: 9 tokens",
                    "LLM layer 2: 4 tokens"]
  with Image.open(path) as png:
    assert png.size[0] > png.size[1] > 100


def test_drawing_leaves_the_callers_pyplot_backend_alone(tmp_path):
  before = matplotlib.get_backend()
  matplotlib.use("svg")  # stands in for a notebook's inline backend
  try:
    importlib.reload(visualize)
    visualize.survival_figure(np.zeros((8, 8, 3)), np.arange(4), np.ones((2, 4), bool),
                              str(tmp_path / "k.png"))
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)
