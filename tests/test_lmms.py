"""The lmms-eval adapter (tokred_jax/eval/lmms.py) on the default model, offline: a local
lmms-eval task of glyph_vqa test questions (tests/lmms_task) scores what the project's
own evaluation scores, at the same cost; batches answer as batch 1 does, in order; and
loglikelihood is the sum of Pipeline.forward's log-probabilities."""

import importlib.metadata
import json
import os

import jax
import numpy as np
import pytest
from lmms_eval import evaluator
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager
from PIL import Image, ImageFile

from tests import faults
from tokred_jax.eval import evaluate, lmms
from tokred_jax.models.config import ConfigError

# Importing lmms_eval.api.task makes PIL load truncated image files, process-wide; the rest
# of the suite (run in the same processes) checks that tokred_jax refuses them.
ImageFile.LOAD_TRUNCATED_IMAGES = False

LIMIT = 16
BATCH = 8
TASK = "glyph_vqa_lmms"
TASK_DIR = os.path.join(os.path.dirname(__file__), "lmms_task")


@pytest.fixture(scope="module")
def examples():
  return evaluate.load_examples("glyph_vqa/default", None, limit=LIMIT)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, examples):
  """The task's data file (the YAML names it relative to the working directory) and
  each example's image as a PNG (lossless: the pixels evaluate sees)."""
  path = tmp_path_factory.mktemp("lmms_data")
  docs = []
  for e in examples:
    Image.fromarray(e.image).save(path / f"{e.id}.png")
    docs.append(dict(id=e.id, question_type=e.question_type, prompt=e.prompt,
                     answer=e.answer, image=str(path / f"{e.id}.png")))
  (path / f"{TASK}.json").write_text(json.dumps(docs))
  return path


@pytest.fixture(scope="module")
def aim():
  """One model for the tests at 25%, so that they share its compiled programs (its cost
  is kept per task: each test has its own)."""
  return lmms.TokredJax(method="aim@0.25", batch_size=BATCH)


def run_task(model, data_dir, monkeypatch):
  monkeypatch.chdir(data_dir)
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(data_dir / "hf_cache"))
  return evaluator.simple_evaluate(
      model=model, tasks=[TASK], bootstrap_iters=0, log_samples=True,
      task_manager=TaskManager(include_path=TASK_DIR, include_defaults=False))


@pytest.mark.parametrize("method", ["none", "aim@0.25"])
def test_task_score_and_cost_equal_the_evaluation(method, aim, examples, data_dir,
                                                  monkeypatch):
  model = aim if method == "aim@0.25" else lmms.TokredJax(method=method, batch_size=BATCH)
  results = lmms.with_cost(run_task(model, data_dir, monkeypatch), model)
  (setting,) = evaluate.parse_settings(method)
  ours = evaluate.evaluate(model.pipe, examples, [setting], BATCH, max_new_tokens=5).results[0]
  samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
  assert [s["resps"][0][0] for s in samples] == ours.predictions
  task = results["results"][TASK]
  assert task["exact_match,none"] == pytest.approx(ours.accuracy, abs=1e-12)
  assert task["prefill_flops"] == pytest.approx(ours.flops, rel=1e-9)
  assert task["kv_bytes"] == pytest.approx(ours.kv_bytes, rel=1e-9)
  assert task["equivalent_visual_tokens"] == pytest.approx(ours.equivalent_visual_tokens)
  assert task["latency_s"] > 0
  # The lmms-eval command's own results carry them too, through log_metrics.
  assert results["throughput"][f"avg_{TASK}/prefill_flops"] == pytest.approx(ours.flops)
  if method != "none":
    assert ours.equivalent_visual_tokens < 0.3 * model.pipe.cfg.num_image_tokens


def _requests(docs, ids, kwargs):
  """generate_until Instances of task "t" for docs[i] with kwargs[i], i in `ids`."""
  return [Instance("generate_until", (docs[i]["prompt"], dict(kwargs[i]),
                                      lambda d: [d["image"]], i, "t", "test"), 0,
                   {"task": "t", "doc_id": i, "repeats": 1}) for i in ids]


def test_batches_answer_as_batch_one_in_order(aim, examples, monkeypatch):
  model = aim
  # Two groups of settings interleaved, and prompts of different lengths, so that the
  # adapter reorders them for its batches.
  docs = [dict(prompt=e.prompt if i % 3 else e.prompt + " Answer briefly.",
               image=Image.fromarray(e.image)) for i, e in enumerate(examples[:8])]
  kwargs = [{"max_new_tokens": 5 if i % 2 else 3, "until": ["\n"]} for i in range(len(docs))]
  model.task_dict = {"t": {"test": docs}}
  ids = range(len(docs))
  batched = model.generate_until(_requests(docs, ids, kwargs))
  monkeypatch.setattr(model, "batch_size", 1)
  single = [model.generate_until(_requests(docs, [i], kwargs))[0] for i in ids]
  assert batched == single
  assert len(set(batched)) > 1  # different questions, different answers


def test_multi_round_asks_each_round_of_its_doc(aim, examples):
  model = aim
  docs = [dict(prompt=e.prompt, image=Image.fromarray(e.image)) for e in examples[:8]]
  follow_up = "<image>\nHow many digits are there?"

  def doc_to_text(doc, previous_output, round_idx, previous_round_info):
    # Round 1 asks how many digits; after it the request is done.
    return [doc["image"]], follow_up, round_idx == 2, previous_output, None

  model.task_dict = {"t": {"test": docs}}
  kwargs = {"max_new_tokens": 5}
  got = model.generate_until_multi_round([
      Instance("generate_until_multi_round", (d["prompt"], dict(kwargs),
                                              lambda d: [d["image"]], doc_to_text, i, "t",
                                              "test"), 0, {"task": "t", "doc_id": i,
                                                           "repeats": 1})
      for i, d in enumerate(docs)])
  first = model.generate_until(_requests(docs, range(8), [kwargs] * 8))
  second = model.generate_until(_requests([dict(d, prompt=follow_up) for d in docs],
                                          range(8), [kwargs] * 8))
  assert got == [[a, b] for a, b in zip(first, second)]


def test_loglikelihood_is_the_sum_of_forward_log_probabilities(aim, examples):
  model = aim
  pipe, docs = model.pipe, [dict(image=Image.fromarray(e.image)) for e in examples[:6]]
  questions = [e.prompt for e in examples[:6]]
  conts = [" " + e.answer for e in examples[:3]] + [" 7", " no", " red"]
  model.task_dict = {"t": {"test": docs}}
  got = model.loglikelihood([
      Instance("loglikelihood", (q, c, lambda d: [d["image"]], i, "t", "test"), 0,
               {"task": "t", "doc_id": i, "repeats": 1})
      for i, (q, c) in enumerate(zip(questions, conts))])
  for doc, q, c, (logp, greedy) in zip(docs, questions, conts, got):
    prompt = model.template.prompt(q)
    n = len(pipe.tokenizer.encode(prompt + c)) - len(pipe.tokenizer.encode(prompt))
    batch = pipe.prepare([doc["image"]], [prompt + c], chat_template=False, plan=model.plan)
    logits = np.asarray(pipe.forward(batch, model.plan))[0]
    ids = np.asarray(batch["input_ids"])[0]
    lp = np.asarray(jax.nn.log_softmax(logits, -1))[-n - 1:-1]
    assert logp == pytest.approx(float(lp[np.arange(n), ids[-n:]].sum()), abs=1e-4)
    assert greedy == bool(np.all(lp.argmax(-1) == ids[-n:]))
  # The model's own greedy answers are greedy; a wrong answer is not.
  assert any(g for _, g in got[:3]) and not all(g for _, g in got)


def test_registered_as_an_lmms_eval_model():
  (entry,) = [e for e in importlib.metadata.entry_points(group="lmms_eval.models")
              if e.name == "tokred_jax"]
  assert entry.load()().simple_class_path == "tokred_jax.eval.lmms.TokredJax"
  assert get_model("tokred_jax") is lmms.TokredJax


@pytest.mark.parametrize("args, message", [
    ({"method": "aim@2"}, "retention must be in (0, 1]"),
    ({"method": "magic@0.25"}, "unknown method 'magic'"),
    ({"method": "aim@0.25", "retention": 0.5}, "already sets its level"),
    ({"mesh": "data:2"}, "write NAME=SIZE joined by ':'"),
    ({"batch_size": "auto"}, "there is no 'auto'"),
    ({"mesh": "data=8", "batch_size": 4}, "does not split over the mesh"),
], ids=["retention", "method", "retention-twice", "mesh", "batch-size", "batch-on-mesh"])
def test_bad_model_args_fail_before_the_weights(args, message, monkeypatch):
  monkeypatch.setattr(lmms.Pipeline, "load_weights", lambda self: pytest.fail("loaded"))
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
    lmms.TokredJax(**args)
  case = ",".join(f"{k}={v}" for k, v in args.items())
  faults.record("lmms-eval --model tokred_jax", f"--model_args {case}", str(e.value),
                before="weights load")


def test_unsupported_generation_options_are_refused(aim, examples):
  model = aim
  model.task_dict = {"t": {"test": [dict(prompt=examples[0].prompt,
                                         image=Image.fromarray(examples[0].image))]}}
  for kwargs, message in (({"num_beams": 4}, "num_beams=4"),
                          ({"repetition_penalty": 1.2}, "'repetition_penalty'")):
    with pytest.raises(ConfigError, match=message) as e:
      model.generate_until(_requests(model.task_dict["t"]["test"], [0], [kwargs]))
    faults.record("lmms-eval --model tokred_jax", f"generation_kwargs {kwargs}",
                  str(e.value), before="compile")


def test_videos_as_paths_and_several_images_on_onevision(llava_onevision_dir, tmp_path):
  """On a OneVision checkpoint a request's video arrives as a path and several images as
  a list: the answers are the Pipeline's own for the same inputs, one at a time."""
  from tests.test_anyres_pipeline import _image, _video, _write_video
  path = tmp_path / "clip.mkv"
  _write_video(path, _video(6, 5))
  model = lmms.TokredJax(pretrained=str(llava_onevision_dir), method="aim@0.5",
                         template="llava-hf", batch_size=2, num_frames=4)
  pictures = [Image.fromarray(_image(60, 90, 1)), Image.fromarray(_image(100, 40, 2))]
  docs = [dict(prompt="What happens?", visual=[str(path)]),
          dict(prompt="Compare <image> with <image>.", visual=pictures),
          dict(prompt="And now?", visual=[str(path)])]
  model.task_dict = {"t": {"test": docs}}
  kwargs = {"max_new_tokens": 3}
  got = model.generate_until([
      Instance("generate_until", (d["prompt"], dict(kwargs), lambda d: d["visual"], i, "t",
                                  "test"), 0, {"task": "t", "doc_id": i, "repeats": 1})
      for i, d in enumerate(docs)])
  pipe, sampling = model.pipe, lmms.SamplingConfig(3)
  want = []
  for d in docs:
    video = isinstance(d["visual"][0], str)
    batch = pipe.prepare(None if video else [d["visual"]], [d["prompt"]], 3, plan=model.plan,
                         videos=[d["visual"][0]] if video else None, num_frames=4)
    tokens, _ = pipe.generate_tokens(batch, sampling, None, pipe.batch_plan(batch, model.plan))
    want.append(pipe.tokenizer.decode(tokens[0]))
  assert got == want
  assert model.cost["t"]["equivalent_visual_tokens"] > 0
