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

import dataclasses
import sys

import numpy as np
import tensorflow_datasets as tfds

from tokred_jax.data import glyphs
from tokred_jax.data.builder import conversation_features

NAME = "glyph_vqa"
# One seed stream per split keeps splits disjoint and each independent of the others' size.
_SPLIT_SEEDS = {"train": 1, "describe": 2, "validation": 3, "test": 4}


@dataclasses.dataclass(eq=False)
class GlyphVqaConfig(tfds.core.BuilderConfig):
  """Split sizes (examples per split)."""
  sizes: dict[str, int] = dataclasses.field(default_factory=dict)


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
  conversations = []
  for turn, (question, answer) in enumerate(pairs):
    conversations += [{"from": "human", "value": f"<image>\n{question}" if turn == 0
                       else question}, {"from": "gpt", "value": answer}]
  return {"id": f"{split}-{index}", "image": scene.image, "conversations": conversations,
          "question_types": types, "cell_digits": scene.digits,
          "cell_colours": scene.colours}


class GlyphVqa(tfds.core.GeneratorBasedBuilder):
  """Coloured digits on a grid with reading/attribute/existence/counting questions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      GlyphVqaConfig(name="default", description="The default model's training data.",
                     sizes={"train": 60_000, "describe": 20_000, "validation": 1_000,
                            "test": 4_000}),
      GlyphVqaConfig(name="small", description="For tests and quick looks.",
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

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Generated, nothing to download.
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.sizes.items()}

  def _generate_examples(self, split: str, n: int):
    for index in range(n):
      yield index, example(split, index)


class GeneratedSource:
  """Random access to a split's examples as `tfds.data_source` returns them (text as
  bytes), generated on the fly; a grain data source."""

  def __init__(self, config: str, split: str):
    sizes = {c.name: c.sizes for c in GlyphVqa.BUILDER_CONFIGS}
    if config not in sizes or split not in sizes[config]:
      raise ValueError(f"glyph_vqa has no {config!r} config with a {split!r} split; "
                       f"configs and splits: {sizes}.")
    self.split, self.size = split, sizes[config][split]

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} is outside the {self.size} examples of {self.split!r}")
    ex = example(self.split, int(index))
    turns = ex["conversations"]
    return dict(ex, id=ex["id"].encode(),
                conversations={"from": [t["from"].encode() for t in turns],
                               "value": [t["value"].encode() for t in turns]},
                question_types=[t.encode() for t in ex["question_types"]])


def source(dataset: str, split: str, data_dir: str | None):
  """`dataset` ("glyph_vqa/CONFIG") read from `data_dir`, or generated when it is None."""
  config = dataset.partition("/")[2] or "default"
  if data_dir is None:
    return GeneratedSource(config, split)
  return tfds.data_source(f"{NAME}/{config}", split=split, data_dir=data_dir)


def build(data_dir: str, config: str = "default") -> str:
  """Builds (or finds already built) the data set; returns its TFDS name."""
  builder = GlyphVqa(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return f"{NAME}/{config}"


def main(argv: list[str]):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write")
  parser.add_argument("--config", default="default", choices=("default", "small"))
  args = parser.parse_args(argv)
  print(build(args.data_dir, args.config))


if __name__ == "__main__":
  main(sys.argv[1:])
