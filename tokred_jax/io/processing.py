"""Text and image inputs for LLaVA: tokenizer, chat prompt, pixels, padded batches.

Images are preprocessed as transformers' PIL-based CLIP and SigLIP image processors do
(`CLIPImageProcessorPil`, `SiglipImageProcessorPil`), in NHWC layout. Prompts are
rendered with a chat template (tokred_jax.io.templates) and tokenized with the
checkpoint's tokenizer.json, the single `<image>` token is expanded into one slot per
visual token, and the batch is left-padded to a length bucket so that each bucket
compiles once.
"""

from __future__ import annotations

import os
import pathlib
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import PIL.Image
import tokenizers

from tokred_jax.io import templates
from tokred_jax.models.config import LlavaConfig, VisionConfig

IMAGE_TOKEN = templates.IMAGE_TOKEN

ImageLike = PIL.Image.Image | str | os.PathLike | np.ndarray


class Tokenizer:
  """A `tokenizers.Tokenizer` with the LLaVA special tokens resolved against the config."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, cfg: LlavaConfig):
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if image_id is None:
      raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; use the tokenizer.json "
                       "that came with the LLaVA checkpoint.")
    if image_id != cfg.image_token_id:
      raise ValueError(f"the tokenizer maps {IMAGE_TOKEN} to id {image_id} but config.json "
                       f"says image_token_index {cfg.image_token_id}; the tokenizer and the "
                       "weights come from different checkpoints.")
    # A tokenizer.json may enable truncation or padding; both would change prompts silently.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    self._tok = tokenizer
    self.image_token_id = image_id
    self.bos_id: int | None = cfg.text.bos_token_id
    self.eos_ids: tuple[int, ...] = cfg.text.eos_ids
    self.pad_id: int = 0 if cfg.pad_token_id is None else cfg.pad_token_id

  @classmethod
  def load(cls, path: str | os.PathLike, cfg: LlavaConfig) -> Tokenizer:
    """Reads `path` (a tokenizer.json, or a directory holding one)."""
    file = pathlib.Path(path)
    if file.is_dir():
      file = file / "tokenizer.json"
    if not file.is_file():
      raise ValueError(f"tokenizer file {file} does not exist; a checkpoint needs the "
                       "tokenizer.json (the fast-tokenizer file) of its model.")
    try:
      tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises bare Exceptions for unparsable files.
      raise ValueError(f"cannot read {file}: {e}. The file is corrupt or not a "
                       "tokenizers JSON file; restore it from the checkpoint.") from e
    return cls(tok, cfg)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, starting with BOS when the model has one."""
    ids = self._tok.encode(text).ids
    if self.bos_id is not None and ids[:1] != [self.bos_id]:
      ids = [self.bos_id] + ids
    return ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode` with each token's character span in `text` ((0, 0) for an added BOS)."""
    encoding = self._tok.encode(text)
    ids, offsets = list(encoding.ids), list(encoding.offsets)
    if self.bos_id is not None and ids[:1] != [self.bos_id]:
      ids, offsets = [self.bos_id] + ids, [(0, 0)] + offsets
    return ids, offsets

  def token_id(self, token: str) -> int | None:
    """The id of vocabulary entry `token` (e.g. "<|im_end|>"); None if it has none."""
    return self._tok.token_to_id(token)

  def token(self, token_id: int) -> str:
    """The vocabulary entry of `token_id` (e.g. the EOS string "</s>")."""
    return self._tok.id_to_token(token_id)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens (BOS, EOS, padding, image) left out."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", IMAGE_TOKEN, "<pad>")


def train_tokenizer(lines: Sequence[str], vocab_size: int, path: str | os.PathLike
                    ) -> dict[str, int]:
  """Trains a byte-level BPE tokenizer (BOS prepended, LLaVA's special tokens) on
  `lines` for the small models made here, writes it as a tokenizer.json at `path` and
  returns the ids of SPECIAL_TOKENS."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(lines, trainer=trainer)
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  tok.save(os.fspath(path))
  return {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}


def build_prompt(question: str, template: str | templates.Template = "tokred") -> str:
  """The chat prompt for one question about one image, in `template`
  (tokred_jax.io.templates; "tokred" and "llava-hf" give "USER: <image>\\nQ ASSISTANT:").

  A question that already holds `<image>` keeps it where it is; otherwise the image
  goes first, on its own line, as llava-hf's chat template puts it.
  """
  return templates.get(template).prompt(question)


def default_buckets(max_length: int, steps_per_octave: int = 8) -> tuple[int, ...]:
  """Prompt lengths to pad to: 64, 128, 256, then `steps_per_octave` evenly spaced steps
  in every doubling (256, 288, ..., 480, 512, 576, ...), then `max_length` itself.

  A prompt longer than 256 tokens is padded by less than 1/steps_per_octave of its own
  length (a LLaVA-1.5 prompt of 576 + 45 tokens gets 640, not 1,024), and the number of
  programs stays bounded: 8 a doubling, 35 up to 4,096.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be positive, got {max_length}.")
  if steps_per_octave < 1:
    raise ValueError(f"steps_per_octave must be >= 1, got {steps_per_octave}.")
  buckets, length = [], 64
  while length < max_length:
    buckets.append(length)
    octave = 2 ** (length.bit_length() - 1)  # the doubling `length` is in
    length = 2 * length if length < 256 else length + max(octave // steps_per_octave, 1)
  return tuple(buckets) + (max_length,)


def encode_batch(tokenizer: Tokenizer, prompts: Sequence[str], cfg: LlavaConfig,
                 num_image_tokens: int | Sequence[Sequence[int]],
                 bucket_lengths: Sequence[int], max_length: int,
                 template: str | templates.Template = "tokred") -> dict[str, np.ndarray]:
  """Tokenizes full prompts into one left-padded batch.

  Each prompt holds one `<image>` per image; each is expanded into copies of
  `cfg.image_token_id`, the slots the visual tokens fill. The batch length T is the
  smallest bucket that fits the longest prompt.

  Args:
    tokenizer: the checkpoint's tokenizer.
    prompts: B full prompts (e.g. from `build_prompt`).
    cfg: the model config (image token id, pad id).
    num_image_tokens: visual tokens per image handed to the LLM (one image per prompt),
      or per prompt the slots of each of its images (`batching.slot_counts`).
    bucket_lengths: allowed batch lengths.
    max_length: the longest sequence allowed (the caller leaves room for new tokens).
    template: the chat template the prompts were written in; it decides how the text
      is tokenized (as one text, or chunk by chunk around `<image>`).

  Returns:
    input_ids: i32[B, T], pad id in the left padding.
    attention_mask: bool[B, T], False on padding.
    positions: i32[B, T], 0, 1, ... from each prompt's first real token; 0 on padding.
  """
  if isinstance(prompts, str):
    raise ValueError("prompts must be a list of strings, not one string.")
  if not prompts:
    raise ValueError("no prompts given.")
  if not bucket_lengths:
    raise ValueError("bucket_lengths is empty; use default_buckets(max_length).")
  template = templates.get(template)
  template.check_tokenizer(tokenizer)
  sequences = []
  for b, prompt in enumerate(prompts):
    if not prompt.strip():
      raise ValueError(f"prompt {b} is empty; write a question (see build_prompt).")
    slots = num_image_tokens if isinstance(num_image_tokens, (int, np.integer)) \
        else num_image_tokens[b]
    try:
      ids, _ = expand_image_token(template.encode(tokenizer, prompt)[0],
                                  cfg.image_token_id, slots)
    except ValueError as e:
      raise ValueError(f"prompt {b}: {e} (build_prompt adds it when missing).") from None
    if len(ids) > max_length:
      raise ValueError(
          f"prompt {b} is {len(ids)} tokens long ({np.sum(slots)} of them for the "
          f"image) but at most {max_length} fit; shorten the prompt or generate fewer "
          "new tokens.")
    sequences.append(ids)

  longest = max(len(ids) for ids in sequences)
  fitting = [n for n in bucket_lengths if n >= longest]
  if not fitting:
    raise ValueError(
        f"the longest prompt is {longest} tokens but the largest length bucket is "
        f"{max(bucket_lengths)}; add a bucket of at least {longest} tokens (e.g. "
        "default_buckets(max_length)) or shorten the prompt.")
  length = min(fitting)
  input_ids = np.full((len(sequences), length), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(sequences), length), bool)
  for b, ids in enumerate(sequences):
    input_ids[b, length - len(ids):] = ids
    mask[b, length - len(ids):] = True
  positions = np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0)
  return dict(input_ids=input_ids, attention_mask=mask, positions=positions)


def expand_image_token(ids: Sequence[int], image_token_id: int,
                       num_image_tokens: int | Sequence[int]) -> tuple[list[int], int]:
  """Replaces the image token in `ids` with `num_image_tokens` slots (the ones the visual
  tokens fill), or each of several image tokens with its own number of slots (a list,
  one entry per image). Returns the expanded ids and the index of the first slot.

  Raises ValueError when `ids` does not hold one image token per entry.
  """
  ids = list(ids)
  counts = [num_image_tokens] if isinstance(num_image_tokens, (int, np.integer)) \
      else list(num_image_tokens)
  found = ids.count(image_token_id)
  if found != len(counts):
    if len(counts) == 1:
      raise ValueError(f"the token ids hold {found} {IMAGE_TOKEN} tokens for exactly one "
                       f"image; write {IMAGE_TOKEN} once")
    raise ValueError(f"the token ids hold {found} {IMAGE_TOKEN} tokens for {len(counts)} "
                     f"images; write {IMAGE_TOKEN} once per image")
  out, rest = [], iter(counts)
  for token in ids:
    out += [image_token_id] * next(rest) if token == image_token_id else [token]
  return out, ids.index(image_token_id)


def load_image(image: ImageLike, vision_cfg: VisionConfig) -> np.ndarray:
  """u8[S, S, 3]: an image (PIL, path or uint8 array) read, made RGB (padded to a square
  if the config says so) and resized as the tower expects, before normalisation."""
  image = _to_rgb(image)
  if vision_cfg.pad_to_square:
    image = pad_to_square(image, vision_cfg.image_mean)
  return _resize(image, vision_cfg)


def pad_to_square(image: PIL.Image.Image, mean: Sequence[float]) -> PIL.Image.Image:
  """The original LLaVA's `expand2square`: the image centred on a square canvas of its
  longer side, filled with the mean colour (int(m·255) per channel, as LLaVA rounds)."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = PIL.Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
  canvas.paste(image, ((side - width) // 2, (side - height) // 2))
  return canvas


def _open(path: str | os.PathLike) -> PIL.Image.Image:
  """The image file at `path`, decoded; one whose header promises more pixels than PIL's
  decompression-bomb limit is refused before anything is decoded."""
  with warnings.catch_warnings():
    # PIL only warns between its limit and twice that, then decodes gigabytes.
    warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
    try:
      with PIL.Image.open(path) as opened:
        return opened.copy()
    except (PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as e:
      pixels = re.search(r"\((\d+) pixels\)", str(e))
      size = (f"{int(pixels[1]):,} pixels ({int(pixels[1]) * 3 / 2**30:.1f} GiB as RGB)"
              if pixels else "too many pixels")
      raise ValueError(f"image file {path} has {size}, over the limit of "
                       f"{PIL.Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS); resize "
                       "it first: the model sees every image at a few hundred pixels a "
                       "side.") from None
    except (OSError, PIL.UnidentifiedImageError) as e:
      raise ValueError(f"cannot read image file {path}: {e}") from e


def _to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
  """16-bit grayscale scaled to 8 bits (PIL's own conversion clips it to white); wider
  or floating-point pixels are refused, their range being unknown."""
  if image.mode.startswith("I;16"):
    wide = np.asarray(image).astype(np.uint32)
    return PIL.Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
  if image.mode in ("I", "F"):
    kind = "32-bit integer" if image.mode == "I" else "floating-point"
    raise ValueError(f"the image has {kind} pixels (PIL mode {image.mode}), whose range "
                     "is unknown; scale it to 0..255 and convert it to 8-bit RGB first.")
  return image


def _to_rgb(image: ImageLike) -> PIL.Image.Image:
  """An RGB PIL image from any accepted input; transparency is composited onto white."""
  if isinstance(image, (str, os.PathLike)):
    image = _open(image)
  elif isinstance(image, np.ndarray):
    if image.ndim != 3 or image.shape[-1] != 3:
      hint = (" It looks channels-first: transpose it with x.transpose(1, 2, 0)."
              if image.ndim == 3 and image.shape[0] == 3 else "")
      raise ValueError(f"an image array must be uint8 [H, W, 3] (RGB, channels last); got "
                       f"shape {image.shape}.{hint} Convert grayscale or RGBA arrays to "
                       "RGB first, or pass a PIL image.")
    if image.dtype != np.uint8:
      raise ValueError(f"an image array must be uint8 [H, W, 3] with values 0..255; got "
                       f"dtype {image.dtype}. Use (x * 255).round().astype(np.uint8) for "
                       "floats in [0, 1].")
    return PIL.Image.fromarray(image)
  elif not isinstance(image, PIL.Image.Image):
    raise ValueError(f"unsupported image type {type(image).__name__}; pass a PIL image, a "
                     "file path or a uint8 [H, W, 3] array.")
  image = _to_8bit(image)
  if "A" in image.getbands() or "transparency" in image.info:
    white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
  return image.convert("RGB")


def _resize(image: PIL.Image.Image, vision_cfg: VisionConfig) -> np.ndarray:
  """u8[S, S, 3]: CLIP resizes the short side to S then centre-crops; SigLIP squashes."""
  size = vision_cfg.image_size
  if vision_cfg.kind == "siglip":
    return np.asarray(image.resize((size, size), PIL.Image.Resampling.BICUBIC))
  width, height = image.size
  short, long = sorted((width, height))
  long = int(size * long / short)  # Truncates as transformers does.
  new_w, new_h = (size, long) if width <= height else (long, size)
  pixels = np.asarray(image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return pixels[top:top + size, left:left + size]


def preprocess_images(images: ImageLike | Sequence[ImageLike],
                      vision_cfg: VisionConfig) -> np.ndarray:
  """Pixels for the vision tower, matching transformers' PIL-based image processors.

  Args:
    images: one image or a sequence of them: PIL images (any mode), image file paths,
      or uint8 [H, W, 3] arrays, of any size.
    vision_cfg: the tower's config (image size, kind, mean and std).

  Returns:
    f32[B, S, S, 3] with S = vision_cfg.image_size: resized (bicubic), rescaled by
    1/255 and normalised with the config's mean and std.
  """
  if vision_cfg.num_channels != 3:
    raise ValueError(f"the vision tower takes {vision_cfg.num_channels} channels; only RGB "
                     "(3) images are supported.")
  is_batch = ((isinstance(images, Sequence) and not isinstance(images, str))
              or (isinstance(images, np.ndarray) and images.ndim == 4))
  images = list(images) if is_batch else [images]
  if not images:
    raise ValueError("no images given.")
  pixels = np.stack([load_image(image, vision_cfg) for image in images])
  # Rescale in float64, then normalise in float32, in the order transformers does.
  pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  mean = np.asarray(vision_cfg.image_mean, np.float32)
  std = np.asarray(vision_cfg.image_std, np.float32)
  return (pixels - mean) / std


def validate_pixels(pixel_values: Any, vision_cfg: VisionConfig) -> None:
  """Checks that `pixel_values` is f[B, S, S, C] for the tower; raises ValueError if not."""
  shape = tuple(getattr(pixel_values, "shape", ()))
  size, channels = vision_cfg.image_size, vision_cfg.num_channels
  want = f"[B, {size}, {size}, {channels}] (batch, height, width, channels)"
  if len(shape) != 4:
    raise ValueError(f"pixel_values must be {want}; got shape {shape}. Use "
                     "preprocess_images to make them.")
  if shape[1:] == (channels, size, size) and shape[-1] != channels:
    raise ValueError(f"pixel_values has shape {shape}, which looks channels-first (NCHW); "
                     f"the model takes {want}: transpose with x.transpose(0, 2, 3, 1).")
  if shape[1:] != (size, size, channels):
    raise ValueError(f"pixel_values must be {want}; got shape {shape}. Resize with "
                     "preprocess_images (the tower's image_size is fixed by its position "
                     "embeddings).")
  if not jnp.issubdtype(pixel_values.dtype, jnp.floating):  # bfloat16 included.
    raise ValueError(f"pixel_values must be floating point (normalised); got dtype "
                     f"{pixel_values.dtype}. Use preprocess_images to make them.")
