r"""glyph_vqa: the project's own visual QA data set, as a TFDS builder (no TensorFlow).

  python -m tokred_jax.data.glyph_vqa --data_dir=/tmp/tfds            # full size
  python -m tokred_jax.data.glyph_vqa --data_dir=/tmp/tfds --config=small

Scenes and questions come from `tokred_jax.data.glyphs` (coloured digits on a 6 x 6
grid; reading / attribute / existence / counting questions). Every example is a pure
function of (split, index), so the data set is the same wherever it is built. Splits:

  train:      one scene per example, its four questions (one per type, in a random
              order) as a four-turn conversation: instruction tuning.
  describe:   one scene per example, "List the digits ..." -> "red 7, blue 3, ...":
              the alignment stage, which teaches the LLM to read the visual tokens.
  validation, test: one question per example, the types in turn (index % 4), so each
              type is a quarter of the split.

Reading needs no build: `source(config, split)` generates the same examples on the fly
(what `tokred_jax.data.make_dataset` and the evaluation use when `data_dir` is unset),
at about 1 ms an example, which grain's worker processes hide during training.

Features: id, image u8[96, 96, 3], conversations (LLaVA's {"from", "value"} turns, so
`tokred_jax.data.make_dataset` reads it like any LLaVA data set), question_types (one
per question turn), and per-cell labels cell_digits / cell_colours i32[6, 6] (-1: empty)
that pretrain the vision tower (`tokred_jax.proj.glyph_vqa.tower_pretrain`).
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow_datasets as tfds

from tokred_jax.data import generated, glyphs
from tokred_jax.data.builder import conversation_features

NAME = "glyph_vqa"
# One seed stream per split keeps splits disjoint and each independent of the others' size.
_SPLIT_SEEDS = {"train": 1, "describe": 2, "validation": 3, "test": 4}


def example(split: str, index: int) -> dict:
  """The stored example `index` of `split` (deterministic)."""
  rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
  scene = glyphs.make_scene(rng)
  asked = glyphs.questions(scene, rng)
  if split == "train":
    turns = [asked[k] for k in rng.permutation(glyphs.QUESTION_TYPES)]
    pairs = [(q.text, q.answer) for q in turns]
    types = [q.kind for q in turns]
  elif split == "describe":
    pairs, types = [(glyphs.DESCRIBE, glyphs.describe(scene))], ["describe"]
  else:
    q = asked[glyphs.QUESTION_TYPES[index % len(glyphs.QUESTION_TYPES)]]
    pairs, types = [(q.text, q.answer)], [q.kind]
  return {"id": f"{split}-{index}", "image": scene.image,
          "conversations": generated.conversation(pairs),
          "question_types": types, "cell_digits": scene.digits,
          "cell_colours": scene.colours}


class GlyphVqa(generated.Splits, tfds.core.GeneratorBasedBuilder):
  """Coloured digits on a grid with reading/attribute/existence/counting questions."""

  example = staticmethod(example)

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      generated.SizesConfig(
          name="default", description="The default model's training data.",
          sizes={"train": 60_000, "describe": 20_000, "validation": 1_000, "test": 4_000}),
      generated.SizesConfig(
          name="small", description="For tests and quick looks.",
          sizes={"train": 256, "describe": 64, "validation": 64, "test": 128}),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = glyphs.IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            **conversation_features(size),
            "question_types": tfds.features.Sequence(tfds.features.Text()),
            "cell_digits": tfds.features.Tensor(shape=(glyphs.GRID,) * 2, dtype=np.int32),
            "cell_colours": tfds.features.Tensor(shape=(glyphs.GRID,) * 2, dtype=np.int32),
        }),
        # What `tokred_jax.data.make_dataset` checks the model's tower against.
        metadata=tfds.core.MetadataDict(vision_kind="clip", image_size=size,
                                        colours=list(glyphs.COLOUR_NAMES)),
    )


def source(dataset: str, split: str, data_dir: str | None):
  """`dataset` ("glyph_vqa/CONFIG") read from `data_dir`, or generated when it is None."""
  return generated.open_source(GlyphVqa, NAME, example, dataset, split, data_dir)


def build(data_dir: str, config: str = "default") -> str:
  """Builds (or finds already built) the data set; returns its TFDS name."""
  return generated.build(GlyphVqa, NAME, data_dir, config)


if __name__ == "__main__":
  generated.main(sys.argv[1:], __doc__, build)
