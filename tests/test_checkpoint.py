"""Hugging Face checkpoint loading and saving, checked against transformers itself."""

import dataclasses
import json
import pathlib
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from tests import faults
from tokred_jax.io import checkpoint
from tokred_jax.io.checkpoint import CheckpointError

FIXTURES = ["clip_llama_dir", "siglip_qwen2_dir", "published_dir"]


def _hf_model(path):
  model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      path, output_loading_info=True)
  problems = {k: v for k, v in info.items() if v}
  assert not problems, problems
  return model


def _hf_state(path) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in _hf_model(path).state_dict().items()}


def _copy(src, tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(src, tmp_path / "ckpt"))


def _tree_map(fn, tree):
  return {k: _tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}/")
    else:
      yield prefix + key, value


# An independent, hand-written inverse of the loader's table: what transformers' in-memory
# tensor `name` must equal, rebuilt from our tree.
def _as_hf(params, name):
  vision, llm = params["vision"], params["llm"]
  if m := re.fullmatch(r"model\.vision_tower\.encoder\.layers\.(\d+)\.(.+)", name):
    layer, rest = vision[f"layers_{m[1]}"], m[2]
    d = layer["ln1"]["scale"].shape[0]
    table = {
        "layer_norm1.weight": layer["ln1"]["scale"], "layer_norm1.bias": layer["ln1"]["bias"],
        "layer_norm2.weight": layer["ln2"]["scale"], "layer_norm2.bias": layer["ln2"]["bias"],
        "mlp.fc1.weight": layer["mlp"]["fc1"]["kernel"].T,
        "mlp.fc1.bias": layer["mlp"]["fc1"]["bias"],
        "mlp.fc2.weight": layer["mlp"]["fc2"]["kernel"].T,
        "mlp.fc2.bias": layer["mlp"]["fc2"]["bias"],
        "self_attn.out_proj.weight": layer["attn"]["o"]["kernel"].reshape(-1, d).T,
        "self_attn.out_proj.bias": layer["attn"]["o"]["bias"],
    }
    for p in "qkv":
      table[f"self_attn.{p}_proj.weight"] = layer["attn"][p]["kernel"].reshape(d, -1).T
      table[f"self_attn.{p}_proj.bias"] = layer["attn"][p]["bias"].reshape(-1)
    return table[rest]
  if m := re.fullmatch(r"model\.language_model\.layers\.(\d+)\.(.+)", name):
    layer, rest = llm[f"layers_{m[1]}"], m[2]
    d = layer["attn_norm"]["scale"].shape[0]
    table = {
        "input_layernorm.weight": layer["attn_norm"]["scale"],
        "post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
        "self_attn.o_proj.weight": layer["attn"]["o"]["kernel"].reshape(-1, d).T,
    }
    for p in ("gate", "up", "down"):
      table[f"mlp.{p}_proj.weight"] = layer["mlp"][p]["kernel"].T
    for p in "qkv":
      table[f"self_attn.{p}_proj.weight"] = layer["attn"][p]["kernel"].reshape(d, -1).T
      if "bias" in layer["attn"][p]:
        table[f"self_attn.{p}_proj.bias"] = layer["attn"][p]["bias"].reshape(-1)
    return table[rest]
  if m := re.fullmatch(r"model\.multi_modal_projector\.(linear_\d)\.(weight|bias)", name):
    linear = params["projector"][m[1]]
    return linear["kernel"].T if m[2] == "weight" else linear["bias"]
  lm_head = llm["lm_head"]["kernel"].T if "lm_head" in llm else llm["embed"]["embedding"]
  return {
      "model.vision_tower.embeddings.class_embedding": vision.get("cls"),
      "model.vision_tower.embeddings.position_embedding.weight": vision["pos_embed"],
      "model.vision_tower.embeddings.patch_embedding.bias":
          vision["patch_embed"].get("bias"),
      "model.vision_tower.pre_layrnorm.weight": vision.get("pre_ln", {}).get("scale"),
      "model.vision_tower.pre_layrnorm.bias": vision.get("pre_ln", {}).get("bias"),
      "model.vision_tower.post_layernorm.weight": vision["post_ln"]["scale"],
      "model.vision_tower.post_layernorm.bias": vision["post_ln"]["bias"],
      "model.language_model.embed_tokens.weight": llm["embed"]["embedding"],
      "model.language_model.norm.weight": llm["final_norm"]["scale"],
      "lm_head.weight": lm_head,
  }[name]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_load_matches_transformers(fixture, request):
  path = request.getfixturevalue(fixture)
  cfg, params = checkpoint.load_checkpoint(path)
  model = _hf_model(path)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  # A tied lm_head shows in transformers' state_dict but is no leaf of ours.
  assert sum(1 for _ in _leaves(params)) == len(state) - int(cfg.text.tie_word_embeddings)
  for name, value in state.items():
    if name.endswith("patch_embedding.weight"):
      continue  # Checked by what the convolution computes, below.
    np.testing.assert_array_equal(_as_hf(params, name), value, err_msg=name)
  for _, leaf in _leaves(params):
    assert leaf.dtype == np.float32 and leaf.flags.c_contiguous
  assert checkpoint.param_shapes(cfg) == _tree_map(np.shape, params)

  # Our patch kernel applied to NHWC patches flattened (p1 p2 c) equals HF's conv.
  v = cfg.vision
  pixels = np.random.default_rng(0).normal(size=(1, v.image_size, v.image_size, 3))
  pixels = pixels.astype(np.float32)
  patches = pixels.reshape(1, v.grid, v.patch_size, v.grid, v.patch_size, 3)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(1, v.num_patches, -1)
  ours = patches @ params["vision"]["patch_embed"]["kernel"]
  ours += params["vision"]["patch_embed"].get("bias", 0)
  with torch.no_grad():
    conv = model.model.vision_tower.embeddings.patch_embedding(
        torch.from_numpy(pixels).permute(0, 3, 1, 2))
  np.testing.assert_allclose(ours, conv.flatten(2).transpose(1, 2).numpy(), atol=1e-5)


def test_sparse_config_takes_class_defaults(published_dir):
  cfg = checkpoint.read_config(published_dir)
  hf = transformers.LlavaConfig.from_pretrained(published_dir)
  v, t, hv, ht = cfg.vision, cfg.text, hf.vision_config, hf.text_config
  # Left out of the sparse config.json: these come from the config-class defaults.
  assert (v.hidden_act, v.layer_norm_eps, v.num_channels) == ("quick_gelu", 1e-5, 3)
  assert (t.rope_theta, t.bos_token_id, t.eos_token_id) == (10000.0, 1, 2)
  assert (t.attention_bias, t.tie_word_embeddings, t.head_dim) == (False, False, 16)
  assert (v.hidden_act, v.layer_norm_eps) == (hv.hidden_act, hv.layer_norm_eps)
  assert t.rope_theta == ht.rope_parameters["rope_theta"]
  assert (t.bos_token_id, t.eos_token_id) == (ht.bos_token_id, ht.eos_token_id)
  # Written explicitly.
  assert (t.vocab_size, t.num_heads, t.num_kv_heads, t.rms_norm_eps) == (320, 4, 2, 1e-5)
  assert (t.max_position_embeddings, cfg.image_token_id) == (512, hf.image_token_index)
  assert (cfg.pad_token_id, cfg.vision_feature_layer, cfg.num_image_tokens) == (
      hf.pad_token_id, -2, 9)


# config.json of llava-hf/llava-1.5-7b-hf as published (transformers 4.36, sparse).
LLAVA_15_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
    "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
        "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16,
        "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


def test_published_7b_config_shapes(tmp_path):
  """Our tree for llava-1.5-7b-hf has as many weights as transformers builds (no memory)."""
  (tmp_path / "config.json").write_text(json.dumps(LLAVA_15_7B_CONFIG))
  cfg = checkpoint.read_config(tmp_path)
  shapes = checkpoint.param_shapes(cfg)
  leaves = [shape for _, shape in _leaves(shapes)]
  with torch.device("meta"):
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig.from_pretrained(tmp_path))
  hf = [tuple(p.shape) for p in model.parameters()]
  assert len(leaves) == len(hf) == 686
  assert sum(map(np.prod, leaves)) == sum(map(np.prod, hf)) == 7_063_427_072
  assert shapes["vision"]["pos_embed"] == (577, 1024)
  assert shapes["vision"]["patch_embed"]["kernel"] == (14 * 14 * 3, 1024)
  assert shapes["llm"]["layers_31"]["attn"]["q"]["kernel"] == (4096, 32, 128)
  assert shapes["llm"]["lm_head"]["kernel"] == (4096, 32064)
  assert cfg.num_image_tokens == 576


@pytest.mark.parametrize("fixture", FIXTURES)
def test_save_loads_in_transformers(fixture, request, tmp_path):
  path = request.getfixturevalue(fixture)
  cfg, params = checkpoint.load_checkpoint(path)
  out = tmp_path / "saved"
  checkpoint.save_checkpoint(out, cfg, params, tokenizer_json_path=path / "tokenizer.json")
  assert sorted(p.name for p in out.iterdir()) == [
      "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
  original, saved = _hf_state(path), _hf_state(out)
  assert original.keys() == saved.keys()
  for name in original:
    np.testing.assert_array_equal(saved[name], original[name], err_msg=name)
  # The file holds exactly the names transformers 5 writes for a fresh model (a loaded
  # one is written back in the layout it was read from).
  written = safetensors.numpy.load_file(out / "model.safetensors")
  fresh = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_pretrained(out))
  fresh.save_pretrained(tmp_path / "by_transformers")
  expected = safetensors.numpy.load_file(tmp_path / "by_transformers" / "model.safetensors")
  assert written.keys() == expected.keys()
  generation = json.loads((out / "generation_config.json").read_text())
  assert generation.get("eos_token_id") == cfg.text.eos_token_id
  assert generation["pad_token_id"] == cfg.pad_token_id
  cfg2, params2 = checkpoint.load_checkpoint(out)
  assert cfg2 == cfg
  for (k, a), (k2, b) in zip(_leaves(params), _leaves(params2)):
    assert k == k2
    np.testing.assert_array_equal(a, b)


def test_save_without_projector_bias(clip_llama_dir, tmp_path):
  cfg, params = checkpoint.load_checkpoint(clip_llama_dir)
  cfg = dataclasses.replace(cfg, projector_bias=False)
  for linear in params["projector"].values():
    del linear["bias"]
  checkpoint.save_checkpoint(tmp_path / "nobias", cfg, params)
  model = _hf_model(tmp_path / "nobias")
  assert model.model.multi_modal_projector.linear_1.bias is None
  assert checkpoint.load_checkpoint(tmp_path / "nobias")[0].projector_bias is False


def test_bfloat16_round_trip(siglip_qwen2_dir, tmp_path):
  cfg, params = checkpoint.load_checkpoint(siglip_qwen2_dir, dtype=jnp.bfloat16)
  checkpoint.save_checkpoint(tmp_path / "bf16", cfg, params)
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  _, again = checkpoint.load_checkpoint(tmp_path / "bf16", dtype=None)
  for (_, a), (_, b) in zip(_leaves(params), _leaves(again)):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b)


def test_reads_in_memory_layout_sharded(clip_llama_dir, tmp_path):
  """Layout (c), transformers 4.5x names, split over two shards with an index."""
  cfg, params = checkpoint.load_checkpoint(clip_llama_dir)
  out = tmp_path / "sharded"
  out.mkdir()
  shutil.copy(clip_llama_dir / "config.json", out)
  renamed = {
      re.sub(r"^language_model\.model\.", "model.language_model.",
             re.sub(r"^language_model\.lm_head", "lm_head",
                    re.sub(r"^(vision_tower)\.", r"model.\1.vision_model.",
                           re.sub(r"^multi_modal_projector", "model.multi_modal_projector", k)
                           ))): v
      for k, v in safetensors.numpy.load_file(clip_llama_dir / "model.safetensors").items()}
  names = sorted(renamed)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for shard, keys in shards.items():
    safetensors.numpy.save_file({k: renamed[k] for k in keys}, out / shard,
                                metadata={"format": "pt"})
  weight_map = {k: shard for shard, keys in shards.items() for k in keys}
  (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  assert "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in weight_map
  cfg2, params2 = checkpoint.load_checkpoint(out)
  assert cfg2 == cfg
  for (k, a), (k2, b) in zip(_leaves(params), _leaves(params2)):
    assert k == k2
    np.testing.assert_array_equal(a, b)


def test_ignores_unused_tensors(siglip_qwen2_dir, tmp_path):
  path = _copy(siglip_qwen2_dir, tmp_path)
  tensors = safetensors.numpy.load_file(path / "model.safetensors")
  tensors["vision_tower.head.probe"] = np.zeros((1, 1, 32), np.float32)
  tensors["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"]
  safetensors.numpy.save_file(tensors, path / "model.safetensors")
  _, params = checkpoint.load_checkpoint(path)
  assert "lm_head" not in params["llm"]


def _snapshot(path):
  return {p.name: p.read_bytes() for p in path.iterdir()}


def test_failed_save_keeps_old_checkpoint(clip_llama_dir, tmp_path, monkeypatch):
  cfg, params = checkpoint.load_checkpoint(clip_llama_dir)
  target = tmp_path / "ckpt"
  checkpoint.save_checkpoint(target, cfg, params)
  (target / "preprocessor_config.json").write_text("{}")
  before = _snapshot(target)

  def fail(*args, **kwargs):
    del args, kwargs
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", fail)
  params["llm"]["final_norm"]["scale"] = params["llm"]["final_norm"]["scale"] * 2
  with pytest.raises(OSError, match="disk full"):
    checkpoint.save_checkpoint(target, cfg, params)
  assert _snapshot(target) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # No temporary left.

  monkeypatch.undo()
  checkpoint.save_checkpoint(target, cfg, params)
  assert (target / "preprocessor_config.json").read_text() == "{}"  # Carried over.
  _, again = checkpoint.load_checkpoint(target)
  np.testing.assert_array_equal(again["llm"]["final_norm"]["scale"],
                                params["llm"]["final_norm"]["scale"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_rejects_bad_targets_and_params(clip_llama_dir, tmp_path):
  cfg, params = checkpoint.load_checkpoint(clip_llama_dir)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("x")
  with pytest.raises(CheckpointError, match="not a checkpoint directory"):
    checkpoint.save_checkpoint(tmp_path / "notes", cfg, params)
  with pytest.raises(CheckpointError, match="tokenizer file"):
    checkpoint.save_checkpoint(tmp_path / "a", cfg, params, tmp_path / "none.json")
  del params["llm"]["layers_1"]["mlp"]
  with pytest.raises(CheckpointError, match="missing llm/layers_1/mlp/down/kernel"):
    checkpoint.save_checkpoint(tmp_path / "b", cfg, params)
  _, params = checkpoint.load_checkpoint(clip_llama_dir)
  params["vision"]["cls"] = np.zeros(7, np.float32)
  with pytest.raises(CheckpointError, match=r"vision/cls has shape \(7,\)"):
    checkpoint.save_checkpoint(tmp_path / "c", cfg, params)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def _edit_config(path, edit):
  d = json.loads((path / "config.json").read_text())
  edit(d)
  (path / "config.json").write_text(json.dumps(d))


def _edit_tensors(path, edit):
  tensors = safetensors.numpy.load_file(path / "model.safetensors")
  edit(tensors)
  safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _shard(path):
  tensors = safetensors.numpy.load_file(path / "model.safetensors")
  (path / "model.safetensors").unlink()
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[:10], names[10:])):
    shard = f"model-0000{i + 1}-of-00002.safetensors"
    safetensors.numpy.save_file({k: tensors[k] for k in part}, path / shard)
    weight_map.update(dict.fromkeys(part, shard))
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _add_to_index(path, name):
  index = json.loads((path / "model.safetensors.index.json").read_text())
  index["weight_map"][name] = "model-00001-of-00002.safetensors"
  (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _truncate(file):
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])


def _set_hidden(d):
  d["text_config"]["hidden_size"] = 128


def _set_layers(d):
  d["text_config"]["num_hidden_layers"] = 1


def _pop_projector_bias(t):
  del t["multi_modal_projector.linear_2.bias"]


def _add_stray_tensor(t):
  t["vision_tower.extra.weight"] = np.zeros(2, np.float32)


def _as_int32(t):
  name = "language_model.model.layers.0.mlp.up_proj.weight"
  t[name] = t[name].astype(np.int32)


def _plant(value):
  def plant(t):
    name = "multi_modal_projector.linear_1.weight"
    x = t[name].copy()
    x.flat[7] = value
    t[name] = x
  return plant


ERROR_CASES = {
    "missing dir": (lambda p: shutil.rmtree(p), "does not exist"),
    "no config": (lambda p: (p / "config.json").unlink(), "has no config.json"),
    "garbage config": (lambda p: (p / "config.json").write_text("{not json"),
                       "config.json is not valid JSON"),
    "config not an object": (lambda p: (p / "config.json").write_text("[1, 2]"),
                             "holds a JSON list"),
    "unsupported config": (lambda p: _edit_config(p, lambda d: d.update(model_type="bert")),
                           "not a LLaVA checkpoint"),
    "no weights": (lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin"),
                   "neither model.safetensors nor .*re-save them as safetensors"),
    "truncated weights": (lambda p: _truncate(p / "model.safetensors"),
                          "model.safetensors.*truncated or corrupt"),
    "missing shard": (lambda p: (_shard(p), (p / "model-00002-of-00002.safetensors").unlink()),
                      "names shard.*model-00002-of-00002.safetensors.*download"),
    "truncated shard": (lambda p: (_shard(p), _truncate(p / "model-00001-of-00002.safetensors")),
                        "model-00001-of-00002.safetensors.*truncated or corrupt"),
    "index lists absent tensor": (lambda p: (_shard(p), _add_to_index(p, "extra.weight")),
                                  "lists tensors its shards do not hold: extra.weight"),
    "broken index": (lambda p: (_shard(p), (p / "model.safetensors.index.json").write_text("{}")),
                     "no 'weight_map'"),
    "shape mismatch": (lambda p: _edit_config(p, _set_hidden),
                       r"tensor 'multi_modal_projector.linear_1.weight' has shape \(64, 32\) "
                       r"but config.json implies \(128, 32\) = "
                       r"\(text hidden_size, vision hidden_size\).*weights disagree"),
    "fewer layers in config": (lambda p: _edit_config(p, _set_layers),
                               "does not use: language_model.model.layers.1"),
    "missing tensor": (lambda p: _edit_tensors(p, _pop_projector_bias),
                       "lacks 1 tensor.*multi_modal_projector.linear_2.bias"),
    "unexpected tensor": (lambda p: _edit_tensors(p, _add_stray_tensor),
                          "does not use: vision_tower.extra.weight"),
    "int32 weights": (lambda p: _edit_tensors(p, _as_int32),
                      "tensor 'language_model.model.layers.0.mlp.up_proj.weight' in .* is "
                      "stored as I32, but weights are floating point"),
    "a NaN weight": (lambda p: _edit_tensors(p, _plant(np.nan)),
                     "tensor 'multi_modal_projector.linear_1.weight' in .* holds 1 NaN or "
                     "infinite value"),
    "an infinite weight": (lambda p: _edit_tensors(p, _plant(-np.inf)),
                           "tensor 'multi_modal_projector.linear_1.weight' .* holds 1 NaN"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_load_errors(case, clip_llama_dir, tmp_path):
  path = _copy(clip_llama_dir, tmp_path)
  damage, message = ERROR_CASES[case]
  damage(path)
  files = _snapshot(path) if path.exists() else None
  with pytest.raises(CheckpointError, match=message) as e:
    checkpoint.load_checkpoint(path)
  assert (_snapshot(path) if path.exists() else None) == files
  faults.record("load_checkpoint", case, str(e.value).replace(str(path), "DIR"),
                before="any compute", intact="checkpoint files")


def test_huge_finite_weights_are_kept(clip_llama_dir, tmp_path):
  """Values whose float32 sum overflows are finite: the cheap test must not refuse them."""
  path = _copy(clip_llama_dir, tmp_path)
  _edit_tensors(path, lambda t: t.update({"multi_modal_projector.linear_1.weight": np.full(
      t["multi_modal_projector.linear_1.weight"].shape, 3e38, np.float32)}))
  _, params = checkpoint.load_checkpoint(path)
  assert np.all(params["projector"]["linear_1"]["kernel"] == np.float32(3e38))


def test_llama_attention_bias_is_refused(clip_llama_dir, tmp_path):
  path = _copy(clip_llama_dir, tmp_path)
  _edit_config(path, lambda d: d["text_config"].update(attention_bias=True))
  with pytest.raises(CheckpointError, match="attention_bias=True .* not supported"):
    checkpoint.load_checkpoint(path)


def test_duplicate_names_across_layouts(clip_llama_dir, tmp_path):
  path = _copy(clip_llama_dir, tmp_path)
  _edit_tensors(path, lambda t: t.update(
      {"model.multi_modal_projector.linear_1.bias": t["multi_modal_projector.linear_1.bias"]}))
  with pytest.raises(CheckpointError, match="under two name layouts"):
    checkpoint.load_checkpoint(path)
