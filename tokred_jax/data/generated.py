"""The project's own data sets, generated from (split, index): glyph_vqa, tile_vqa, video_vqa.

Each is a TFDS builder (array_record, no TensorFlow) whose examples are a pure function
of their split and index, so the same examples can also be generated on the fly, with
no build, by `source(dataset, split, None)`. What they share lives here: the registry,
the on-the-fly source, the conversation turns, and the build command line

  python -m tokred_jax.data.NAME --data_dir=DIR [--config=small]

Modules are imported when first asked for, so that `python -m tokred_jax.data.NAME`
(which imports this package first) does not register its builder twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable, Sequence
from types import ModuleType

import tensorflow_datasets as tfds

NAMES = ("glyph_vqa", "tile_vqa", "video_vqa")
# The feature holding each one's pixels: an image u8[H, W, 3] or frames u8[F, H, W, 3].
PIXELS = {"glyph_vqa": "image", "tile_vqa": "image", "video_vqa": "frames"}


@dataclasses.dataclass(eq=False)
class SizesConfig(tfds.core.BuilderConfig):
  """A config of one of these data sets: its split sizes (examples per split)."""
  sizes: dict[str, int] = dataclasses.field(default_factory=dict)


class Splits:
  """The split generation of a generated data set's builder (a mixin before
  `tfds.core.GeneratorBasedBuilder`): its config's sizes of `example(split, index)`."""

  @staticmethod
  def example(split: str, index: int) -> dict:
    raise NotImplementedError

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Generated, nothing to download.
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.sizes.items()}

  def _generate_examples(self, split: str, n: int):
    for index in range(n):
      yield index, self.example(split, index)


def name_of(dataset: str) -> str:
  """"tile_vqa/small:1.0.0" -> "tile_vqa"."""
  return dataset.partition("/")[0].partition(":")[0]


def is_generated(dataset: str) -> bool:
  """Whether `dataset` (a TFDS name, NAME[/CONFIG]) is one of the project's own."""
  return name_of(dataset) in NAMES


def module(dataset: str) -> ModuleType:
  """The module of one of the project's own data sets (it defines `source` and `build`)."""
  if not is_generated(dataset):
    raise ValueError(f"{dataset} is not generated; the project's own data sets are {NAMES}.")
  return importlib.import_module(f"tokred_jax.data.{name_of(dataset)}")


def source(dataset: str, split: str, data_dir: str | None):
  """`dataset` ("NAME/CONFIG") read from `data_dir`, or generated when it is None."""
  return module(dataset).source(dataset, split, data_dir)


def conversation(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
  """LLaVA's {"from", "value"} turns of (question, answer) pairs, "<image>\\n" before the
  first question (a video's frames stand where it stands too)."""
  turns = []
  for turn, (question, answer) in enumerate(pairs):
    turns += [{"from": "human", "value": f"<image>\n{question}" if turn == 0 else question},
              {"from": "gpt", "value": answer}]
  return turns


def corpus(dataset: str, count: int = 400) -> list[str]:
  """Every turn of the first `count` train and describe examples of `dataset` (generated),
  and a chat prompt around some: the sentences a tokenizer for a model made for the data
  set trains on (`processing.train_tokenizer`)."""
  lines = []
  for split in ("train", "describe"):
    src = source(dataset, split, None)
    for index in range(min(count, len(src))):
      lines += [t.decode().replace("<image>\n", "") for t in src[index]["conversations"]["value"]]
  return lines + [f"USER: <image>\n{line} ASSISTANT: yes" for line in lines[:50]]


class GeneratedSource:
  """Random access to a split's examples as `tfds.data_source` returns them (text as
  bytes), generated on the fly by `example(split, index)`; a grain data source."""

  def __init__(self, name: str, configs: Sequence[tfds.core.BuilderConfig], config: str,
               split: str, example: Callable[[str, int], dict]):
    sizes = {c.name: c.sizes for c in configs}
    if config not in sizes or split not in sizes[config]:
      raise ValueError(f"{name} has no {config!r} config with a {split!r} split; "
                       f"configs and splits: {sizes}.")
    self.split, self.size, self._example = split, sizes[config][split], example

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} is outside the {self.size} examples of {self.split!r}")
    ex = self._example(self.split, int(index))
    turns = ex["conversations"]
    return dict(ex, id=ex["id"].encode(),
                conversations={"from": [t["from"].encode() for t in turns],
                               "value": [t["value"].encode() for t in turns]},
                question_types=[t.encode() for t in ex["question_types"]])


def open_source(builder: type[tfds.core.GeneratorBasedBuilder], name: str,
                example: Callable[[str, int], dict], dataset: str, split: str,
                data_dir: str | None):
  """A module's `source`: its split built in `data_dir`, or generated when that is None."""
  config = dataset.partition("/")[2] or "default"
  if data_dir is None:
    return GeneratedSource(name, builder.BUILDER_CONFIGS, config, split, example)
  return tfds.data_source(f"{name}/{config}", split=split, data_dir=data_dir)


def build(builder: type[tfds.core.GeneratorBasedBuilder], name: str, data_dir: str,
          config: str = "default") -> str:
  """Builds (or finds already built) the data set; returns its TFDS name."""
  builder(config=config, data_dir=data_dir, file_format="array_record").download_and_prepare()
  return f"{name}/{config}"


def main(argv: list[str], doc: str, build_fn: Callable[[str, str], str]):
  """The build command line of a module whose docstring is `doc`."""
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write")
  parser.add_argument("--config", default="default", choices=("default", "small"))
  args = parser.parse_args(argv)
  print(build_fn(args.data_dir, args.config))
