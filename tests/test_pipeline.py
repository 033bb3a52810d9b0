"""The public API and infer.py on the embedded checkpoint; bad input fails early."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import tokred_jax
from tests import faults
from tokred_jax import methods
from tokred_jax.engine import report
from tokred_jax.io import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(tokred_jax.TINY_CHECKPOINT, "sample.png")


@pytest.fixture(scope="module")
def pipe():
  return tokred_jax.Pipeline.load(tokred_jax.TINY_CHECKPOINT)


def test_generate_answers_each_prompt(pipe):
  sampling = tokred_jax.SamplingConfig(max_new_tokens=5)
  before = pipe.programs
  answers = pipe.generate([SAMPLE, SAMPLE], ["What colour is the circle?", "How many?"],
                          sampling)
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
  again = pipe.generate([SAMPLE, SAMPLE], ["How many?", "What colour?"], sampling)
  assert again[0] == answers[1]
  batch = pipe.prepare([SAMPLE], ["What colour is the circle?"])
  logits = np.asarray(pipe.forward(batch))
  # One program of each kind: the second batch has the same size and length bucket.
  assert pipe.programs - before == {"prefill": 1, "decode": 1, "forward": 1}
  assert logits.shape == batch["input_ids"].shape + (pipe.cfg.text.vocab_size,)
  assert np.isfinite(logits).all()


def test_batched_answer_equals_single(pipe):
  """Left padding must not change a prompt's answer."""
  sampling = tokred_jax.SamplingConfig(max_new_tokens=6)
  short, long = "What?", "How many shapes are there on the grey background?"
  alone = pipe.generate([SAMPLE], [short], sampling)
  together = pipe.generate([SAMPLE, SAMPLE], [short, long], sampling)
  assert together[0] == alone[0]


@pytest.mark.parametrize("images, prompts, match", [
    ([SAMPLE], [""], "empty"),
    ([SAMPLE], ["   "], "empty"),
    ([SAMPLE, SAMPLE], ["one prompt"], "2 images for 1 prompts"),
    ([SAMPLE], ["<image> <image> two images?"], "exactly one"),
    ([SAMPLE], ["word " * 600], "at most"),
    ([np.zeros((3, 40, 40), np.uint8)], ["channels first?"], "shape"),
    ([np.zeros((40, 40, 4, 2), np.uint8)], ["4-d?"], "shape"),
])
def test_bad_input_is_rejected_before_compiling(pipe, images, prompts, match):
  before = pipe.programs
  with pytest.raises(ValueError, match=match) as e:
    pipe.forward(pipe.prepare(images, prompts))
  assert pipe.programs == before
  shown = [f"{i.dtype}{list(i.shape)}" if isinstance(i, np.ndarray) else "img"
           for i in images]
  prompt = [p if len(p) < 40 else p[:12] + f"... ({len(p)} chars)" for p in prompts]
  faults.record("Pipeline", f"prepare({shown}, {prompt!r})", f"ValueError: {e.value}",
                before="compile")


def test_prompt_without_placeholder_is_rejected_when_raw(pipe):
  with pytest.raises(ValueError, match="exactly one"):
    pipe.prepare([SAMPLE], ["USER: no image here ASSISTANT:"], chat_template=False)


@pytest.mark.parametrize("shape", [(1, 3, 112, 112), (1, 56, 56, 3), (112, 112, 3),
                                   (2, 112, 112, 3)])
def test_bad_pixel_arrays(pipe, shape):
  batch = pipe.prepare([SAMPLE], ["What?"])
  batch["pixel_values"] = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match="pixel_values"):
    pipe.forward(batch)


def test_unknown_dtype():
  with pytest.raises(ValueError, match="dtype"):
    tokred_jax.Pipeline.load(dtype="float8")


def run_infer(*flags: str) -> subprocess.CompletedProcess:
  """infer.py with `flags`, from the repository root."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *flags],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_infer_script_prints_answer_and_cost():
  out = run_infer("--config.max_new_tokens=4", "--config.warmup=False",
                  "--prompt=What colour is the circle?")
  assert out.returncode == 0, out.stderr[-2000:]
  for line in ("answer:", "prefill FLOPs, LLM layers", "KV cache", "prefill latency"):
    assert line in out.stdout


def test_infer_script_reports_missing_checkpoint(tmp_path):
  out = run_infer(f"--checkpoint={tmp_path / 'nope'}")
  assert out.returncode != 0
  assert "nope" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 1, "tensor": 4},
                                        {"data": 1, "fsdp": -1, "tensor": 1}])
def test_sharded_pipeline_generates_the_same(pipe, mesh_shape):
  sampling = tokred_jax.SamplingConfig(max_new_tokens=6)
  images, prompts = [SAMPLE] * 8, [f"Question {i}?" for i in range(8)]
  sharded = tokred_jax.Pipeline.load(tokred_jax.TINY_CHECKPOINT, mesh_shape=mesh_shape)
  assert sharded.generate(images, prompts, sampling) == pipe.generate(images, prompts, sampling)
  batch = pipe.prepare(images, prompts)
  np.testing.assert_allclose(np.asarray(sharded.forward(batch)), np.asarray(pipe.forward(batch)),
                             atol=1e-5, rtol=1e-5)


def test_batch_that_does_not_split_over_the_mesh():
  sharded = tokred_jax.Pipeline.load(tokred_jax.TINY_CHECKPOINT,
                                     mesh_shape={"data": 2, "fsdp": 1, "tensor": 4})
  with pytest.raises(ValueError, match="multiple of 2") as e:
    sharded.forward(sharded.prepare([SAMPLE] * 3, ["a?", "b?", "c?"]))
  faults.record("Pipeline", "forward(3 prompts) on a data=2 mesh", f"ValueError: {e.value}",
                before="compile")


@pytest.mark.parametrize("method, retention", [("aim", 0.25), ("fastv", 0.5), ("tome", 0.5),
                                               ("random", 0.25), ("pooling", 0.25)])
def test_methods_on_a_mesh_equal_one_device(pipe, method, retention):
  images, prompts = [SAMPLE] * 4, [f"Question {i}?" for i in range(4)]
  plan = pipe.plan(method, retention)
  batch = pipe.prepare(images, prompts, plan=plan)
  sharded = tokred_jax.Pipeline.load(tokred_jax.TINY_CHECKPOINT,
                                     mesh_shape={"data": 2, "fsdp": 1, "tensor": 4})
  np.testing.assert_allclose(np.asarray(sharded.forward(batch, plan)),
                             np.asarray(pipe.forward(batch, plan)), atol=1e-5, rtol=1e-5)


def test_infer_script_draws_surviving_patches(tmp_path):
  png = tmp_path / "kept.png"
  out = run_infer("--config.max_new_tokens=2", "--config.warmup=False",
                  "--config.method=aim", "--config.retention=0.25", f"--config.plot={png}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "equivalent visual tokens" in out.stdout and png.stat().st_size > 1000


def test_infer_script_runs_a_recipe_from_a_config_file():
  out = run_infer("--config=configs/recipe.py", "--config.max_new_tokens=2",
                  "--config.warmup=False")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "method: tome+fastv (fast mode)" in out.stdout
  cfg = tokred_jax.Pipeline.load(weights=False).cfg
  plan = methods.make_plan(methods.get("tome+fastv", cfg, 0.25, fastv={"k": 1}), cfg)
  assert f"equivalent visual tokens        {np.mean(plan.visual_per_layer):.1f}" in out.stdout


def test_mustdrop_forward_uses_the_segments_and_matches_the_masked_program(pipe):
  """Fast-mode MustDrop runs as compacted segments; its text logits equal the
  one-program run that only masks (window 2 tiles the embedded model's 8x8 grid)."""
  plan = pipe.plan("mustdrop-64", window=2, threshold=0.9)
  batch = pipe.prepare([SAMPLE, SAMPLE], ["What colour is the circle?", "How many?"],
                       plan=plan)
  logits, aux = pipe.forward(batch, plan, return_aux=True)
  assert plan in pipe._segmented
  masked = np.asarray(pipe._forward(pipe.params, batch, plan, plan.counts(), False))
  text = batch["attention_mask"] & (batch["input_ids"] != pipe.cfg.image_token_id)
  np.testing.assert_allclose(np.asarray(logits)[text], masked[text], atol=1e-4, rtol=1e-4)
  assert np.all(np.asarray(aux["equivalent_tokens"]) <= pipe.cfg.num_image_tokens)
  assert np.all(np.asarray(aux["vision_tokens"]) < pipe.cfg.num_image_tokens)  # flat windows
  # The counts infer.py prints are the ones the first sample got, in both conventions
  # (the official one counts each filter layer after its filter: never more).
  counts = pipe.token_counts(batch, plan)
  official = "equivalent visual tokens, official MustDrop count"
  assert counts["visual tokens into the LLM"] == int(aux["visual_per_layer"][0, 0])
  assert counts["equivalent visual tokens"] == pytest.approx(
      float(aux["equivalent_tokens"][0]), abs=0.051)
  assert counts[official] == pytest.approx(float(aux["equivalent_tokens_official"][0]),
                                           abs=0.051)
  assert counts[official] <= counts["equivalent visual tokens"]
  table = report.cost_table(counts, pipe.cost(batch, plan))
  assert "equivalent visual tokens " in table and official in table


# (case, call, error, message): misuse of the API, refused before anything compiles.
API_MISUSE = [
    ('generate("img.png", "a string prompt")', lambda p: p.generate(SAMPLE, "What?"),
     TypeError, "prompts must be a list of strings, one per image; got one string"),
    ("generate([img], None)", lambda p: p.generate([SAMPLE], None),
     TypeError, "prompts must be a list of strings, one per image; got None"),
    ('generate("img.png", ["What?"])', lambda p: p.generate(SAMPLE, ["What?"]),
     TypeError, "images must be a list, one image per prompt; got a single str"),
    ("generate(uint8[H, W, 3], ['What?'])",
     lambda p: p.generate(np.zeros((8, 8, 3), np.uint8), ["What?"]),
     TypeError, "got a single ndarray: pass \\[image\\]"),
    ("generate([img], [None])", lambda p: p.generate([SAMPLE], [None]),
     TypeError, "prompt 0 is None, not a string"),
    ("generate([img], a generator of prompts)",
     lambda p: p.generate([SAMPLE], (q for q in ["What?"])),
     TypeError, "prompts must be a list, got generator"),
    ("generate([img, img], ['What?'])", lambda p: p.generate([SAMPLE, SAMPLE], ["What?"]),
     ValueError, "got 2 images for 1 prompts"),
    ("generate(..., rng=0)", lambda p: p.generate([SAMPLE], ["What?"], rng=0),
     TypeError, "rng must be one PRNG key, e.g. jax.random.PRNGKey\\(0\\), got 0"),
    ("generate(..., rng=split(key, 2))",
     lambda p: p.generate([SAMPLE], ["What?"], rng=jax.random.split(jax.random.PRNGKey(0))),
     TypeError, "got an array of shape \\(2, 2\\) and dtype uint32"),
    ("generate(images, prompts, 8)", lambda p: p.generate([SAMPLE], ["What?"], 8),
     TypeError, "sampling must be a SamplingConfig"),
    ("prepare(..., max_new_tokens=512) (512 positions)",
     lambda p: p.prepare([SAMPLE], ["What?"], 512),
     ValueError, "max_new_tokens=512 leaves no room for the prompt"),
    ("generate_tokens(batch, SamplingConfig(), rng=1)",
     lambda p: p.generate_tokens(p.prepare([SAMPLE], ["What?"]), SAMPLING, 1),
     TypeError, "rng must be one PRNG key"),
]
SAMPLING = tokred_jax.SamplingConfig(max_new_tokens=2)


@pytest.mark.parametrize("case, call, error, message", API_MISUSE,
                         ids=[c[0] for c in API_MISUSE])
def test_api_misuse_is_one_clear_error(pipe, case, call, error, message):
  compiled = pipe.programs, dict(pipe._generators)
  with pytest.raises(error, match=message) as e:
    call(pipe)
  assert (pipe.programs, dict(pipe._generators)) == compiled
  faults.record("Pipeline", case, f"{error.__name__}: {e.value}", before="compile")


@pytest.mark.parametrize("fields, error, message", [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be a whole number"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be a whole number"),
    (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number"),
    (dict(temperature="0.7"), TypeError, "temperature must be a number, got '0.7'"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=None), TypeError, "top_p must be a number, got None"),
])
def test_sampling_config_out_of_range(fields, error, message):
  with pytest.raises(error, match=message) as e:
    tokred_jax.SamplingConfig(**fields)
  case = "SamplingConfig(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"
  faults.record("SamplingConfig", case, f"{error.__name__}: {e.value}", before="compile")


def test_sampling_config_in_range():
  sampling = tokred_jax.SamplingConfig(np.int64(3), 0.7, 1)
  assert (sampling.max_new_tokens, sampling.temperature, sampling.top_p) == (3, 0.7, 1)


def test_load_without_weights_checks_inputs_then_runs(pipe, monkeypatch):
  """weights=False reads config.json and the tokenizer only: batches are prepared and
  checked; running one asks for the weights; load_weights() makes it the full pipeline."""
  real = checkpoint.load_params
  monkeypatch.setattr(checkpoint, "load_params", lambda *a, **k: pytest.fail("weights read"))
  light = tokred_jax.Pipeline.load(tokred_jax.TINY_CHECKPOINT, weights=False)
  plan = light.plan("fastv", 0.5)
  light.prepare([SAMPLE], ["What colour is the circle?"], plan=plan)  # Plans need no weights.
  plan = light.plan()  # What pipe has compiled already (test_generate_answers_each_prompt).
  batch = light.prepare([SAMPLE], ["What colour is the circle?"])
  with pytest.raises(ValueError, match="call pipe.load_weights\\(\\) first") as e:
    light.forward(batch, plan)
  faults.record("Pipeline", "Pipeline.load(path, weights=False).forward(batch)",
                f"ValueError: {e.value}", before="compile")
  monkeypatch.setattr(checkpoint, "load_params", real)
  np.testing.assert_array_equal(np.asarray(light.load_weights().forward(batch, plan)),
                                np.asarray(pipe.forward(batch, plan)))
