"""LLaVA-1.5 from its parts (tokred_jax.io.parts): a Llama LLM, a CLIPModel tower and a
stage-1 projector file in the official naming, assembled and trained by the p-MoD
recipe (configs/train_pmod_llava15.py)."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from configs import train_pmod_llava15
from tests import faults, hf_fixtures
from tokred_jax.io import checkpoint, llava_original, parts, processing
from tokred_jax.io.checkpoint import CheckpointError
from tokred_jax.methods import pmod
from tokred_jax.models.config import ConfigError
from tokred_jax.train import setup as train_setup, trainer

HIDDEN, VISION_HIDDEN, LAYERS = 32, 16, 4


def randomize(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def part_dirs(tmp_path_factory):
  """(llm dir, tower dir, projector file): a tiny Vicuna-like LlamaForCausalLM with its
  tokenizer.json, a tiny full CLIPModel, and mm_projector.safetensors named as LLaVA's
  stage 1 saves mm_projector.bin."""
  root = tmp_path_factory.mktemp("parts")
  llm = root / "vicuna"
  llm.mkdir()
  ids = hf_fixtures._train_tokenizer(llm, add_bos=True)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=320, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=0))
  randomize(model, 0)
  model.save_pretrained(llm)
  tower = root / "clip"
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8),
      vision_config=dict(hidden_size=VISION_HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, image_size=42, patch_size=14),
      projection_dim=8))
  randomize(clip, 1)
  clip.save_pretrained(tower)
  rng = np.random.default_rng(2)
  projector = root / "mm_projector.safetensors"
  safetensors.numpy.save_file({
      "model.mm_projector.0.weight": rng.normal(size=(HIDDEN, VISION_HIDDEN)).astype(np.float32),
      "model.mm_projector.0.bias": rng.normal(size=(HIDDEN,)).astype(np.float32),
      "model.mm_projector.2.weight": rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32),
      "model.mm_projector.2.bias": rng.normal(size=(HIDDEN,)).astype(np.float32)},
      str(projector))
  return llm, tower, projector


def recipe(part_dirs, workdir=None):
  """The p-MoD recipe on the tiny parts, sized for a CPU test."""
  config = train_pmod_llava15.get_config()
  config.model.llm, config.model.vision_tower, config.model.projector = map(str, part_dirs)
  config.model.dtype = "float32"
  config.data.dataset = "synthetic"
  config.data.batch_size, config.data.max_length = 8, 24
  config.num_steps, config.log_every, config.checkpoint_every = 2, 1, 2
  config.mesh = "data=1,fsdp=-1,tensor=1"
  return config


def test_assembled_params_are_the_parts_tensors(part_dirs):
  llm, tower, projector = part_dirs
  config = recipe(part_dirs)
  cfg = trainer.model_config(config)
  # LLaVA-1.5's settings; PRD's layers on the 4-layer LLM.
  assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select == "default"
  assert cfg.vision.pad_to_square and cfg.num_image_tokens == 9
  assert cfg.image_token_id == llava_original.IMAGE_PLACEHOLDER_ID
  assert cfg.text.router_layers == pmod.router_layers(pmod.prd_cosine(LAYERS)) == (1, 2, 3)
  params = trainer.load_params(config, cfg)
  got = {jax.tree_util.keystr(k, simple=True, separator="/"): v
         for k, v in jax.tree_util.tree_leaves_with_path(params)}
  # Each part's tensors, mapped to our layout independently of the loader.
  llm_t = safetensors.numpy.load_file(llm / "model.safetensors")
  clip_t = safetensors.numpy.load_file(tower / "model.safetensors")
  proj_t = safetensors.numpy.load_file(projector)
  np.testing.assert_array_equal(got["llm/embed/embedding"], llm_t["model.embed_tokens.weight"])
  np.testing.assert_array_equal(got["llm/lm_head/kernel"], llm_t["lm_head.weight"].T)
  np.testing.assert_array_equal(got["llm/final_norm/scale"], llm_t["model.norm.weight"])
  for l in range(LAYERS):
    np.testing.assert_array_equal(
        got[f"llm/layers_{l}/mlp/down/kernel"], llm_t[f"model.layers.{l}.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(
        got[f"llm/layers_{l}/attn/q/kernel"].reshape(HIDDEN, HIDDEN),
        llm_t[f"model.layers.{l}.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(got["vision/pos_embed"],
                                clip_t["vision_model.embeddings.position_embedding.weight"])
  np.testing.assert_array_equal(got["vision/layers_1/mlp/fc2/kernel"],
                                clip_t["vision_model.encoder.layers.1.mlp.fc2.weight"].T)
  for ours, theirs in (("linear_1", "0"), ("linear_2", "2")):
    np.testing.assert_array_equal(got[f"projector/{ours}/kernel"],
                                  proj_t[f"model.mm_projector.{theirs}.weight"].T)
    np.testing.assert_array_equal(got[f"projector/{ours}/bias"],
                                  proj_t[f"model.mm_projector.{theirs}.bias"])
  routers = sorted(k for k in got if "/router/" in k)
  assert routers == [f"llm/layers_{l}/router/{n}" for l in (1, 2, 3) for n in ("bias", "kernel")]
  assert not any(got[k].any() for k in routers)  # zero: the dense model at first
  # Every leaf is accounted for: the parts' tensors and the routers, nothing else.
  n_parts = sum(len(t) for t in (proj_t, llm_t)) + sum(k.startswith("vision_model.")
                                                       and "position_ids" not in k for k in clip_t)
  assert len(got) == n_parts + len(routers)


def test_the_recipe_trains_from_parts(part_dirs, tmp_path):
  config = recipe(part_dirs)
  _, history = trainer.train(config, str(tmp_path))
  assert [h["step"] for h in history] == [1, 2]
  assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
  # The export records the trained ratios and ships the tokenizer that fits it.
  cfg, params = checkpoint.load_checkpoint(tmp_path / "export")
  assert cfg.text.router_ratios == pmod.on_layers(pmod.prd_cosine(LAYERS), (1, 2, 3))
  tok = processing.Tokenizer.load(tmp_path / "export", cfg)
  ids = tok.encode(processing.build_prompt("What is shown?"))
  assert ids.count(cfg.image_token_id) == 1 and cfg.image_token_id == 0
  assert params["llm"]["layers_1"]["router"]["kernel"].any()  # the routers trained


def test_projector_as_pytorch_pickle_says_how_to_convert(part_dirs, tmp_path):
  llm, tower, _ = part_dirs
  pickle = tmp_path / "mm_projector.bin"
  torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2)}, pickle)
  with pytest.raises(CheckpointError, match="safetensors.torch") as e:
    parts.check(llm, tower, pickle)
  faults.record("train.py (model from parts)", "model.projector=mm_projector.bin (PyTorch)",
                str(e.value), before="weights load")


@pytest.mark.parametrize("fields, message", [
    (dict(llm=None, vision_tower=None, projector=None), "set model.llm"),
    (dict(projector=None), "model.projector not set"),
    (dict(checkpoint="/models/llava"), "both set"),
])
def test_incomplete_parts_are_refused(part_dirs, fields, message):
  config = recipe(part_dirs)
  for k, v in fields.items():
    config.model[k] = v
  with pytest.raises(ConfigError, match=message) as e:
    trainer.model_config(config)
  faults.record("train.py (model from parts)", json.dumps(fields), str(e.value),
                before="weights load")


def test_a_non_llama_llm_is_refused(part_dirs, tmp_path):
  _, tower, projector = part_dirs
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
  with pytest.raises(CheckpointError, match="Llama") as e:
    parts.check(tmp_path, tower, projector)
  faults.record("train.py (model from parts)", "model.llm=<a Qwen2 directory>", str(e.value),
                before="weights load")


def test_the_tokenizer_gets_the_image_alias_or_a_clear_error(part_dirs, tmp_path):
  config = recipe(part_dirs)
  cfg = trainer.model_config(config)
  tok = train_setup.model_tokenizer(config, cfg)  # the LLM directory's tokenizer.json
  assert tok.encode("<image>")[1:] == [llava_original.IMAGE_PLACEHOLDER_ID]
  config.model.tokenizer = str(tmp_path / "tokenizer.json")
  with pytest.raises(CheckpointError, match="tokenizer.model") as e:
    train_setup.model_tokenizer(config, cfg)
  faults.record("train.py (model from parts)", "model.tokenizer=<missing file>", str(e.value),
                before="weights load")
