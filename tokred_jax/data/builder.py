"""A TFDS builder for LLaVA conversation JSON files with local images, without TensorFlow.

The input is the llava_v1_5_mix665k format: a JSON list of
`{"id": str, "image": path relative to an image root, "conversations": [...]}`.
`build_dataset` writes it as a TFDS data set in the array_record format, one split per
JSON file, with these features per example:

  id:            the sample's id (text).
  image:         u8[S, S, 3], the image decoded and resized to the model's image size S
                 as `processing.preprocess_images` does (CLIP: short side to S, centre
                 crop; SigLIP: squash), ready to normalise.
  conversations: the turns as in the JSON, a sequence of {"from": text, "value": text}.

Images are stored decoded because then reading decodes nothing, each record has one
fixed shape, the costly decode and resize run once instead of every epoch, and the
pixels are bit-identical to those inference computes. (TFDS's Image feature also works
without TensorFlow when given file bytes, decoding with PIL on read, but then every read
decodes and resizes again.) The price is disk: S*S*3 bytes a sample before array_record's
default compression (340 KB at 336 px, 38 KB at 112 px).

Checks made here, on data that needs no model to judge (see `tokred_jax.data.skips`):
missing image file, unreadable image, text-only sample (no image), malformed
conversation, no assistant turn. With `on_bad_sample="skip"` the bad samples are left
out, each logged with its id, and the tally is logged and saved in the data set's
metadata.json under "skipped"; with "error" the first one stops the build.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tokred_jax.data.conversation import parse_turns
from tokred_jax.data.skips import (MALFORMED, MISSING_IMAGE, NO_IMAGE, UNREADABLE_IMAGE,
                                   BadSample, SkipLog, check_mode)
from tokred_jax.io import processing
from tokred_jax.models.config import VisionConfig

DATASET = "llava_conversations"
# Images decoded at once by the build threads; bounds the memory of decoded pixels.
_CHUNK = 256


@dataclasses.dataclass(eq=False)
class ConversationsConfig(tfds.core.BuilderConfig):
  """One data set of LLaVA conversations.

  Attributes:
    splits: split name -> JSON file in the llava_v1_5_mix665k format.
    image_root: the directory the samples' "image" paths are relative to.
    vision: the vision tower the images are resized for (kind and image size).
    on_bad_sample: "skip" leaves bad samples out, "error" stops at the first.
    num_threads: threads decoding and resizing images.
  """
  splits: dict[str, str] = dataclasses.field(default_factory=dict)
  image_root: str = ""
  vision: VisionConfig = VisionConfig()
  on_bad_sample: str = "skip"
  num_threads: int = 8


def conversation_features(image_size: int) -> dict[str, tfds.features.FeatureConnector]:
  """What every data set `make_dataset` reads stores: id, u8[S, S, 3] image, turns."""
  return {"id": tfds.features.Text(),
          "image": tfds.features.Tensor(shape=(image_size, image_size, 3), dtype=np.uint8),
          "conversations": tfds.features.Sequence({
              "from": tfds.features.Text(), "value": tfds.features.Text()})}


class LlavaConversations(tfds.core.GeneratorBasedBuilder):
  """LLaVA conversations with images stored as uint8 pixels (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images as u8[S, S, 3] pixels; turns as in the JSON."}

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size = cfg.vision.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict(conversation_features(size)),
        # Reading checks these against the model; "skipped" is filled in as splits build.
        metadata=tfds.core.MetadataDict(
            vision_kind=cfg.vision.kind, image_size=size, image_root=cfg.image_root,
            json_files=dict(cfg.splits), skipped={}),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The inputs are local files.
    return {split: self._generate_examples(split, path)
            for split, path in self.builder_config.splits.items()}

  def _generate_examples(self, split: str, json_path: str):
    cfg = self.builder_config
    samples = _read_json(json_path)
    skips = SkipLog(f"building split {split!r} from {json_path}", cfg.on_bad_sample)
    with concurrent.futures.ThreadPoolExecutor(cfg.num_threads) as pool:
      for start in range(0, len(samples), _CHUNK):
        indices = range(start, min(start + _CHUNK, len(samples)))
        chunk = samples[start:start + _CHUNK]
        for index, example in zip(indices, pool.map(self._example, indices, chunk)):
          if skips.record(example if isinstance(example, BadSample) else None):
            # The index is the key, as TFDS needs unique keys and ids need not be.
            yield index, example
    skips.log_summary()
    self.info.metadata["skipped"][split] = skips.as_dict()

  def _example(self, index: int, sample: Any) -> dict[str, Any] | BadSample:
    """The stored example for one JSON entry, or what is wrong with it."""
    cfg = self.builder_config
    if not isinstance(sample, dict):
      return BadSample(f"#{index}", MALFORMED, f"entry {index} is not a JSON object")
    sample_id = str(sample.get("id", f"#{index}"))
    try:
      parse_turns(sample_id, sample.get("conversations"))
    except BadSample as bad:
      return bad
    if not isinstance(sample.get("image"), str):
      return BadSample(sample_id, NO_IMAGE, "it has no 'image' path (text-only samples "
                       "are not supported: every sequence holds one image)")
    path = os.path.join(cfg.image_root, sample["image"])
    if not os.path.isfile(path):
      return BadSample(sample_id, MISSING_IMAGE, f"no file {path}")
    try:
      # pylint: disable-next=protected-access
      pixels = processing.load_image(path, cfg.vision)
    except ValueError as e:
      return BadSample(sample_id, UNREADABLE_IMAGE, str(e))
    return {"id": sample_id, "image": pixels, "conversations": [
        {"from": turn["from"], "value": turn["value"]} for turn in sample["conversations"]]}


def _read_json(path: str) -> list[Any]:
  try:
    with open(path, encoding="utf-8") as f:
      samples = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read conversations from {path}: {e}") from e
  if not isinstance(samples, list):
    raise ValueError(f"{path} holds a JSON {type(samples).__name__}; expected a list of "
                     "samples as in llava_v1_5_mix665k.json.")
  return samples


def build_dataset(name: str, splits: dict[str, str], image_root: str, data_dir: str,
                  vision_cfg: VisionConfig, on_bad_sample: str = "skip",
                  num_threads: int = 8) -> str:
  """Writes LLaVA conversation JSON files as a TFDS data set in array_record files.

  Args:
    name: the data set's config name, e.g. "mix665k_336" (letters, digits, _ and -).
    splits: split name -> JSON file, e.g. {"train": ".../llava_v1_5_mix665k.json"}.
    image_root: the directory the samples' "image" paths are relative to.
    data_dir: the TFDS data directory to write into.
    vision_cfg: the vision tower the images are resized for.
    on_bad_sample: "skip" leaves bad samples out (logged, tallied in metadata.json);
      "error" raises `BadSample` naming the first one.
    num_threads: threads decoding and resizing images.

  Returns:
    The name to read it by, "llava_conversations/{name}" (`tfds.data_source` or
    `DataConfig.dataset`). A data set already built under that name is kept as it is.
  """
  check_mode(on_bad_sample)
  if not splits:
    raise ValueError("no splits given; pass e.g. {'train': 'llava_v1_5_mix665k.json'}.")
  config = ConversationsConfig(
      name=name, description=f"LLaVA conversations at {vision_cfg.image_size} px",
      splits=dict(splits), image_root=os.fspath(image_root), vision=vision_cfg,
      on_bad_sample=on_bad_sample, num_threads=num_threads)
  builder = LlavaConversations(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return f"{DATASET}/{name}"
