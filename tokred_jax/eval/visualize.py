"""Pictures of which image patches survive each stage of a token reduction."""

from __future__ import annotations

import matplotlib
# A Figure made directly draws to files with no GUI backend (TPU VMs, CI) and leaves the
# pyplot backend of the caller (a notebook's inline plots) alone.
from matplotlib.figure import Figure
import numpy as np


def patch_masks(sources: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Which patches each stage keeps, for one sample.

  sources: i32[P], the visual token each patch went into (-1: dropped before the LLM);
  live: bool[L, N_v], the visual tokens each LLM layer processed.
  Returns (into_llm bool[P], per_layer bool[L, P]).
  """
  into_llm = sources >= 0
  per_layer = live[:, np.maximum(sources, 0)] & into_llm[None]
  return into_llm, per_layer


def merge_groups(sources: np.ndarray) -> np.ndarray:
  """i32[P]: a group id per patch, equal for patches merged into one token."""
  return np.unique(sources, return_inverse=True)[1].reshape(-1)


def survival_figure(image: np.ndarray, sources: np.ndarray, live: np.ndarray, path: str,
                    title: str = "", max_panels: int = 6) -> list[str]:
  """Draws the image, the tokens entering the LLM (merged patches share a colour), and
  the LLM layers where the kept count changes; dropped patches are greyed out.

  image: u8/f32[H, W, 3] as the model saw it; sources, live as in `patch_masks`.
  Returns the panel titles (one per panel), and writes a PNG to `path`.
  """
  image = np.asarray(image, np.float32)
  if image.max() > 1.0:
    image = image / 255.0
  grid = int(round(len(sources) ** 0.5))
  into_llm, per_layer = patch_masks(np.asarray(sources), np.asarray(live))
  counts = per_layer.sum(axis=1)
  layers = [0] + [l for l in range(1, len(counts)) if counts[l] != counts[l - 1]]
  layers = layers[:max_panels - 2]
  panels = [("input", None, None), (f"into the LLM: {int(np.unique(sources[into_llm]).size)} "
                                    "tokens", into_llm, merge_groups(sources))]
  panels += [(f"LLM layer {l}: {int(np.unique(sources[per_layer[l]]).size)} tokens",
              per_layer[l], None) for l in layers]
  fig = Figure(figsize=(2.6 * len(panels), 2.9))
  axes = fig.subplots(1, len(panels))
  up = lambda m: np.kron(m.reshape(grid, grid), np.ones(
      (image.shape[0] // grid, image.shape[1] // grid)))
  for ax, (name, kept, groups) in zip(np.atleast_1d(axes), panels):
    shown = image.copy()
    if kept is not None:
      keep = up(kept.astype(np.float32))[..., None]
      shown = shown * keep + (1 - keep) * (0.25 + 0.15 * shown.mean(-1, keepdims=True))
    if groups is not None and len(np.unique(groups)) < len(groups):
      tint = matplotlib.colormaps["tab20"](up(groups.astype(np.float32)) % 20)[..., :3]
      shown = np.where(keep > 0, 0.65 * shown + 0.35 * tint, shown)
    ax.imshow(np.clip(shown, 0, 1))
    ax.set_title(name, fontsize=8)
    ax.set_axis_off()
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return [name for name, _, _ in panels]
