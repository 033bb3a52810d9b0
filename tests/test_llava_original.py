"""Original LLaVA / p-MoD checkpoint layout: names, config mapping, tokenizer, errors."""

import dataclasses
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import PIL.Image
import pytest
import safetensors.numpy

from tokred_jax import (checkpoint, llava, llava_original, methods, pmod, processing,
                        reduction)
from tokred_jax.checkpoint import CheckpointError
from tokred_jax.config import VisionConfig

MOD_LAYERS = (1,)
TOWER_NAMES = re.compile(r"^vision_tower\.")


def original_name(hf_name: str, tower_prefix: str) -> str:
  """transformers 5 name -> the original LLaVA repository's, written out independently
  of the library's rename table."""
  if m := re.match(r"language_model\.model\.layers\.(\d+)\.(.*)", hf_name):
    inner = "decoder_layer." if int(m.group(1)) in MOD_LAYERS else ""
    return f"model.layers.{m.group(1)}.{inner}{m.group(2)}"
  for old, new in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                   ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                   ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                   ("vision_tower.", tower_prefix)):
    if hf_name.startswith(old):
      return new + hf_name[len(old):]
  raise AssertionError(hf_name)


def original_config(hf_dir: pathlib.Path, mm_vision_tower: str) -> dict:
  hf = json.loads((hf_dir / "config.json").read_text())
  text = hf["text_config"]
  return dict(
      text, model_type="pmod_llava_llama", architectures=["PmodLlavaLlamaForCausalLM"],
      pad_token_id=0, mm_vision_tower=mm_vision_tower,
      mm_hidden_size=hf["vision_config"]["hidden_size"], mm_projector_type="mlp2x_gelu",
      mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad",
      mm_use_im_start_end=False, mm_patch_merge_type="flat",
      mod_target_layers="shiftedcos_decay_0.85_0.15", mod_target_layer_indices=list(MOD_LAYERS),
      mod_router_factor=0.5, mod_weight_norm="tanh_0.2_1", mod_bias_enabled=True,
      mod_special_init=True, mod_target_token_type="vision_all")


def routers(hidden: int) -> dict:
  rng = np.random.default_rng(7)
  return {l: (rng.normal(size=(1, hidden)).astype(np.float32) * 0.05,
              rng.normal(size=(1,)).astype(np.float32) * 0.1) for l in MOD_LAYERS}


def write_tower_dir(hf_dir, tensors, out: pathlib.Path, with_weights=True):
  out.mkdir()
  vision = json.loads((hf_dir / "config.json").read_text())["vision_config"]
  (out / "config.json").write_text(json.dumps(dict(vision, architectures=["CLIPVisionModel"])))
  if with_weights:
    weights = {"vision_model." + k[len("vision_tower."):]: v for k, v in tensors.items()
               if TOWER_NAMES.match(k)}
    weights["vision_model.embeddings.position_ids"] = np.arange(10)[None]  # old buffer
    safetensors.numpy.save_file(weights, str(out / "model.safetensors"))
  return out


def write_original(hf_dir, out: pathlib.Path, tower: str) -> pathlib.Path:
  """hf_dir's model in the original layout: tower "inside" (sharded weights; the config
  read from a config-only tower dir, as mm_vision_tower names it) or "separate"."""
  out.mkdir()
  hf = safetensors.numpy.load_file(hf_dir / "model.safetensors")
  prefix = "model.vision_tower.vision_tower.vision_model."
  tensors = {original_name(k, prefix): v for k, v in hf.items()
             if tower == "inside" or not TOWER_NAMES.match(k)}
  for l, (w, b) in routers(64).items():
    tensors[f"model.layers.{l}.router.router.weight"] = w
    tensors[f"model.layers.{l}.router.router.bias"] = b
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  if tower == "inside":
    tower_dir = write_tower_dir(hf_dir, hf, out.parent / f"{out.name}-tower-config", False)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
      safetensors.numpy.save_file({n: tensors[n] for n in part}, str(out / file))
    index = {n: f for f, part in shards.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
  else:
    tower_dir = write_tower_dir(hf_dir, hf, out.parent / f"{out.name}-clip")
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"))
  (out / "config.json").write_text(json.dumps(original_config(hf_dir, str(tower_dir))))
  return out


@pytest.fixture(scope="module")
def source(clip_llama_dir):
  """The model the original-layout copies hold: (cfg, params) in our layout."""
  cfg, params = checkpoint.load_checkpoint(clip_llama_dir)
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, router_layers=MOD_LAYERS))
  for l, (w, b) in routers(cfg.text.hidden_size).items():
    params["llm"][f"layers_{l}"]["router"] = {"kernel": w.T, "bias": b}
  return cfg, params


@pytest.fixture(scope="module")
def layouts(clip_llama_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("original")
  return {tower: write_original(clip_llama_dir, root / tower, tower)
          for tower in ("inside", "separate")}


def forward(cfg, params, image_id, seed=0):
  rng = np.random.default_rng(seed)
  n, text = cfg.num_image_tokens, 6
  ids = np.concatenate([rng.integers(3, 280, (2, text)), np.full((2, n), image_id),
                        rng.integers(3, 280, (2, 4))], axis=1).astype(np.int32)
  mask = np.ones(ids.shape, bool)
  mask[0, :3] = False  # left padding in row 0
  ids[0, :3] = cfg.pad_token_id
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
  pixels = rng.normal(size=(2, 42, 42, 3)).astype(np.float32)
  plan = reduction.make_plan(methods.get("pmod", cfg), cfg)
  logits = llava.Llava(cfg).apply({"params": params}, ids, pixels, mask, pos, plan=plan,
                                  counts=plan.counts())
  return np.asarray(logits)[mask]  # Padding (different pad ids) is left out.


@pytest.mark.filterwarnings("ignore:.*tokenizer.model")
@pytest.mark.parametrize("tower", ["inside", "separate"])
def test_load_matches_source(layouts, source, tower):
  src_cfg, src_params = source
  path = layouts[tower]
  tower_path = path.parent / f"{path.name}-clip" if tower == "separate" else None
  cfg, params, tok = llava_original.load_original(path, vision_tower_path=tower_path,
                                                  tokenizer_path=None)
  assert tok is None
  assert cfg.text.router_layers == MOD_LAYERS and cfg.text.router_alpha == 0.2
  assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select == "default"
  assert cfg.vision.pad_to_square and not src_cfg.vision.pad_to_square
  assert cfg.image_token_id == llava_original.IMAGE_PLACEHOLDER_ID != cfg.pad_token_id
  assert cfg.text == src_cfg.text
  assert dataclasses.replace(cfg.vision, pad_to_square=False) == src_cfg.vision
  flat = jax.tree_util.tree_leaves_with_path
  got, want = dict(flat(params)), dict(flat(src_params))
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=jax.tree_util.keystr(key))
  np.testing.assert_allclose(forward(cfg, params, cfg.image_token_id),
                             forward(src_cfg, src_params, src_cfg.image_token_id),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*tokenizer.model")
def test_vision_tower_path_overrides_embedded_tower(layouts, source):
  clip = layouts["separate"].parent / "separate-clip"
  _, params, _ = llava_original.load_original(layouts["inside"], vision_tower_path=clip)
  np.testing.assert_array_equal(params["vision"]["pos_embed"], source[1]["vision"]["pos_embed"])


def test_tokenizer_maps_image_to_placeholder(layouts, clip_llama_dir):
  cfg, _, tok = llava_original.load_original(
      layouts["inside"], tokenizer_path=clip_llama_dir / "tokenizer.json")
  ids = tok.encode(processing.build_prompt("What is this?"))
  assert ids.count(llava_original.IMAGE_PLACEHOLDER_ID) == 1 and ids[0] == 1
  assert max(ids) < cfg.text.vocab_size
  batch = processing.encode_batch(tok, [processing.build_prompt("Hi")], cfg, 9, (64,), 64)
  assert (batch["input_ids"] == cfg.image_token_id).sum() == 9
  # The text "<unk>" no longer reaches the placeholder id (tokenizers matches one added
  # token per id), and a second image token would be refused anyway.
  assert llava_original.IMAGE_PLACEHOLDER_ID not in tok.encode("say <unk>")
  with pytest.raises(ValueError, match="2 <image> tokens"):
    processing.encode_batch(tok, ["<image> <image>"], cfg, 9, (64,), 64)


def test_missing_tokenizer_warns(layouts):
  with pytest.warns(UserWarning, match="tokenizer.model"):
    assert llava_original.load_original(layouts["inside"])[2] is None


def test_config_derives_layers_and_alpha_from_the_schedule():
  d = dict(model_type="pmod_llava_llama", mm_vision_tower="openai/clip-vit-large-patch14-336",
           mm_hidden_size=1024, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
           mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5,
           mod_weight_norm="tanh_0.3_1", mod_bias_enabled=True)
  cfg = llava_original.original_config(d)
  assert cfg.text.router_layers == pmod.router_layers(pmod.prd_cosine(32)) == tuple(range(8, 32))
  assert cfg.text.router_alpha == 0.3 and cfg.num_image_tokens == 576
  assert not cfg.vision.pad_to_square
  interleave = llava_original.original_config(dict(d, mod_target_layers="interleave"))
  assert interleave.text.router_layers == tuple(range(1, 32, 2))
  dense = llava_original.original_config(
      {k: v for k, v in d.items() if not k.startswith("mod_")} | {"model_type": "llava_llama"})
  assert dense.text.router_layers == ()


@pytest.mark.parametrize("change, message", [
    (dict(mm_projector_type="linear"), "mm_projector_type"),
    (dict(mod_weight_norm="sigmoid_1_0"), "mod_weight_norm"),
    (dict(mm_vision_tower="openai/clip-vit-large-patch14-336"), "no vision tower"),
    (dict(intermediate_size=96), "has shape"),
    (dict(image_aspect_ratio="anyres"), "image_aspect_ratio"),
    (dict(model_type="llava"), "model_type"),
])
def test_errors(layouts, tmp_path, change, message):
  path = tmp_path / "ckpt"
  shutil.copytree(layouts["separate"], path)
  d = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps(dict(d, **change)))
  with pytest.raises(CheckpointError, match=message):
    llava_original.load_original(path)


def test_bin_only_checkpoint_asks_for_conversion(layouts, tmp_path):
  shutil.copy(layouts["separate"] / "config.json", tmp_path / "config.json")
  (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(b"")
  with pytest.raises(CheckpointError, match="safetensors.torch.save_file"):
    llava_original.load_original(tmp_path)


def test_pad_to_square_matches_expand2square_reference():
  vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        image_size=42, patch_size=14, pad_to_square=True)
  rng = np.random.default_rng(0)
  for h, w in ((30, 50), (51, 20), (40, 40)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = [int(m * 255) for m in vision.image_mean]
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = image
    resized = np.asarray(PIL.Image.fromarray(canvas).resize((42, 42), PIL.Image.BICUBIC))
    want = (resized / 255.0 - np.asarray(vision.image_mean)) / np.asarray(vision.image_std)
    got = processing.preprocess_images(image, vision)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
