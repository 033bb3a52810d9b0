r"""Writes the small random-weight LLaVA embedded in the package as the default model.

  python tools/make_tiny_checkpoint.py tokred_jax/assets/tiny-llava

It exercises the whole stack (CLIP-style tower with CLS, GQA Llama, the real Hugging
Face files) in well under a second per request on a CPU. Its weights are random, so its
answers are noise: it is a smoke-test model until a trained default replaces it.
"""

import json
import os
import sys
import tempfile

import jax
import numpy as np
from PIL import Image, ImageDraw

from tokred_jax.io import checkpoint, processing
from tokred_jax.models import llava
from tokred_jax.models.config import LlavaConfig, TextConfig, VisionConfig

CORPUS = """USER: What is in the image? ASSISTANT: A red circle above a blue square.
USER: How many shapes are there? ASSISTANT: There are three shapes on a grey background.
USER: What colour is the triangle? ASSISTANT: The triangle is green and sits on the left.
USER: Is there a yellow star? ASSISTANT: No, there is no yellow star in the picture.
"""


def make_sample_image(path: str, size: int = 112):
  img = Image.new("RGB", (size, size), (128, 128, 128))
  draw = ImageDraw.Draw(img)
  draw.ellipse((10, 10, 50, 50), fill=(220, 30, 30))
  draw.rectangle((60, 60, 100, 100), fill=(30, 60, 220))
  draw.polygon([(15, 100), (35, 65), (55, 100)], fill=(30, 180, 60))
  img.save(path)


def main(out_dir: str):
  vocab = 384
  tmp_tok = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
  ids = processing.train_tokenizer(CORPUS.splitlines() * 8, vocab, tmp_tok)
  cfg = LlavaConfig(
      vision=VisionConfig(kind="clip", hidden_size=64, intermediate_size=128, num_layers=3,
                          num_heads=4, image_size=112, patch_size=14),
      text=TextConfig(kind="llama", vocab_size=vocab, hidden_size=128, intermediate_size=256,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                      rms_norm_eps=1e-5, max_position_embeddings=512,
                      bos_token_id=ids["<s>"], eos_token_id=ids["</s>"]),
      image_token_id=ids["<image>"], pad_token_id=ids["<pad>"])
  params = jax.tree_util.tree_map(np.asarray, llava.init_params(cfg, jax.random.PRNGKey(0)))
  checkpoint.save_checkpoint(out_dir, cfg, params, tokenizer_json_path=tmp_tok)
  os.remove(tmp_tok)
  make_sample_image(os.path.join(out_dir, "sample.png"))
  with open(os.path.join(out_dir, "sample_prompt.txt"), "w") as f:
    f.write("What colour is the circle?\n")
  print(json.dumps({"dir": out_dir, "num_image_tokens": cfg.num_image_tokens}))


if __name__ == "__main__":
  main(sys.argv[1])
