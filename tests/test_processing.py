"""Tokenizer, prompt, image preprocessing and batch encoding, against transformers."""

import dataclasses
import pathlib
import struct
import zlib

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import transformers
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tests import faults
from tokred_jax.io import checkpoint, processing, templates
from tokred_jax.models.config import CLIP_MEAN, CLIP_STD, VisionConfig

CLIP = VisionConfig(kind="clip", image_size=42, patch_size=14)
SIGLIP = VisionConfig(kind="siglip", image_size=56, patch_size=14, image_mean=(0.5,) * 3,
                      image_std=(0.5,) * 3)


def _images(tmp_path: pathlib.Path):
  """Odd sizes and every accepted input kind, including modes that need conversion."""
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)  # Wider than tall.
  file = tmp_path / "tall.png"
  PIL.Image.fromarray(rng.integers(0, 256, (61, 23, 3), dtype=np.uint8)).save(file)
  return [
      PIL.Image.fromarray(rgb),
      rgb,  # The same, as an array.
      PIL.Image.fromarray(rng.integers(0, 256, (50, 37), dtype=np.uint8)),  # Grayscale.
      PIL.Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)),  # RGBA.
      str(file),
      PIL.Image.fromarray(rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)),  # Shrinks.
  ]


def _as_hf_input(image):
  return PIL.Image.open(image) if isinstance(image, str) else image


@pytest.mark.parametrize("size", [42, 336])
def test_clip_pixels_match_transformers(size, tmp_path):
  images = _images(tmp_path)
  cfg = dataclasses.replace(CLIP, image_size=size)
  hf = CLIPImageProcessorPil(size={"shortest_edge": size},
                             crop_size={"height": size, "width": size},
                             image_mean=CLIP_MEAN, image_std=CLIP_STD)
  want = hf([_as_hf_input(i) for i in images], return_tensors="np")["pixel_values"]
  got = processing.preprocess_images(images, cfg)
  assert got.shape == (len(images), size, size, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got[0], got[1])


@pytest.mark.parametrize("size", [56, 384])
def test_siglip_pixels_match_transformers(size, tmp_path):
  images = _images(tmp_path)
  cfg = dataclasses.replace(SIGLIP, image_size=size, patch_size=14 if size == 56 else 16)
  hf = SiglipImageProcessorPil(size={"height": size, "width": size})
  want = hf([_as_hf_input(i) for i in images], return_tensors="np")["pixel_values"]
  got = processing.preprocess_images(images, cfg)
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_single_image_and_batch_array():
  batch = np.random.default_rng(1).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
  assert processing.preprocess_images(batch[0], CLIP).shape == (1, 42, 42, 3)
  assert processing.preprocess_images(batch, CLIP).shape == (2, 42, 42, 3)
  processing.validate_pixels(processing.preprocess_images(batch, CLIP), CLIP)
  processing.validate_pixels(jnp.zeros((1, 42, 42, 3), jnp.bfloat16), CLIP)


@pytest.mark.parametrize("image, message", [
    (np.zeros((3, 20, 30), np.uint8), r"uint8 \[H, W, 3\].*\(3, 20, 30\).*channels-first"),
    (np.zeros((20, 30, 4), np.uint8), r"\[H, W, 3\].*got shape \(20, 30, 4\)"),
    (np.zeros((20, 30), np.uint8), r"\[H, W, 3\].*got shape \(20, 30\)"),
    (np.zeros((20, 30, 3), np.float32), "dtype float32"),
    (np.zeros((1, 2, 20, 30, 3), np.uint8), r"got shape \(1, 2, 20, 30, 3\)"),
    ([], "no images"),
    (7, "unsupported image type int"),
    ("/nonexistent/cat.jpg", "cannot read image file /nonexistent/cat.jpg"),
])
def test_bad_images(image, message):
  with pytest.raises(ValueError, match=message) as e:
    processing.preprocess_images(image, CLIP)
  case = (f"{image.dtype}{list(image.shape)}" if isinstance(image, np.ndarray)
          else repr(image))
  faults.record("preprocess_images", case, f"ValueError: {e.value}", before="compile")


@pytest.mark.parametrize("shape, dtype, message", [
    ((42, 42, 3), np.float32, r"\[B, 42, 42, 3\].*got shape \(42, 42, 3\)"),
    ((2, 3, 42, 42), np.float32, "channels-first"),
    ((2, 56, 56, 3), np.float32, r"got shape \(2, 56, 56, 3\). Resize"),
    ((2, 42, 42, 1), np.float32, r"got shape \(2, 42, 42, 1\)"),
    ((2, 42, 42, 3), np.uint8, "floating point"),
])
def test_validate_pixels_errors(shape, dtype, message):
  with pytest.raises(ValueError, match=message):
    processing.validate_pixels(np.zeros(shape, dtype), CLIP)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
  """A 16-bit PNG (PIL mode I;16) reads as the 8-bit image it scales to, from a file or
  as a PIL image; PIL's own convert("RGB") would clip everything above 255 to white."""
  rng = np.random.default_rng(2)
  deep = rng.integers(0, 65536, (30, 40), dtype=np.uint16)
  PIL.Image.fromarray(deep).save(tmp_path / "deep.png")
  opened = PIL.Image.open(tmp_path / "deep.png")
  assert opened.mode == "I;16"
  eight = np.round(deep / 257).astype(np.uint8)
  want = processing.preprocess_images([np.repeat(eight[..., None], 3, axis=-1)], CLIP)
  for image in (str(tmp_path / "deep.png"), opened):
    np.testing.assert_array_equal(processing.preprocess_images([image], CLIP), want)
  assert np.asarray(opened.convert("RGB")).mean() > 250  # What scaling avoids.
  faults.record("preprocess_images", "a 16-bit grayscale PNG (mode I;16)",
                "(no error: scaled to 8 bits, x / 257)", before="-")


@pytest.mark.parametrize("mode, message", [("I", "32-bit integer pixels"),
                                           ("F", "floating-point pixels")])
def test_wide_pixels_are_refused(mode, message):
  image = PIL.Image.fromarray(np.full((8, 8), 1000, np.int32 if mode == "I" else np.float32),
                              mode)
  with pytest.raises(ValueError, match=f"{message} \\(PIL mode {mode}\\).*8-bit RGB") as e:
    processing.preprocess_images([image], CLIP)
  faults.record("preprocess_images", f"a PIL image of mode {mode}", f"ValueError: {e.value}",
                before="compile")


def _png_header(width: int, height: int) -> bytes:
  """A PNG whose header promises width x height RGB pixels (its data is a few bytes)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(10000, 10000), (40000, 30000)])
def test_huge_images_are_refused_before_decoding(width, height, tmp_path, monkeypatch):
  """Between PIL's limit and twice it PIL only warns and decodes; above, it raises. Both
  are refused from the header alone (decoding 1.2e9 pixels would take 3.4 GiB)."""
  path = tmp_path / "huge.png"
  path.write_bytes(_png_header(width, height))
  decoded = []
  monkeypatch.setattr(PIL.ImageFile.ImageFile, "load",
                      lambda self: decoded.append(self) or pytest.fail("decoded"))
  with pytest.raises(ValueError, match=f"has {width * height:,} pixels .* over the limit of "
                     f"{PIL.Image.MAX_IMAGE_PIXELS:,}.*resize it first") as e:
    processing.preprocess_images([str(path)], CLIP)
  assert not decoded
  faults.record("preprocess_images", f"a {width}x{height} PNG (its header)",
                f"ValueError: {str(e.value).replace(str(path), 'huge.png')}",
                before="decoding")


def test_truncated_image_file(tmp_path):
  path = tmp_path / "cut.png"
  noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  PIL.Image.fromarray(noise).save(path)
  path.write_bytes(path.read_bytes()[:300])
  with pytest.raises(ValueError, match="cannot read image file .*cut.png: image file is "
                     "truncated") as e:
    processing.preprocess_images([str(path)], CLIP)
  faults.record("preprocess_images", "a PNG cut off after 300 bytes",
                f"ValueError: {str(e.value).replace(str(path), 'cut.png')}", before="compile")


def test_build_prompt():
  assert processing.build_prompt(" What is this? ") == "USER: <image>\nWhat is this? ASSISTANT:"
  assert (processing.build_prompt("Compare <image> with a dog.")
          == "USER: Compare <image> with a dog. ASSISTANT:")
  with pytest.raises(ValueError, match="question is empty"):
    processing.build_prompt("  \n")


@pytest.mark.parametrize("template, before", [
    ("tokred", ""), ("llava-hf", ""), ("vicuna_v1", templates.VICUNA_SYSTEM + " "),
    ("llava_v1", templates.LLAVA_SYSTEM + " ")])
def test_build_prompt_in_each_template(template, before):
  assert (processing.build_prompt(" What is this? ", template)
          == before + "USER: <image>\nWhat is this? ASSISTANT:")
  assert processing.build_prompt("What is this?", "qwen") == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
      "<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="unknown chat template 'vicuna'; choose one of"):
    processing.build_prompt("Hi?", "vicuna")


def test_encode_batch_tokenizes_as_the_template_says(clip_llama_dir):
  """vicuna_v1 tokenizes the chunks around <image> alone, BOS only before the first
  (tokenizer_image_token); llava-hf the text as one (LlavaProcessor)."""
  cfg = checkpoint.read_config(clip_llama_dir)
  tok = processing.Tokenizer.load(clip_llama_dir, cfg)
  prompt = processing.build_prompt("Hi", "vicuna_v1")
  whole = processing.encode_batch(tok, [prompt], cfg, 1, (256,), 256, "llava-hf")
  split = processing.encode_batch(tok, [prompt], cfg, 1, (256,), 256, "vicuna_v1")
  before, after = prompt.split("<image>")
  want = tok.encode(before) + [cfg.image_token_id] + tok.encode(after)[1:]
  np.testing.assert_array_equal(split["input_ids"][0][split["attention_mask"][0]], want)
  # Byte-level BPE never merges across a special token: both agree here.
  np.testing.assert_array_equal(whole["input_ids"], split["input_ids"])


def test_prompt_matches_llava_hf_chat_template():
  """The template llava-hf ships with llava-1.5-7b-hf renders our prompt exactly."""
  jinja2 = pytest.importorskip("jinja2")
  template = (
      "{% for message in messages %}{% if message['role'] != 'system' %}"
      "{{ message['role'].upper() + ': '}}{% endif %}"
      "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
      "{{ '<image>\n' }}{% endfor %}"
      "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
      "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
      "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
  messages = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": "What is this?"}]}]
  rendered = jinja2.Environment().from_string(template).render(
      messages=messages, add_generation_prompt=True)
  assert rendered == processing.build_prompt("What is this?")


@pytest.mark.parametrize("fixture, adds_bos", [
    ("clip_llama_dir", True), ("published_dir", True), ("siglip_qwen2_dir", False)])
def test_tokenizer(fixture, adds_bos, request):
  path = request.getfixturevalue(fixture)
  cfg = checkpoint.read_config(path)
  tok = processing.Tokenizer.load(path, cfg)
  ids = tok.encode("USER: <image>\nHi there ASSISTANT:")
  assert ids.count(cfg.image_token_id) == 1 and tok.image_token_id == cfg.image_token_id
  assert (ids[0] == 1) == adds_bos and ids.count(1) == int(adds_bos)  # BOS exactly once.
  assert tok.decode(ids + [tok.pad_id] + list(tok.eos_ids)) == "USER: \nHi there ASSISTANT:"
  assert tok.eos_ids == (2,)


def test_tokenizer_errors(clip_llama_dir, tmp_path):
  cfg = checkpoint.read_config(clip_llama_dir)
  with pytest.raises(ValueError, match="tokenizer.json does not exist"):
    processing.Tokenizer.load(tmp_path, cfg)
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
  with pytest.raises(ValueError, match="corrupt or not a tokenizers JSON"):
    processing.Tokenizer.load(tmp_path, cfg)
  with pytest.raises(ValueError, match="maps <image> to id 290 but config.json says "
                     "image_token_index 5"):
    processing.Tokenizer.load(clip_llama_dir, dataclasses.replace(cfg, image_token_id=5))


def test_encode_batch_matches_transformers_processor(clip_llama_dir):
  cfg = checkpoint.read_config(clip_llama_dir)
  tok = processing.Tokenizer.load(clip_llama_dir, cfg)
  prompts = [processing.build_prompt("Hi"),
             processing.build_prompt("What colour is the car in the park?")]
  batch = processing.encode_batch(tok, prompts, cfg, cfg.num_image_tokens,
                                  bucket_lengths=(16, 32, 64), max_length=64)
  hf_processor = transformers.LlavaProcessor(
      image_processor=CLIPImageProcessorPil(size={"shortest_edge": 42},
                                            crop_size={"height": 42, "width": 42}),
      tokenizer=transformers.PreTrainedTokenizerFast(
          tokenizer_file=str(clip_llama_dir / "tokenizer.json")),
      patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
      num_additional_image_tokens=1)
  image = np.zeros((42, 42, 3), np.uint8)
  for b, prompt in enumerate(prompts):
    want = hf_processor(text=prompt, images=image, return_tensors="np")["input_ids"][0]
    mask = batch["attention_mask"][b]
    np.testing.assert_array_equal(batch["input_ids"][b][mask], want)


def test_encode_batch_padding_and_positions(clip_llama_dir):
  cfg = checkpoint.read_config(clip_llama_dir)
  tok = processing.Tokenizer.load(clip_llama_dir, cfg)
  short, long = "<image>", "USER: <image>\nWhat colour is the car? ASSISTANT:"
  n_short, n_long = 1 + 30, len(tok.encode(long)) - 1 + 30  # BOS, 30 image slots, text.
  assert 32 < n_long <= 64
  batch = processing.encode_batch(tok, [short, long], cfg, num_image_tokens=30,
                                  bucket_lengths=(128, 64, 32), max_length=128)
  ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["positions"]
  assert ids.shape == mask.shape == pos.shape == (2, 64)
  assert (ids.dtype, mask.dtype, pos.dtype) == (np.int32, np.bool_, np.int32)
  pad = 64 - n_short
  assert not mask[0, :pad].any() and mask[0, pad:].all()  # Left padding.
  assert mask[1].sum() == n_long and mask[1, -n_long:].all()
  assert (ids[0, :pad] == cfg.pad_token_id).all() and ids[0, pad] == 1
  assert (ids[0, pad + 1:] == cfg.image_token_id).all()
  np.testing.assert_array_equal(pos[0], np.r_[np.zeros(pad), np.arange(n_short)])
  np.testing.assert_array_equal(pos[1], np.r_[np.zeros(64 - n_long), np.arange(n_long)])
  # Without a pad id in the config, padding uses 0.
  cfg0 = dataclasses.replace(cfg, pad_token_id=None)
  tok0 = processing.Tokenizer.load(clip_llama_dir, cfg0)
  ids0 = processing.encode_batch(tok0, [short], cfg0, 30, (64,), 64)["input_ids"]
  assert (ids0[0, :pad] == 0).all()


def test_default_buckets():
  buckets = processing.default_buckets(2048)
  assert buckets[:5] == (64, 128, 256, 288, 320) and buckets[-3:] == (1792, 1920, 2048)
  assert len(buckets) == 2 + 8 * 3 + 1 and len(processing.default_buckets(4096)) == 35
  assert processing.default_buckets(2048, steps_per_octave=1) == (64, 128, 256, 512, 1024,
                                                                  2048)
  # Above 256 tokens a prompt is padded by less than an eighth of its length.
  for n in range(257, 2049):
    padded = min(b for b in buckets if b >= n)
    assert padded - n < n / 8, (n, padded)
  assert processing.default_buckets(300) == (64, 128, 256, 288, 300)
  assert processing.default_buckets(100) == (64, 100)
  assert processing.default_buckets(64) == (64,)
  assert processing.default_buckets(10) == (10,)
  with pytest.raises(ValueError, match="positive"):
    processing.default_buckets(0)
  with pytest.raises(ValueError, match="steps_per_octave"):
    processing.default_buckets(512, steps_per_octave=0)


@pytest.mark.parametrize("prompts, buckets, max_length, message", [
    (["USER: hello ASSISTANT:"], (64,), 64,
     "prompt 0: the token ids hold 0 <image> tokens.*exactly one"),
    (["<image>", "<image> and <image>"], (64,), 64,
     "prompt 1: the token ids hold 2 <image> tokens"),
    (["<image>", "  "], (64,), 64, "prompt 1 is empty"),
    (["<image> " + "word " * 40], (256,), 40,
     r"prompt 0 is \d+ tokens long \(9 of them for the image\) but at most 40 fit; shorten"),
    (["<image> " + "word " * 40], (16, 32), 256,
     r"longest prompt is \d+ tokens but the largest length bucket is 32; add a bucket"),
    ("<image>", (64,), 64, "a list of strings"),
    ([], (64,), 64, "no prompts"),
    (["<image>"], (), 64, "bucket_lengths is empty"),
])
def test_encode_batch_errors(prompts, buckets, max_length, message, clip_llama_dir):
  cfg = checkpoint.read_config(clip_llama_dir)
  tok = processing.Tokenizer.load(clip_llama_dir, cfg)
  with pytest.raises(ValueError, match=message):
    processing.encode_batch(tok, prompts, cfg, cfg.num_image_tokens, buckets, max_length)
