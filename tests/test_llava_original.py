"""Original LLaVA / p-MoD checkpoint layout: names, config mapping, tokenizer, errors."""

import dataclasses
import json
import math
import pathlib
import re
import shutil

import jax
import numpy as np
import PIL.Image
import pytest
import safetensors.numpy

from tests import faults, hf_fixtures
from tokred_jax import methods
from tokred_jax.io import anyres, checkpoint, llava_original, processing
from tokred_jax.io.checkpoint import CheckpointError
from tokred_jax.methods import pmod
from tokred_jax.models import config as config_lib, llava
from tokred_jax.models.config import LlavaConfig, TextConfig, VisionConfig

MOD_LAYERS = (1,)
TOWER_NAMES = re.compile(r"^vision_tower\.")


def original_name(hf_name: str, tower_prefix: str, mod_layers=MOD_LAYERS) -> str:
  """transformers 5 name -> the original LLaVA repository's, written out independently
  of the library's rename table."""
  if m := re.match(r"language_model\.model\.layers\.(\d+)\.router\.(.*)", hf_name):
    return f"model.layers.{m.group(1)}.router.router.{m.group(2)}"
  if m := re.match(r"language_model\.model\.layers\.(\d+)\.(.*)", hf_name):
    inner = "decoder_layer." if int(m.group(1)) in mod_layers else ""
    return f"model.layers.{m.group(1)}.{inner}{m.group(2)}"
  for old, new in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                   ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                   ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                   ("image_newline", "model.image_newline"), ("vision_tower.", tower_prefix)):
    if hf_name.startswith(old):
      return new + hf_name[len(old):]
  raise AssertionError(hf_name)


def original_config(hf_dir: pathlib.Path, mm_vision_tower: str) -> dict:
  """The original config.json of hf_dir's model; for LLaVA-NeXT as llava-v1.6 and
  p-MoD's NeXT training write it, the pinpoints as (width, height) pairs."""
  hf = json.loads((hf_dir / "config.json").read_text())
  text = hf["text_config"]
  d = dict(
      text, model_type="pmod_llava_llama", architectures=["PmodLlavaLlamaForCausalLM"],
      pad_token_id=0, mm_vision_tower=mm_vision_tower,
      mm_hidden_size=hf["vision_config"]["hidden_size"], mm_projector_type="mlp2x_gelu",
      mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad",
      mm_use_im_start_end=False, mm_patch_merge_type="flat",
      # 2 layers: "interleave" routes layer 1 (= MOD_LAYERS) at mod_router_factor.
      mod_target_layers="interleave", mod_target_layer_indices=list(MOD_LAYERS),
      mod_router_factor=0.5, mod_weight_norm="tanh_0.2_1", mod_bias_enabled=True,
      mod_special_init=True, mod_target_token_type="vision_all")
  if hf["model_type"] == "llava_next":
    d.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
             image_grid_pinpoints=[[w, h] for h, w in hf["image_grid_pinpoints"]],
             max_num_patches=None)
  return d


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
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(
      cfg.text, router_layers=MOD_LAYERS, router_ratios=(None, 0.5)))
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
  plan = methods.make_plan(methods.get("pmod", cfg), cfg)
  logits = llava.Llava(cfg).apply({"params": params}, ids, pixels, mask, pos, plan=plan,
                                  counts=plan.counts())
  return np.asarray(logits)[mask]  # Padding (different pad ids) is left out.


def _assert_same_params(params, src_params):
  """The same tree, every tensor equal to the letter."""
  flat = jax.tree_util.tree_leaves_with_path
  got, want = dict(flat(params)), dict(flat(src_params))
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=jax.tree_util.keystr(key))


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
  _assert_same_params(params, src_params)
  np.testing.assert_allclose(forward(cfg, params, cfg.image_token_id),
                             forward(src_cfg, src_params, src_cfg.image_token_id),
                             rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def clip_model_dir(clip_llama_dir, tmp_path_factory):
  """A full CLIPModel (text and vision halves, as openai/clip-vit-large-patch14-336 ships)
  saved by transformers, its vision half the fixture's tower."""
  import torch
  import transformers
  vision = json.loads((clip_llama_dir / "config.json").read_text())["vision_config"]
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8),
      vision_config=vision, projection_dim=8)
  model = transformers.CLIPModel(config)
  tensors = safetensors.numpy.load_file(clip_llama_dir / "model.safetensors")
  tower = {"vision_model." + k[len("vision_tower."):]: torch.from_numpy(v)
           for k, v in tensors.items() if TOWER_NAMES.match(k)}
  missing, unexpected = model.load_state_dict(tower, strict=False)
  assert not unexpected and not [m for m in missing if m.startswith("vision_model.")
                                 and not m.endswith("position_ids")]
  out = tmp_path_factory.mktemp("clip_model")
  model.save_pretrained(out)
  return out


@pytest.mark.filterwarnings("ignore:.*tokenizer.model")
def test_clip_model_tower_directory(layouts, source, clip_model_dir):
  assert json.loads((clip_model_dir / "config.json").read_text())["model_type"] == "clip"
  src_cfg, src_params = source
  cfg, params, _ = llava_original.load_original(layouts["separate"],
                                                vision_tower_path=clip_model_dir)
  assert dataclasses.replace(cfg.vision, pad_to_square=False) == src_cfg.vision
  _assert_same_params(params, src_params)
  # Also as mm_vision_tower names it, with no vision_tower_path.
  d = json.loads((layouts["separate"] / "config.json").read_text())
  named = llava_original.original_config(dict(d, mm_vision_tower=str(clip_model_dir)))
  assert named.vision == cfg.vision


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
  # PRD's defaults (max 0.85, min 0.15, factor 0.5) are our cosine schedule on 32 layers.
  assert cfg.text.router_ratios == pytest.approx(pmod.prd_cosine(32), abs=1e-12)
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
    (dict(image_aspect_ratio="anyres_max_9"), "image_aspect_ratio"),
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


# ---------------------------------------------------------------- p-MoD schedules
# A 32-layer LLM (the depth the official decays are written for) with 64 visual tokens,
# so that schedules differ in the kept counts they give.
SCHEDULE_CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        image_size=56, patch_size=7),
    text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=32,
                    num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=128),
    image_token_id=3, pad_token_id=2)


def official_ratios(target: str, factor: float, num_layers: int) -> dict[int, float]:
  """p-MoD's build_mod_layers / ModLayer, restated: routed layer -> its kept ratio."""
  if m := re.fullmatch(r"(\w+)_decay_(\d+\.\d+)_(\d+\.\d+)", target):
    decay = {"shiftedcos": lambda l: math.cos(l * math.pi / 31) / 2 + factor,
             "shiftedlinear": lambda l: -l / 31 + 0.5 + factor}[m.group(1)]
    return {l: max(decay(l), float(m.group(3))) for l in range(num_layers)
            if decay(l) <= float(m.group(2))}
  layers = {"deep_all": range(2, num_layers - 1), "deep_all_include_last": range(2, num_layers),
            "interleave": range(1, num_layers, 2)}[target]
  return {l: factor for l in layers}


def official_kept(num_visual: int, ratio: float) -> int:
  """ModLayer.forward's top-k size: torch.trunc(int lengths * ratio), in float32."""
  return int(np.trunc(np.float32(num_visual) * np.float32(ratio)))


@pytest.fixture(scope="module")
def schedule_params():
  """Random weights for SCHEDULE_CFG (drawn with numpy: no 32-layer init to compile)."""
  rng = np.random.default_rng(3)
  return jax.tree_util.tree_map(lambda shape: rng.normal(size=shape).astype(np.float32),
                                checkpoint.param_shapes(SCHEDULE_CFG),
                                is_leaf=lambda x: isinstance(x, tuple))


def write_schedule_checkpoint(out: pathlib.Path, params, mod: dict) -> pathlib.Path:
  """SCHEDULE_CFG in the original layout with the p-MoD settings `mod` (config.json
  fields) and random routers on the layers they route; the tower inside, its config in
  a CLIPVisionModel directory that mm_vision_tower names."""
  layers = sorted(official_ratios(mod["mod_target_layers"], mod["mod_router_factor"], 32))
  cfg = dataclasses.replace(SCHEDULE_CFG, text=dataclasses.replace(
      SCHEDULE_CFG.text, router_layers=tuple(layers)))
  rng = np.random.default_rng(len(layers))
  params = {**params, "llm": dict(params["llm"])}
  for l in layers:
    params["llm"][f"layers_{l}"] = dict(params["llm"][f"layers_{l}"], router={
        "kernel": rng.normal(size=(16, 1)).astype(np.float32),
        "bias": rng.normal(size=(1,)).astype(np.float32)})
  out.mkdir()
  prefix = "model.vision_tower.vision_tower.vision_model."
  safetensors.numpy.save_file(
      {original_name(k, prefix, layers): v
       for k, v in checkpoint.to_hf_tensors(cfg, params).items()}, str(out / "model.safetensors"))
  hf = config_lib.to_hf_dict(cfg)
  tower = out / "tower"
  tower.mkdir()
  (tower / "config.json").write_text(json.dumps(hf["vision_config"]))
  (out / "config.json").write_text(json.dumps(dict(
      {k: v for k, v in hf["text_config"].items() if not k.startswith("mod_")},
      model_type="pmod_llava_llama", mm_vision_tower=str(tower), mm_hidden_size=16,
      mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, image_aspect_ratio="pad",
      mod_weight_norm="tanh_0.2_1", mod_bias_enabled=True, mod_target_token_type="vision_all",
      mod_target_layer_indices=layers, **mod)))
  return out


@pytest.mark.filterwarnings("ignore:.*tokenizer.model")
@pytest.mark.parametrize("target, factor", [
    ("shiftedcos_decay_0.85_0.15", 0.4),  # mod_router_factor shifts the cosine
    ("shiftedcos_decay_0.85_0.3", 0.5),  # a minimum ratio above PRD's 0.15
    ("shiftedlinear_decay_0.75_0.25", 0.5),
    ("deep_all", 0.3),
    ("deep_all_include_last", 0.4),
    ("interleave", 0.6),
])
def test_loaded_schedule_keeps_the_trained_counts(tmp_path, schedule_params, target, factor):
  path = write_schedule_checkpoint(tmp_path / "ckpt", schedule_params,
                                   dict(mod_target_layers=target, mod_router_factor=factor))
  cfg, _, _ = llava_original.load_original(path)
  official = official_ratios(target, factor, 32)
  n = cfg.num_image_tokens
  assert n == 64 and cfg.text.router_layers == tuple(sorted(official))
  want = tuple(official_kept(n, official[l]) if l in official else n for l in range(32))
  # visual_per_layer: the exact visual tokens each layer processes.
  plan = methods.make_plan(methods.get("pmod", cfg), cfg)
  assert plan.visual_per_layer == want
  # The default PRD on the same layers would run other counts: the schedule matters.
  default = methods.make_plan(methods.get("pmod", cfg, schedule="cosine"), cfg)
  assert default.visual_per_layer != want
  # The ratios survive a save in our layout.
  assert config_lib.from_hf_dict(config_lib.to_hf_dict(cfg)).text == cfg.text


@pytest.mark.parametrize("change, message, case", [
    (dict(mod_router_factor=1.5), r"ratio 1\.5 .* layer 1", "mod_router_factor=1.5"),
    (dict(mod_router_factor=-0.6, mod_target_layers="shiftedcos_decay_0.5_0.0",
          mod_target_layer_indices=None), "ratio 0 .* layer 0",
     "mod_target_layers='shiftedcos_decay_0.5_0.0', mod_router_factor=-0.6 (no token kept)"),
    (dict(mod_target_layer_indices=[0]), "disagree",
     "mod_target_layer_indices other than the layers mod_target_layers routes"),
    (dict(mod_router_factor="half"), "not a number", "mod_router_factor='half'"),
    (dict(mod_target_layers="every_third"), "not one the official",
     "mod_target_layers='every_third'"),
    (dict(mod_target_layers=None), "mod_target_layers None",
     "mod_target_layer_indices without mod_target_layers"),
])
def test_schedule_errors(layouts, tmp_path, change, message, case):
  path = tmp_path / "ckpt"
  shutil.copytree(layouts["separate"], path)
  d = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps(dict(d, **change)))
  with pytest.raises(CheckpointError, match=message) as e:
    llava_original.load_original(path)
  faults.record("llava_original.load_original", case, str(e.value), before="weights load")


# ---------------------------------------------------------------- LLaVA-NeXT (anyres)
@pytest.fixture(scope="module")
def next_layout(llava_next_dir, tmp_path_factory):
  """The LLaVA-NeXT fixture (saved by transformers' LlavaNextForConditionalGeneration) in
  p-MoD's NeXT layout, with routers; its tower in a CLIPVisionModel directory."""
  return write_original(llava_next_dir, tmp_path_factory.mktemp("original_next") / "next",
                        "separate")


@pytest.mark.filterwarnings("ignore:.*tokenizer.model")
def test_next_load_matches_transformers_checkpoint(next_layout, llava_next_dir):
  src_cfg, src_params = checkpoint.load_checkpoint(llava_next_dir)
  for l, (w, b) in routers(src_cfg.text.hidden_size).items():
    src_params["llm"][f"layers_{l}"]["router"] = {"kernel": w.T, "bias": b}
  cfg, params, _ = llava_original.load_original(next_layout)
  assert cfg.arch == src_cfg.arch == "llava_next"
  # The original (width, height) pairs come back as transformers' (height, width) ones.
  assert cfg.image_grid_pinpoints == tuple(map(tuple, hf_fixtures.NEXT_PINPOINTS))
  assert cfg.vision == src_cfg.vision and not cfg.vision.pad_to_square
  assert cfg.text == dataclasses.replace(src_cfg.text, router_layers=MOD_LAYERS,
                                         router_ratios=(None, 0.5))
  assert (cfg.vision_feature_layer, cfg.vision_feature_select) == (-2, "default")
  assert cfg.template == "vicuna_v1" and cfg.vision_aspect_ratio == "anyres"
  _assert_same_params(params, src_params)
  saved = safetensors.numpy.load_file(llava_next_dir / "model.safetensors")["image_newline"]
  np.testing.assert_array_equal(params["image_newline"], saved)


NEXT_DICT = dict(  # llava-v1.6-vicuna-7b's multimodal fields, with p-MoD's PRD settings
    model_type="pmod_llava_llama", mm_vision_tower="openai/clip-vit-large-patch14-336",
    mm_hidden_size=1024, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
    image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5,
    mod_weight_norm="tanh_0.2_1", mod_bias_enabled=True, mod_target_token_type="vision_all")
V16_HW = ((672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336))


@pytest.mark.parametrize("pinpoints, want", [
    (NEXT_DICT["image_grid_pinpoints"], V16_HW),
    ("[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]", V16_HW),
    ("[[336, 1008]]", ((1008, 336),)),
    # LLaVA-VL's range: grids (columns x rows) from the first to the last, columns major.
    ("(1x1),...,(2x3)", ((336, 336), (672, 336), (1008, 336),
                         (336, 672), (672, 672), (1008, 672))),
])
def test_next_config_fields(pinpoints, want):
  cfg = llava_original.original_config(dict(NEXT_DICT, image_grid_pinpoints=pinpoints))
  assert cfg.arch == "llava_next" and cfg.image_grid_pinpoints == want
  assert cfg.num_image_tokens == 576 and not cfg.vision.pad_to_square
  assert cfg.text.router_ratios == pytest.approx(pmod.prd_cosine(32), abs=1e-12)
  assert cfg.text.router_layers == tuple(range(8, 32)) and cfg.text.router_alpha == 0.2


def original_grid_shape(size_wh, pinpoints_wh, crop):
  """mm_utils.get_anyres_image_grid_shape / select_best_resolution of the original code,
  restated: (width, height) in and out."""
  width, height = size_wh
  best, best_effective, best_waste = None, 0, float("inf")
  for w, h in pinpoints_wh:
    scale = min(w / width, h / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    waste = w * h - effective
    if effective > best_effective or (effective == best_effective and waste < best_waste):
      best, best_effective, best_waste = (w, h), effective, waste
  return best[0] // crop, best[1] // crop


def test_next_pinpoints_pick_the_original_grids():
  """Every grid the original code cuts an image into is the one our (h, w) pinpoints give,
  ties between transposed grids (small or square images) included."""
  original = NEXT_DICT["image_grid_pinpoints"]
  cfg = llava_original.original_config(NEXT_DICT)
  sizes = [(h, w) for h in (100, 300, 336, 500, 700, 1000, 2000) for w in (100, 300, 336, 700)]
  ours = [anyres.grid_shape(hw, cfg.image_grid_pinpoints, 336) for hw in sizes]
  assert ours == [original_grid_shape(hw[::-1], original, 336)[::-1] for hw in sizes]
  # Read as (height, width) unswapped, square images below 336 px would tile the other way.
  assert ours != [anyres.grid_shape(hw, original, 336) for hw in sizes]


DROP = object()


@pytest.mark.parametrize("change, message, case", [
    (dict(mm_patch_merge_type="spatial"), "only 'spatial_unpad'",
     "image_aspect_ratio='anyres', mm_patch_merge_type='spatial'"),
    (dict(mm_patch_merge_type=DROP), "mm_patch_merge_type 'flat'",
     "image_aspect_ratio='anyres' without mm_patch_merge_type"),
    (dict(image_aspect_ratio="anyres_max_9"), "image_aspect_ratio 'anyres_max_9'",
     "image_aspect_ratio='anyres_max_9'"),
    (dict(max_num_patches=9), "max_num_patches 9", "anyres with max_num_patches=9"),
    (dict(mod_target_token_type=DROP), "'vision_hr'",
     "anyres without mod_target_token_type (official default: 'vision_hr')"),
    (dict(image_grid_pinpoints=DROP), "image_grid_pinpoints None is missing",
     "anyres without image_grid_pinpoints"),
    (dict(image_grid_pinpoints=[[28, 42]]), "whole number of the tower's 28 px",
     "image_grid_pinpoints=[[28, 42]] (28 px crops)"),
    (dict(image_grid_pinpoints="[(28, 56), (56,)]"), r"entry \(56,\) is not",
     "image_grid_pinpoints='[(28, 56), (56,)]'"),
    (dict(image_grid_pinpoints="[(28, 56"), "not a list of",
     "image_grid_pinpoints='[(28, 56' (unparsable)"),
    (dict(image_grid_pinpoints="(AxB)"), "names no", "image_grid_pinpoints='(AxB)'"),
])
def test_next_errors(next_layout, tmp_path, change, message, case):
  path = tmp_path / "ckpt"
  shutil.copytree(next_layout, path)
  d = json.loads((path / "config.json").read_text())
  d = {k: v for k, v in dict(d, **change).items() if v is not DROP}
  (path / "config.json").write_text(json.dumps(d))
  with pytest.raises(CheckpointError, match=message) as e:
    llava_original.load_original(path)
  faults.record("llava_original.load_original", case, str(e.value), before="weights load")


def test_next_without_image_newline(next_layout, tmp_path):
  path = tmp_path / "ckpt"
  shutil.copytree(next_layout, path)
  tensors = safetensors.numpy.load_file(path / "model.safetensors")
  del tensors["model.image_newline"]
  safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="holds no model.image_newline") as e:
    llava_original.load_original(path)
  faults.record("llava_original.load_original", "LLaVA-NeXT weights without model.image_newline",
                str(e.value), before="weights load")
