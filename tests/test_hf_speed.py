"""benchmarks/hf_speed.py on the tiny model (batch 1, one round) into a scratch folder, and
bad flags refused before any model is built, every output left byte-identical."""

import json
import math
import os
import re
import sys

import jax
import pytest

from benchmarks import hf_speed, twins
from tests import faults, testing
from tokred_jax import methods
from tokred_jax.engine import cost
from tokred_jax.methods.base import make_plan

# At 0.25 the tiny model's one tower layer cannot merge enough for ToMe: a skipped case.
ARGS = ["--config=tiny", "--batch=1", "--retention=0.25", "--methods=random,pooling,tome",
        "--rounds=1"]
CASES = ["transformers dense", "ours dense, exact length", "ours dense, bucket 128",
         "random 0.25", "pooling 0.25"]
OUTS = dict(markdown="out.md", json="out.json", plot="out.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(Markdown text, JSON data, PNG bytes, what `measure` got) of one run whose Markdown
  file had text of its own."""
  out = tmp_path_factory.mktemp("hf_speed")
  (out / OUTS["markdown"]).write_text("# Mine\n\nKept as it was.\n")
  patch = pytest.MonkeyPatch()
  # init_params compiles the whole model (~20 s on 2 cores); these weights need none.
  patch.setattr(hf_speed, "make_params", testing.random_params)
  contexts, measure = [], hf_speed.measure
  patch.setattr(hf_speed, "measure", lambda ctx, *a: contexts.append(ctx) or measure(ctx, *a))
  try:
    hf_speed.main(ARGS + [f"--{k}={out / v}" for k, v in OUTS.items()])
  finally:
    patch.undo()
  return ((out / OUTS["markdown"]).read_text(), json.loads((out / OUTS["json"]).read_text()),
          (out / OUTS["plot"]).read_bytes(), contexts)


def test_every_case_is_measured_and_written(run):
  text, data, png, _ = run
  assert png.startswith(b"\x89PNG")
  assert text.startswith("# Mine\n\nKept as it was.\n")
  block = text.split("<!-- BEGIN hf_speed -->")[1].split("<!-- END hf_speed -->")[0]
  rows = data["results"]["1"]["rows"]
  assert [r["case"] for r in rows] == CASES
  for case in CASES:
    assert f"| {case} |" in block
  assert "tome at 0.25: ToMe over 1 tower layers cannot merge" in block
  assert data["skipped"] == [s for s in data["skipped"] if s.startswith("tome at 0.25")] != []
  assert "![prefill and decode against transformers](out.png)" in block


def test_parity_and_ratios(run):
  _, data, _, _ = run
  res = data["results"]["1"]
  assert set(res["parity"]) == set(CASES[1:3])
  for p in res["parity"].values():
    assert 0 <= p["relative_error"] < hf_speed.PARITY_TOL and p["tokens_equal"] == 1.0
  for r in res["rows"]:
    for key in ("prefill_vs_hf", "prefill_vs_ours", "decode_vs_hf", "decode_vs_ours",
                "flops_ratio"):
      assert math.isfinite(r[key]) and r[key] > 0, (r["case"], key, r[key])
    assert len(r["prefill_times_s"]) == len(r["decode_times_s"]) == 1
  by = {r["case"]: r for r in res["rows"]}
  assert by["transformers dense"]["prefill_vs_hf"] == 1.0
  assert by["ours dense, exact length"]["flops_ratio"] == 1.0
  # 81 tokens padded to 128; 9 of 36 visual tokens kept.
  assert by["ours dense, bucket 128"]["flops_ratio"] < 0.7 < 1.3 < by["random 0.25"]["flops_ratio"]
  assert by["random 0.25"]["equivalent_visual_tokens"] == by["pooling 0.25"][
      "equivalent_visual_tokens"] == 9


def test_programs_and_twins(run):
  _, data, _, _ = run
  by = {r["case"]: r for r in data["results"]["1"]["rows"]}
  assert by["transformers dense"]["programs"] is None is by["transformers dense"]["compile_s"]
  assert [by[c]["programs"] for c in CASES[1:]] == [2, 2, 2, 2]  # a prefill and a decode
  # jax's compile events: well above zero, and part of the first call.
  assert all(0.2 < by[c]["compile_s"] < by[c]["first_call_s"] for c in CASES[1:])
  # Pooling's twin keeps a random subset of 9 before the projector: one more prefill.
  assert by["pooling 0.25"]["twin_programs"] == 1 and data["programs"] == 9
  assert math.isfinite(by["pooling 0.25"]["reduction_share"])
  assert 0.9 < by["pooling 0.25"]["twin_flops_vs_method"] <= 1.0
  assert by["random 0.25"]["reduction_share"] is None


def test_weights_are_on_the_device_once(run):
  # numpy weights would be copied to the device in every timed call.
  (ctx,) = run[3]
  for tree in (ctx["params"], ctx["routed_params"]):
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["aim", "fastv", "tome", "pooling", "dart"])
def test_twins_run_the_same_layers_without_the_scorer(name):
  cfg = hf_speed.mid_config()
  plan = make_plan(methods.get(name, cfg, 0.25), cfg)
  twin = twins.twin_plan(plan, cfg)
  method, trivial = (cost.plan_cost(cfg, p, 45)["flops"] for p in (plan, twin))
  assert trivial.llm.per_layer == method.llm.per_layer and trivial.llm.extra == 0
  assert trivial.vision.per_layer == method.vision.per_layer
  # Pooling's subset is taken before the projector: only the projector runs on fewer.
  assert (trivial.projector.total < method.projector.total) == (name == "pooling")
  assert (method.llm.extra > 0) == (name in ("aim", "fastv", "dart"))


def test_twins_of_mustdrop_and_of_none():
  cfg = hf_speed.mid_config()
  assert twins.twin_plan(make_plan(methods.get("random", cfg, 0.25), cfg), cfg) is None
  plan = make_plan(methods.get("mustdrop-64", cfg), cfg)
  caps = [320, 320, 240, 160, 160, 96, 64, 64, 64, 64, 64, 64]
  twin = twins.twin_plan(plan, cfg, caps)
  assert twin.vision_tokens == (577,) + (321,) * 10 and twin.num_visual == 320
  assert twin.llm_visual == tuple(caps) and not twin.data_dependent
  assert twins.twin_plan(plan, cfg, [64] * 12) is None  # 512 of 576 dropped in one layer


def _forbid(monkeypatch):
  def called(*args, **kwargs):
    raise AssertionError("a model was built before the bad input was refused")
  monkeypatch.setattr(hf_speed, "_measure", called)
  monkeypatch.setattr(hf_speed, "make_params", called)


@pytest.mark.parametrize("args, match", [
    (["--retention=2"], "--retention=2: give comma-separated fractions in \\(0, 1\\]"),
    (["--batch=1,x"], "--batch=1,x: give comma-separated positive integers"),
    (["--methods=aim,foo"], "--methods: unknown foo; choose from aim, fastv"),
    (["--new-tokens=1"], "2 new tokens"),
    (["--config=huge"], "argument --config: invalid choice"),
    (["--plot={tmp}/out.txt"], "--plot=.*out.txt: name a .png"),
])
def test_bad_flags_are_refused_before_any_model(tmp_path, monkeypatch, args, match):
  _forbid(monkeypatch)
  paths = {k: tmp_path / v for k, v in OUTS.items()}
  for i, path in enumerate(paths.values()):
    path.write_bytes(b"old results %d\n" % i)
  argv = ARGS + [f"--{k}={v}" for k, v in paths.items()] + [
      a.replace("{tmp}", str(tmp_path)) for a in args]
  with pytest.raises(SystemExit) as e:
    hf_speed.main(argv)
  message = str(e.value.code)
  assert message.startswith("hf_speed: ") and re.search(match, message), message
  assert [p.read_bytes() for p in paths.values()] == [b"old results %d\n" % i
                                                      for i in range(3)]
  assert sorted(os.listdir(tmp_path)) == sorted(OUTS.values())
  faults.record("benchmarks.hf_speed", " ".join(args).replace("{tmp}", "DIR"), message,
                before="model build", intact="the output files byte-identical")


def test_shipped_results_need_named_outputs(monkeypatch):
  _forbid(monkeypatch)
  shipped = [os.path.join(hf_speed._ROOT, p) for p in hf_speed.OUTPUTS.values()]
  before = [open(p, "rb").read() if os.path.exists(p) else None for p in shipped]
  with pytest.raises(SystemExit) as e:
    hf_speed.main(["--config=tiny", "--markdown="])
  message = str(e.value.code)
  assert "--config=tiny is not the one the shipped results were run at" in message
  assert "--json=PATH --plot=PATH" in message
  assert [open(p, "rb").read() if os.path.exists(p) else None for p in shipped] == before
  faults.record("benchmarks.hf_speed", "--config=tiny (outputs not named)", message,
                before="model build", intact="the shipped results byte-identical")


def test_missing_torch_names_the_install(tmp_path, monkeypatch):
  _forbid(monkeypatch)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(SystemExit) as e:
    hf_speed.main(ARGS + [f"--{k}={tmp_path / v}" for k, v in OUTS.items()])
  message = str(e.value.code)
  assert message.startswith("hf_speed: needs torch and transformers") and message.endswith(
      "pip install -e '.[bench]'")
  assert os.listdir(tmp_path) == []
  faults.record("benchmarks.hf_speed", "torch not installed", message, before="model build")
