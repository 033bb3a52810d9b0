"""Parity with the PyTorch reference (transformers) on tiny random checkpoints."""

import numpy as np
import pytest
import torch
import transformers

from tokred_jax.engine import generate
from tokred_jax.io import checkpoint
from tokred_jax.models import llava


@pytest.fixture(scope="module", params=["clip_llama_dir", "siglip_qwen2_dir", "published_dir"])
def ckpt(request):
  path = str(request.getfixturevalue(request.param))
  cfg, params = checkpoint.load_checkpoint(path)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
  return path, cfg, params, hf.eval()


def make_batch(cfg, seed=0):
  """Two prompts of different lengths, left-padded: text, the image tokens, text."""
  rng = np.random.default_rng(seed)
  n_img = cfg.num_image_tokens
  special = {cfg.image_token_id, cfg.pad_token_id, 0, 1, 2}
  words = np.array([t for t in range(3, cfg.text.vocab_size) if t not in special])
  rows = []
  for before, after in ((3, 9), (1, 4)):
    rows.append(np.concatenate([rng.choice(words, before), np.full(n_img, cfg.image_token_id),
                                rng.choice(words, after)]))
  length = max(map(len, rows))
  ids = np.zeros((2, length), np.int32)
  mask = np.zeros((2, length), bool)
  for i, row in enumerate(rows):
    ids[i, length - len(row):] = row
    mask[i, length - len(row):] = True
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  s = cfg.vision.image_size
  pixels = rng.normal(size=(2, s, s, cfg.vision.num_channels)).astype(np.float32)
  return dict(input_ids=ids, attention_mask=mask, positions=positions, pixel_values=pixels)


def hf_logits(hf, batch):
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(batch["input_ids"]).long(),
             pixel_values=torch.from_numpy(batch["pixel_values"]).permute(0, 3, 1, 2),
             attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
             position_ids=torch.from_numpy(batch["positions"]).long())
  return out.logits.numpy()


def ours_logits(cfg, params, batch):
  return np.asarray(llava.Llava(cfg).apply(
      {"params": params}, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
      batch["positions"]))


def test_logits_match_transformers(ckpt):
  _, cfg, params, hf = ckpt
  batch = make_batch(cfg)
  ref, ours = hf_logits(hf, batch), ours_logits(cfg, params, batch)
  valid = batch["attention_mask"]
  assert np.std(ref[valid]) > 0.1, "logits too flat for a meaningful comparison"
  np.testing.assert_array_less(np.abs(ours[valid] - ref[valid]).max(), 1e-4)


def test_greedy_tokens_match_transformers(ckpt):
  _, cfg, params, hf = ckpt
  batch = make_batch(cfg, seed=1)
  n = 20
  with torch.no_grad():
    ref = hf.generate(
        input_ids=torch.from_numpy(batch["input_ids"]).long(),
        pixel_values=torch.from_numpy(batch["pixel_values"]).permute(0, 3, 1, 2),
        attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
        max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
        pad_token_id=0)[:, batch["input_ids"].shape[1]:].numpy()
  gen = generate.Generator(llava.Llava(cfg), generate.SamplingConfig(max_new_tokens=n),
                           eos_ids=())
  ours = gen(params, batch)
  assert ref.shape == (2, n)
  assert len(set(ours[0].tolist())) > 1, "degenerate generation proves little"
  np.testing.assert_array_equal(ours, ref)


def test_export_round_trip(ckpt, tmp_path):
  _, cfg, params, _ = ckpt
  checkpoint.save_checkpoint(str(tmp_path / "out"), cfg, params)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(
      str(tmp_path / "out"), dtype=torch.float32).eval()
  batch = make_batch(cfg, seed=2)
  valid = batch["attention_mask"]
  ref, ours = hf_logits(hf, batch), ours_logits(cfg, params, batch)
  np.testing.assert_array_less(np.abs(ours[valid] - ref[valid]).max(), 1e-4)
