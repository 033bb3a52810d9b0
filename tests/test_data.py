"""Training data: the TFDS builder, conversation tokens and targets, the grain pipeline.

A fixture data set (JSON conversations and PNG images in a temporary directory, with a
bad sample of every kind) is built once with the embedded tiny-llava model's tokenizer
and config: 64 image tokens, 112 px images.
"""

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

from tests import faults
from tokred_jax.data import (BadSample, DataConfig, build_dataset, encode_example,
                             make_dataset, parse_turns,
                             tokenize_conversation)
from tokred_jax.io import processing
from tokred_jax.models.config import from_hf_dict

ASSETS = pathlib.Path(__file__).parent.parent / "tokred_jax" / "assets" / "tiny-llava"
MAX_LENGTH = 160


def _turns(*texts):
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


# Good samples: one to three turns, `<image>` first, last or absent, unique answers.
GOOD = [
    dict(id="one", image="a.png", conversations=_turns("<image>\nWhat is shown?",
                                                       "A small red cat.")),
    dict(id="two", image="sub/b.png", conversations=_turns(
        "Describe the picture.\n<image>", "Two dogs play.", "Where?", "In the park.")),
    dict(id="three", image="c.png", conversations=_turns(
        "<image>\nHow many people?", "Three.", "What colour is the car?", "Blue.",
        "Is it parked?", "Yes, by the house.")),
    dict(id="untagged", image="d.png", conversations=_turns("What colour is the car?",
                                                            "The car is blue.")),
    dict(id="rgba", image="e.png", conversations=_turns("<image>\nWhat is it?", "A fox.")),
    dict(id="gray", image="f.png", conversations=_turns("<image>\nAny people?", "No.")),
]
# One of each kind the builder rejects, and one the reader rejects (too long).
BUILD_BAD = {
    "missing image": dict(id="bad-missing", image="nowhere.png",
                          conversations=_turns("<image>\nHi?", "Hello.")),
    "unreadable image": dict(id="bad-unreadable", image="broken.png",
                             conversations=_turns("<image>\nHi?", "Hello.")),
    "no assistant turn": dict(id="bad-noanswer", image="a.png",
                              conversations=_turns("<image>\nHi?")),
    "no image": dict(id="bad-textonly", conversations=_turns("Hi?", "Hello.")),
    "malformed conversation": dict(id="bad-order", image="a.png", conversations=[
        {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "<image>\nHi?"}]),
}
TOO_LONG = dict(id="bad-long", image="a.png", conversations=_turns(
    "<image>\n" + "The quick brown fox jumps over the lazy dog. " * 12, "Yes."))


def _write_images(root: pathlib.Path):
  rng = np.random.default_rng(0)
  (root / "sub").mkdir(parents=True, exist_ok=True)
  for name, shape in [("a.png", (90, 130, 3)), ("sub/b.png", (140, 100, 3)),
                      ("c.png", (112, 112, 3)), ("d.png", (60, 61, 3)), ("e.png", (80, 90, 4)),
                      ("f.png", (70, 120))]:
    PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
  (root / "broken.png").write_bytes(b"\x89PNG but not really")


def _build(tmp: pathlib.Path, samples, name="fixture", on_bad_sample="skip"):
  images = tmp / "images"
  _write_images(images)
  path = tmp / f"{name}.json"
  path.write_text(json.dumps(samples))
  return build_dataset(name, {"train": str(path)}, str(images), str(tmp / "tfds"),
                       _model()[0].vision, on_bad_sample=on_bad_sample, num_threads=2)


def _model():
  cfg = from_hf_dict(json.loads((ASSETS / "config.json").read_text()))
  return cfg, processing.Tokenizer.load(ASSETS, cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("data")
  name = _build(tmp, GOOD + list(BUILD_BAD.values()) + [TOO_LONG])
  cfg, tok = _model()
  return types.SimpleNamespace(name=name, data_dir=str(tmp / "tfds"), images=tmp / "images",
                               cfg=cfg, tok=tok)


def _config(built, **kwargs):
  kwargs = dict(dict(batch_size=2, max_length=MAX_LENGTH, num_epochs=1), **kwargs)
  return DataConfig(dataset=built.name, data_dir=built.data_dir, **kwargs)


def _batches(built, seed=0, **kwargs):
  ds = make_dataset(_config(built, **kwargs), "train", seed, tokenizer=built.tok,
                    model_cfg=built.cfg)
  return list(ds)


def _runs(mask):
  """[start, end) of each run of True in a bool vector."""
  edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


# The builder.

def test_builder_writes_array_record_and_reads_back_the_samples(built):
  version_dir = pathlib.Path(built.data_dir) / built.name / "1.0.0"
  assert list(version_dir.glob("*.array_record-*"))
  source = tfds.data_source(built.name, split="train", data_dir=built.data_dir)
  assert len(source) == len(GOOD) + 1  # The too-long sample is only caught when read.
  stored = {source[i]["id"].decode(): source[i] for i in range(len(source))}
  for sample in GOOD + [TOO_LONG]:
    record = stored[sample["id"]]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (112, 112, 3)
    want = processing.preprocess_images(str(built.images / sample["image"]),
                                        built.cfg.vision)
    np.testing.assert_array_equal(
        processing.preprocess_images(record["image"], built.cfg.vision), want)
    turns = record["conversations"]
    assert [dict(zip(("from", "value"), (f.decode(), v.decode())))
            for f, v in zip(turns["from"], turns["value"])] == sample["conversations"]
  # Build and read used no TensorFlow (test_no_tensorflow_import checks it is never tried).
  assert "tensorflow" not in sys.modules


def test_builder_skips_each_bad_kind_and_reports_ids(built, tmp_path, caplog):
  info = tfds.builder_from_directory(
      pathlib.Path(built.data_dir) / built.name / "1.0.0").info
  skipped = info.metadata["skipped"]["train"]
  assert skipped["seen"] == len(GOOD) + len(BUILD_BAD) + 1
  assert {(s["id"], s["reason"]) for s in skipped["skipped"]} == {
      (sample["id"], reason) for reason, sample in BUILD_BAD.items()}
  with caplog.at_level(logging.INFO, logger="tokred_jax.data"):
    _build(tmp_path, GOOD[:1] + list(BUILD_BAD.values()), name="report")
  summary = [r.message for r in caplog.records if "skipped 5 of 6 samples" in r.message]
  assert summary, caplog.text
  for reason, sample in BUILD_BAD.items():
    assert f"1 {reason} (id {sample['id']})" in summary[0]


@pytest.mark.parametrize("reason", sorted(BUILD_BAD))
def test_builder_error_mode_names_the_bad_sample(reason, tmp_path):
  bad = BUILD_BAD[reason]
  with pytest.raises(BadSample, match=f"'{bad['id']}': {reason}") as e:
    _build(tmp_path, GOOD[:1] + [bad], name="strict", on_bad_sample="error")
  faults.record("data set build (on_bad_sample='error')", f"a sample with {reason}",
                f"BadSample: {e.value}", before="training")


# Tokens and targets.

def test_multi_turn_targets_are_exactly_the_replies(built):
  tok, cfg = built.tok, built.cfg
  for sample in GOOD:
    ex = encode_example(tok, cfg, sample["id"], sample["conversations"], MAX_LENGTH)
    ids, mask, labels = ex["input_ids"], ex["attention_mask"], ex["labels"]
    length = int(mask.sum())
    assert mask[:length].all() and not mask[length:].any()  # Right padding.
    assert (ids[length:] == tok.pad_id).all()
    np.testing.assert_array_equal(ex["positions"][:length], np.arange(length))
    np.testing.assert_array_equal(labels[:length - 1], ids[1:length])
    assert (labels[length - 1:] == tok.pad_id).all()
    assert (ids == cfg.image_token_id).sum() == cfg.num_image_tokens == 64
    answers = [t["value"] for t in sample["conversations"][1::2]]
    runs = _runs(ex["loss_mask"])
    assert len(runs) == len(answers)
    for (start, end), answer in zip(runs, answers):
      assert labels[end - 1] == tok.eos_ids[0]  # Each reply ends with EOS, learnt too.
      assert tok.decode(labels[start:end]).strip() == answer
    assert not ex["loss_mask"][length - 1:].any()


def test_first_turn_is_the_inference_prompt(built):
  """Training sees the prompt `build_prompt` + `encode_batch` give the model at inference."""
  tok, cfg = built.tok, built.cfg
  for sample in GOOD:
    question = sample["conversations"][0]["value"]
    prompt = processing.build_prompt(question.replace("<image>", "").strip())
    inference = processing.encode_batch(tok, [prompt], cfg, cfg.num_image_tokens, [256], 256)
    n = int(inference["attention_mask"].sum())
    ids, target = tokenize_conversation(tok, parse_turns(sample["id"],
                                                          sample["conversations"]),
                                        cfg.image_token_id, cfg.num_image_tokens)
    np.testing.assert_array_equal(ids[:n], inference["input_ids"][0, -n:])
    assert target[n] and not target[:n].any()  # The reply starts right after the prompt.


def _llama_style_tokenizer(cfg):
  """A Llama/Vicuna-format tokenizer.json: no pre-tokenizer, spaces marked "▁" by the
  normalizer, sentencepiece-style pieces (they never hold a "▁" but at the start)."""
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # Training only.
  tok.train_from_iterator(
      ["USER: What is shown?\nASSISTANT: A small red cat sits on a mat."] * 4,
      trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                          show_progress=False))
  tok.pre_tokenizer = None
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                         normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens(["<image>", "<pad>"])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 1)])
  cfg = dataclasses.replace(cfg, image_token_id=tok.token_to_id("<image>"),
                            pad_token_id=tok.token_to_id("<pad>"))
  return processing.Tokenizer(tok, cfg), cfg


def test_targets_with_a_llama_style_tokenizer(built):
  tok, cfg = _llama_style_tokenizer(built.cfg)
  conversations = _turns("What is shown?\n<image>", "A small red cat.", "Where?",
                         "It sits on a mat.")
  ex = encode_example(tok, cfg, "x", conversations, 200, num_image_tokens=4)
  runs = _runs(ex["loss_mask"])
  assert [tok.decode(ex["labels"][a:b]) for a, b in runs] == ["A small red cat.",
                                                                "It sits on a mat."]
  assert all(ex["labels"][b - 1] == tok.eos_ids[0] for _, b in runs)
  prompt = processing.encode_batch(tok, [processing.build_prompt("What is shown?")], cfg, 4,
                                   [64], 64)
  n = int(prompt["attention_mask"].sum())
  np.testing.assert_array_equal(ex["input_ids"][:n], prompt["input_ids"][0, -n:])


def test_parse_turns_moves_or_adds_the_image_tag():
  assert parse_turns("x", _turns("Describe.\n<image>", "A.", "More?", "B.")) == [
      ("<image>\nDescribe.", "A."), ("More?", "B.")]
  assert parse_turns("x", _turns("Hi?", "A.", "<image> And this?", "B.")) == [
      ("Hi?", "A."), ("<image>\nAnd this?", "B.")]
  assert parse_turns("x", _turns("Hi?", "A.")) == [("<image>\nHi?", "A.")]


@pytest.mark.parametrize("conversations, reason", [
    (_turns("<image>\nHi?"), "no assistant turn"),
    ([], "no assistant turn"),
    ("not a list", "malformed conversation"),
    ([{"from": "human"}], "malformed conversation"),
    (_turns("<image>\nHi?", "A.", "More?"), "malformed conversation"),
    (_turns("<image>\nHi?", "A.", "<image>\nMore?", "B."), "malformed conversation"),
    (_turns("Hi?", "<image> A."), "malformed conversation"),
    ([{"from": "human", "value": "Hi?"}, {"from": "assistant", "value": "A."}],
     "no assistant turn"),
])
def test_parse_turns_rejects_bad_conversations(conversations, reason):
  with pytest.raises(BadSample, match=f"sample 'x7': {reason}"):
    parse_turns("x7", conversations)


def test_expand_image_token():
  expand_image_token = processing.expand_image_token
  assert expand_image_token([1, 5, 3, 6], 3, 4) == ([1, 5, 3, 3, 3, 3, 6], 2)
  for ids in ([1, 5], [3, 1, 3]):
    with pytest.raises(ValueError, match="exactly one image"):
      expand_image_token(ids, 3, 4)
  # Several images: each placeholder its own slots.
  assert expand_image_token([1, 3, 5, 3, 6], 3, [2, 1]) == ([1, 3, 3, 5, 3, 6], 1)
  with pytest.raises(ValueError, match="2 <image> tokens for 3 images"):
    expand_image_token([1, 3, 5, 3, 6], 3, [2, 1, 1])


# The grain pipeline.

def test_batches_follow_the_contract(built):
  batches = _batches(built)
  assert len(batches) == len(GOOD) // 2
  seen = set()
  images = [processing.preprocess_images(str(built.images / s["image"]), built.cfg.vision)[0]
            for s in GOOD]
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "input_ids": ((2, MAX_LENGTH), np.int32), "attention_mask": ((2, MAX_LENGTH), bool),
        "positions": ((2, MAX_LENGTH), np.int32), "labels": ((2, MAX_LENGTH), np.int32),
        "loss_mask": ((2, MAX_LENGTH), bool), "pixel_values": ((2, 112, 112, 3), np.float32)}
    assert ((batch["input_ids"] == built.cfg.image_token_id).sum(1) == 64).all()
    assert not (batch["loss_mask"] & ~batch["attention_mask"]).any()
    for pixels in batch["pixel_values"]:
      seen.add(next(i for i, want in enumerate(images) if np.array_equal(pixels, want)))
  assert seen == set(range(len(GOOD)))  # Every good sample once in the epoch.


def _keys(batches):
  """The samples of a stream of batches, by their token ids."""
  return [row.tobytes() for b in batches for row in b["input_ids"]]


def test_seeded_shuffle_is_deterministic_and_reshuffles_each_epoch(built):
  first = _keys(_batches(built, seed=3, batch_size=1, num_epochs=2))
  assert first == _keys(_batches(built, seed=3, batch_size=1, num_epochs=2))
  n = len(GOOD)
  assert len(first) == 2 * n and set(first[:n]) == set(first[n:]) and len(set(first)) == n
  assert first[:n] != first[n:]  # Epoch 2 is shuffled anew.
  assert first != _keys(_batches(built, seed=4, batch_size=1, num_epochs=2))
  assert _keys(_batches(built, shuffle=False, batch_size=1)) != first[:n]


def test_iterator_state_resumes_mid_epoch_with_the_same_batches(built):
  config = _config(built, batch_size=2, num_epochs=3)
  make = lambda: make_dataset(config, "train", 11, tokenizer=built.tok, model_cfg=built.cfg)
  it = iter(make())
  for _ in range(4):  # Past the first epoch's 3 batches, into the second.
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # What a checkpoint stores.
  rest = list(it)
  resumed = iter(make())
  resumed.set_state(state)
  again = list(resumed)
  assert len(again) == len(rest) == 5
  for a, b in zip(rest, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_too_long_is_skipped_with_its_id_when_read(built, caplog):
  long_config = dict(max_length=MAX_LENGTH, batch_size=1, shuffle=False)
  with caplog.at_level(logging.WARNING, logger="tokred_jax.data"):
    rows = _keys(_batches(built, **long_config))
  assert len(rows) == len(GOOD)
  assert "skipping sample 'bad-long': too long" in caplog.text
  assert f"exceed max_length {MAX_LENGTH}" in caplog.text
  with pytest.raises(BadSample, match="'bad-long': too long"):
    _batches(built, on_bad_sample="error", **long_config)
  # With room for it, the same sample is read and trained on.
  assert len(_batches(built, max_length=512, batch_size=1)) == len(GOOD) + 1


def test_image_slots_follow_the_reduction_plan(built):
  """Pre-LLM merging or pooling splices fewer visual tokens: as many slots as the plan."""
  ds = make_dataset(_config(built), "train", 0, tokenizer=built.tok, model_cfg=built.cfg,
                    num_image_tokens=16)
  batch = next(iter(ds))
  assert ((batch["input_ids"] == built.cfg.image_token_id).sum(1) == 16).all()


def test_shards_split_the_samples(built):
  def rows(index):
    ds = make_dataset(_config(built, batch_size=1), "train", 0, tokenizer=built.tok,
                      model_cfg=built.cfg, shard_index=index, shard_count=2)
    return _keys(ds)
  a, b = rows(0), rows(1)
  assert a and b and not set(a) & set(b)
  assert len(a) + len(b) == len(set(a + b)) == len(GOOD)


def test_wrong_image_size_is_refused(built):
  cfg = dataclasses.replace(built.cfg, vision=dataclasses.replace(
      built.cfg.vision, image_size=224))
  with pytest.raises(ValueError, match=r"build the data set again"):
    make_dataset(_config(built), "train", 0, tokenizer=built.tok, model_cfg=cfg)


def test_worker_processes_give_the_same_batches(built):
  config = dict(batch_size=2, num_epochs=2)
  want = _batches(built, seed=5, **config)
  ds = make_dataset(_config(built, worker_count=2, **config), "train", 5,
                    tokenizer=built.tok, model_cfg=built.cfg)
  it = iter(ds)
  got = list(it)
  it.close()
  assert len(got) == len(want)
  for a, b in zip(want, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_no_tensorflow_import(built, tmp_path):
  """Building and reading never even try to import TensorFlow (installed or not)."""
  fake = tmp_path / "fake" / "tensorflow"
  fake.mkdir(parents=True)
  attempts = tmp_path / "attempts.txt"
  (fake / "__init__.py").write_text(textwrap.dedent(f"""
      import traceback
      with open({str(attempts)!r}, "a") as f:
        f.write("".join(traceback.format_stack()))
      raise ImportError("this test forbids TensorFlow")
      """))
  script = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {str(pathlib.Path(__file__).parent.parent)!r})
      from tests import test_data as t
      import pathlib
      tmp = pathlib.Path({str(tmp_path)!r})
      name = t._build(tmp, t.GOOD[:2], name="notf")
      cfg, tok = t._model()
      from tokred_jax.data import DataConfig, make_dataset
      config = DataConfig(dataset=name, data_dir=str(tmp / "tfds"), batch_size=2,
                          max_length=t.MAX_LENGTH, num_epochs=1)
      batches = list(make_dataset(config, "train", 0, tokenizer=tok, model_cfg=cfg))
      assert len(batches) == 1 and "tensorflow" not in sys.modules
      """)
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not attempts.exists(), attempts.read_text()
