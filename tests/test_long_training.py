"""Training and evaluating anyres (LLaVA-NeXT-style) and video (LLaVA-OneVision-style)
models on tile_vqa and video_vqa: the batches hold what inference feeds the model, a
few steps of `trainer.train` learn, the export evaluates per question type, and a pair
of model and data that cannot train is refused in one line before any work.

The models are tiny (one LLM layer, width 32) with random weights and a tokenizer
trained on the two data sets' sentences; compiling the steps dominates the time.
"""

import dataclasses

import numpy as np
import pytest

import tokred_jax
from configs import tile_llava, train_tiny, video_llava
from tests.testing import random_params
from tokred_jax.data import DataConfig, generated, glyph_vqa, make_dataset, tile_vqa, video_vqa
from tokred_jax.data.conversation import encode_example
from tokred_jax.engine.pipeline import Pipeline
from tokred_jax.eval import evaluate
from tokred_jax.io import anyres, batching, checkpoint, processing, video
from tokred_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from tokred_jax.proj.glyph_vqa import tower_pretrain
from tokred_jax.train import setup as train_setup, trainer


def _text(kind):
  return TextConfig(kind=kind, vocab_size=384, hidden_size=32, intermediate_size=64,
                    num_layers=1, num_heads=4, num_kv_heads=4, head_dim=8,
                    max_position_embeddings=1024, attention_bias=kind == "qwen2",
                    bos_token_id=1, eos_token_id=2)


_VISION = dict(hidden_size=32, intermediate_size=64, num_heads=4, image_size=64, patch_size=8)
# The token ids processing.train_tokenizer gives its special tokens.
_IDS = dict(image_token_id=3, pad_token_id=4, template="tokred")
# NeXT: a CLIP tower (layer -2 of 2 runs) cut at tile_vqa's pinpoints in 64 px crops.
NEXT = LlavaConfig(vision=VisionConfig(kind="clip", num_layers=2, **_VISION),
                   text=_text("llama"), arch="llava_next",
                   image_grid_pinpoints=tile_vqa.PINPOINTS, **_IDS)
# OneVision: a SigLIP tower (no CLS, its last layer's "full" features), a Qwen2 LLM.
ONEVISION = LlavaConfig(
    vision=VisionConfig(kind="siglip", num_layers=1, hidden_act="gelu_pytorch_tanh",
                        image_mean=(0.5,) * 3, image_std=(0.5,) * 3, **_VISION),
    text=_text("qwen2"), arch="llava_onevision", image_grid_pinpoints=tile_vqa.PINPOINTS,
    vision_feature_layer=-1, vision_feature_select="full", **_IDS)
# (model, data set, sequence length: 1 BOS + the visual slots + the longest conversation)
RUNS = {"next": (NEXT, "tile_vqa/small", 768), "onevision": (ONEVISION, "video_vqa/small", 384)}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  """{name: a checkpoint directory of random weights with the tokenizer}."""
  root = tmp_path_factory.mktemp("models")
  tok = root / "tokenizer.json"
  lines = generated.corpus("tile_vqa/small", 64) + generated.corpus("video_vqa/small", 48)
  assert processing.train_tokenizer(lines, 384, tok)["<image>"] == NEXT.image_token_id
  dirs = {}
  for name, (cfg, _, _) in RUNS.items():
    dirs[name] = str(root / name)
    checkpoint.save_checkpoint(dirs[name], cfg, random_params(cfg), str(tok))
  return dirs


def _batch(model_dir, cfg, dataset, max_length, **kwargs):
  tok = processing.Tokenizer.load(model_dir, cfg)
  config = DataConfig(dataset, None, batch_size=2, max_length=max_length, shuffle=False,
                      **kwargs)
  return next(iter(make_dataset(config, "train", 0, tokenizer=tok, model_cfg=cfg)))


def test_anyres_batches_are_what_inference_feeds_in_the_largest_bucket(model_dirs):
  batch = _batch(model_dirs["next"], NEXT, "tile_vqa/small", 768)
  bucket = anyres.Bucket(10, 664)  # 3 x 3 tiles + the base: 64 + 24 * (24 + 1) slots
  assert {k: v.shape for k, v in batch.items() if k not in trainer.BATCH_NDIM} == {
      "crops": (2, 10, 64, 64, 3), "layout_src": (2, 664, 4), "layout_weight": (2, 664, 4),
      "layout_newline": (2, 664), "layout_valid": (2, 664)}
  assert set(batch) == set(trainer.batch_ndim(train_setup.make_plan(_run_config(
      model_dirs["next"], "next"), NEXT)))
  assert (batch["input_ids"] == NEXT.image_token_id).sum(1).tolist() == [bucket.capacity] * 2
  for row in range(2):
    image = tile_vqa.example("train", row)["image"]
    alone = batching.image_batch([[image]], NEXT).pixels  # its own, smallest bucket
    crops = anyres.num_crops(image.shape[:2], batching.spec_for(NEXT))
    np.testing.assert_array_equal(batch["crops"][row, :crops], alone.pixels[0, :crops])
    assert not batch["crops"][row, crops:].any()
    padded = anyres.pad_layout(anyres.Layout(*(np.asarray(a[0]) for a in alone[1:])),
                               bucket.capacity)
    for key, want in zip(("layout_src", "layout_weight", "layout_newline", "layout_valid"),
                         padded):
      np.testing.assert_array_equal(batch[key][row], want)


def test_video_batches_pad_or_sample_to_num_frames(model_dirs):
  batch = _batch(model_dirs["onevision"], ONEVISION, "video_vqa/small", 384)
  assert batch["frames"].shape == (2, 16, 64, 64, 3) and batch["frame_valid"].shape == (2, 16)
  assert (batch["input_ids"] == ONEVISION.image_token_id).sum(1).tolist() == [16 * 16 + 1] * 2
  videos = [video_vqa.example("train", row)["frames"] for row in range(2)]
  assert batch["frame_valid"].sum(1).tolist() == [len(v) for v in videos]
  for row, frames in enumerate(videos):
    alone = batching.video_batch([frames], ONEVISION).pixels
    np.testing.assert_array_equal(batch["frames"][row, :len(frames)], alone.pixels[0])
  # Fewer frames a sequence: longer videos sampled uniformly, as at inference.
  short = _batch(model_dirs["onevision"], ONEVISION, "video_vqa/small", 384, num_frames=8)
  assert short["frame_valid"].all() and short["frames"].shape[1] == 8
  for row, frames in enumerate(videos):
    picked = frames[video.sample_frame_indices(len(frames), 8)]
    np.testing.assert_array_equal(short["frames"][row],
                                  batching.video_batch([picked], ONEVISION).pixels.pixels[0])


def test_llava_batches_are_unchanged():
  """A llava model's batch is the one-image contract, each row as encode_example and
  preprocess_images make it."""
  cfg, _ = checkpoint.load_checkpoint(tokred_jax.DEFAULT_CHECKPOINT)
  tok = processing.Tokenizer.load(tokred_jax.DEFAULT_CHECKPOINT, cfg)
  config = DataConfig("glyph_vqa/small", None, batch_size=2, max_length=208, shuffle=False)
  batch = next(iter(make_dataset(config, "train", 0, tokenizer=tok, model_cfg=cfg)))
  assert set(batch) == set(trainer.BATCH_NDIM) and trainer.batch_ndim(None) == trainer.BATCH_NDIM
  for row in range(2):
    ex = glyph_vqa.example("train", row)
    want = encode_example(tok, cfg, ex["id"], ex["conversations"], 208)
    want["pixel_values"] = processing.preprocess_images(ex["image"], cfg.vision)[0]
    for key, value in want.items():
      np.testing.assert_array_equal(batch[key][row], value)


def _run_config(model_dir, name, steps=20):
  _, dataset, max_length = RUNS[name]
  config = train_tiny.get_config()
  config.model.checkpoint = model_dir
  config.data.dataset = dataset
  config.data.batch_size, config.data.max_length = 2, max_length
  config.num_steps, config.log_every, config.checkpoint_every = steps, 1, 100
  config.optim.learning_rate = 3e-3
  config.mesh = "data=2,fsdp=1,tensor=4"  # batch 2 over 8 devices
  return config


@pytest.mark.parametrize("name", list(RUNS))
def test_a_few_steps_learn_and_the_export_evaluates(model_dirs, name, tmp_path):
  cfg, dataset, _ = RUNS[name]
  config = _run_config(model_dirs[name], name)
  state, history = trainer.train(config, str(tmp_path))
  losses = [h["loss"] for h in history]
  assert len(losses) == 20 and np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  pipe = Pipeline.load(str(tmp_path / "export"))
  assert pipe.cfg.arch == cfg.arch
  examples = evaluate.load_examples(dataset, None, limit=4)
  settings = [evaluate.Setting("none"), evaluate.Setting("random", 0.5),
              evaluate.Setting("aim", budget=0.5)]
  run = evaluate.evaluate(pipe, examples, settings, batch_size=2, max_new_tokens=2)
  dense, rand, budget = run.results
  assert set(dense.total_by_type) == {e.question_type for e in examples}
  assert sum(dense.total_by_type.values()) == 4 and 0 <= dense.accuracy <= 1
  assert len(dense.predictions) == 4 and rand.flops < dense.flops
  assert "per input bucket" in budget.skipped


@pytest.mark.parametrize("cfg, dataset, match", [
    (NEXT, "video_vqa/small", "video_vqa/small holds videos, which need a llava_onevision"),
    (None, "tile_vqa/small", "anyres crops of 64 px"),  # the default llava-1.5 model
    (dataclasses.replace(NEXT, image_grid_pinpoints=((128, 128),)), "tile_vqa/small",
     r"but the model takes 64 px crops at pinpoints \[\(128, 128\)\]"),
    (dataclasses.replace(ONEVISION, vision=dataclasses.replace(ONEVISION.vision,
                                                               image_size=96)),
     "video_vqa/small", "frames of 64 px, but the model's tower takes 96 px"),
    (ONEVISION, "glyph_vqa/small", "for a CLIP-style tower, but the model's siglip"),
])
def test_model_and_data_that_cannot_train_are_refused_before_reading(
    model_dirs, monkeypatch, cfg, dataset, match):
  cfg = cfg or checkpoint.read_config(tokred_jax.DEFAULT_CHECKPOINT)
  tok = processing.Tokenizer.load(model_dirs["next"], NEXT)
  monkeypatch.setattr(generated, "source", lambda *a: pytest.fail("read the data"))
  with pytest.raises(ValueError, match=match):
    make_dataset(DataConfig(dataset, None, 2, 768), "train", 0, tokenizer=tok, model_cfg=cfg)


def test_synthetic_data_is_refused_for_an_anyres_model(model_dirs):
  config = _run_config(model_dirs["next"], "next")
  config.data.dataset = "synthetic"
  with pytest.raises(ValueError, match="synthetic data set holds one S x S image a sequence"):
    train_setup.make_plan(config, NEXT)


def test_a_step_refuses_a_batch_of_another_kind(model_dirs):
  config = _run_config(model_dirs["next"], "next")
  mesh, tx, schedule, _, _, shardings = trainer._run_setup(config, NEXT)
  step = trainer.make_train_step(trainer.make_model(config, NEXT), tx, schedule, shardings,
                                 mesh, plan=train_setup.make_plan(config, NEXT))
  with pytest.raises(ValueError, match="the batch has no crops, layout_src"):
    step(None, {k: np.zeros((2,) + (8,) * (n - 1)) for k, n in trainer.BATCH_NDIM.items()})


def test_tile_labels_mark_each_digit_in_its_tile_only():
  spec = batching.spec_for(NEXT)
  for index in range(4):
    ex = tile_vqa.example("train", index)
    size = ex["image"].shape[:2]
    digits, colours = tower_pretrain.tile_labels(ex["items"], size, spec, 10)
    tiles = anyres.num_crops(size, spec) - 1
    ignored = tower_pretrain.IGNORE
    assert (digits[0] == ignored).all() and (digits[1 + tiles:] == ignored).all()
    shown = digits[1:1 + tiles]
    assert (colours[1:1 + tiles] != ignored).all() and (shown != ignored).all()
    for _, _, digit, colour in ex["items"].tolist():
      assert ((shown == digit) & (colours[1:1 + tiles] == colour)).any()
    # A 5 x 7 px digit, enlarged at most 4/3, covers 1 to 2 x 2 patches of 8 px.
    assert 1 <= (shown != tower_pretrain.NUM_DIGITS - 1).sum() / len(ex["items"]) <= 4


@pytest.mark.parametrize("config_file, arch", [(tile_llava, "llava_next"),
                                               (video_llava, "llava_onevision")])
def test_the_tower_stage_starts_a_model_the_next_stage_trains(config_file, arch, tmp_path):
  config = config_file.get_config("tower")
  config.arch.vision.update(hidden_size=32, intermediate_size=64, num_layers=2)
  config.arch.text.update(hidden_size=32, intermediate_size=64, num_layers=1, head_dim=8)
  config.data.dataset = config.data.dataset.replace("default", "small")
  config.data.batch_size, config.num_steps = 2, 2
  export = tower_pretrain.train(config, str(tmp_path / "tower"))
  cfg = checkpoint.read_config(export)
  assert cfg.arch == arch and cfg.template == "tokred"
  align = config_file.get_config("align")
  align.model.checkpoint, align.data.batch_size = export, 2
  slots = {"llava_next": 664, "llava_onevision": 16 * 16 + 1}[arch]
  assert train_setup.make_plan(align, cfg).num_visual == slots
