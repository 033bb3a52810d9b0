"""Bad input and faults in the evaluation and benchmark commands: one line each, before
the data, the weights or the model build, and the shipped results byte-identical after.

Heavy steps are replaced by functions that fail the test if called, so each case proves
where it was caught. Cases that reach the writing stage run on a made-up Evaluation of
the default model (no generation), with the shipped outputs as the targets.
"""

import glob
import json
import math
import os
import re
import stat

import pytest

from benchmarks import evaluate as bench
from benchmarks import outputs
from benchmarks import prefill_speed
from tests import faults
from tokred_jax.engine.pipeline import DEFAULT_CHECKPOINT, Pipeline
from tokred_jax.eval import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.json"))
                 + glob.glob(os.path.join(ROOT, "benchmarks", "*.png"))
                 + [os.path.join(ROOT, "BENCHMARKS.md")])
INTACT = "benchmarks/*.json, *.png, BENCHMARKS.md byte-identical"


@pytest.fixture
def shipped():
  """The shipped results' bytes; the test asserts them unchanged, and they are put back
  afterwards whatever happened, so that a failing test cannot leave them damaged."""
  before = {}
  for path in SHIPPED:
    with open(path, "rb") as f:
      before[path] = f.read()
  yield before
  for path, data in before.items():
    with open(path, "rb") as f:
      if f.read() == data:
        continue
    with open(path, "wb") as f:
      f.write(data)


def assert_intact(before):
  for path, data in before.items():
    with open(path, "rb") as f:
      assert f.read() == data, f"{path} was changed"
  leftovers = [t for path in before for t in glob.glob(os.path.join(
      os.path.dirname(path), f".{os.path.basename(path)}.*"))]
  assert not leftovers, f"temporary files left behind: {leftovers}"


def _forbid(monkeypatch, target, name, what):
  def called(*args, **kwargs):
    raise AssertionError(f"{what} ran before the bad input was refused")
  monkeypatch.setattr(target, name, called)


@pytest.fixture
def no_weights(monkeypatch):
  _forbid(monkeypatch, Pipeline, "load", "weights load")
  _forbid(monkeypatch, bench.evaluate, "evaluate", "evaluation")


@pytest.fixture
def no_data(monkeypatch, no_weights):
  _forbid(monkeypatch, bench.evaluate, "load_examples", "data load")


def refused(main, argv) -> str:
  with pytest.raises(SystemExit) as e:
    main(argv)
  message = str(e.value.code)
  assert "\n" not in message.strip() and "Traceback" not in message
  return message


def _case(args) -> str:
  """The command line as the table shows it ({tmp}: a scratch folder)."""
  return " ".join(args).replace("{outs}", "--json,--plot,--markdown=elsewhere").replace(
      "{tmp}", "DIR")


def outs(tmp_path) -> list[str]:
  """Outputs away from the shipped ones, so the case reaches the check it is about."""
  return [f"--json={tmp_path}/e.json", f"--plot={tmp_path}/e.png",
          f"--markdown={tmp_path}/B.md"]


@pytest.mark.parametrize("args, match", [
    (["--limit=8"], "--limit=8 is not the published sweep.*--json=PATH --plot=PATH "
     "--markdown=PATH"),
    (["--split=validation"], "--split=validation is not the published sweep"),
    (["--settings=aim@0.25"], "or --add to add its rows"),
    (["--variants="], "--variants= is not the published sweep"),
    (["--json={tmp}/e.json"], "evaluate.png, BENCHMARKS.md: say where they go with "
     "--plot=PATH --markdown=PATH"),
    (["--limit=8", "--json={tmp}/e.json", "--plot="], "with --markdown=PATH"),
    (["--settings=mustdrop@0.25", "{outs}"], "cannot run mustdrop@0.25 .*ask for a preset"),
    (["--settings=aim@0.25,fastv@0.1", "{outs}"], "cannot run fastv@0.1 .*less than 0.333"),
    (["--settings=aim@0.25:foo=1", "{outs}"], "aim has no option 'foo'"),
    (["--settings=pmod", "{outs}"], "no p-MoD routers"),
    (["--settings=aim@2", "{outs}"], "retention must be in"),
    (["--json={tmp}/none/e.json", "--plot=", "--markdown="], "folder .* does not exist"),
    (["--json={tmp}", "--plot=", "--markdown="], "is a folder"),
    (["--json=", "--plot={tmp}/e.jpg", "--markdown="], "name a .png, .pdf, .svg file"),
    (["--json=", "--plot=", "--markdown={tmp}/broken.md", "--limit=4"], "not a pair"),
    (["--variants=x", "{outs}"], "'x' is not LABEL=DIR"),
    (["--variants=x={tmp}", "{outs}"], "has no config.json"),
    (["--variants=x=" + DEFAULT_CHECKPOINT, "{outs}"], "x=.*no p-MoD routers"),
    (["--checkpoint={tmp}", "{outs}"], "has no config.json"),
    (["--add", "--settings=aim@0.25", "--limit=8"], "has limit=None, this run 8"),
    (["--add", "--settings=aim@0.25", "{outs}"], "e.json does not exist"),
    (["--add", "--settings=aim@0.25", "--json={tmp}/broken.json", "--plot=",
      "--markdown="], "is not a saved evaluation"),
    (["--add", "--json=", "--plot=", "--markdown=", "--settings=aim@0.25"], "needs --json"),
    (["--batch=x"], "argument --batch: invalid int value: 'x' \\(see --help\\)"),
    (["--dtype=float16"], "invalid choice: 'float16'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--batch=0"], "must be positive"),
    (["--max_new_tokens=0"], "decode at least 1 token"),
])
def test_evaluate_refuses_before_the_data(tmp_path, shipped, no_data, args, match):
  (tmp_path / "broken.md").write_text("<!-- END evaluate glyph_vqa/default limit=4 -->\n"
                                      "<!-- BEGIN evaluate glyph_vqa/default limit=4 -->\n")
  (tmp_path / "broken.json").write_text('{"runs": [')
  argv = []
  for a in args:
    argv += outs(tmp_path) if a == "{outs}" else [a.replace("{tmp}", str(tmp_path))]
  message = refused(bench.main, argv)
  assert message.startswith("evaluate: ")
  assert re.search(match, message), message
  assert_intact(shipped)
  assert not (tmp_path / "e.json").exists()
  faults.record("benchmarks.evaluate", _case(args), message, before="data load",
                intact=INTACT)


@pytest.mark.parametrize("args, match", [
    (["--limit=9999"], "limit 9999 is more than the 4000 examples"),
    (["--split=bogus"], "no 'default' config with a 'bogus' split"),
    (["--split=train", "--limit=2"], "2 turns|turns"),
])
def test_evaluate_refuses_bad_data_before_the_weights(tmp_path, shipped, no_weights, args,
                                                      match):
  message = refused(bench.main, args + outs(tmp_path))
  assert re.search(match, message), message
  assert_intact(shipped)
  faults.record("benchmarks.evaluate", _case(args), message, before="weights load",
                intact=INTACT)


def _made_up(pipe: Pipeline, examples, accuracy: float = 1.0) -> evaluate.Evaluation:
  """An Evaluation of `pipe` over `examples` with a dense row and one reduced row."""
  types = evaluate._zero_by_type(examples)  # pylint: disable=protected-access
  rows = []
  for label, method, retention, flops in [("none", "none", None, 2e8),
                                          ("aim@0.25", "aim", 0.25, 1e8)]:
    total = dict(types)
    for e in examples:
      total[e.question_type] += 1
    rows.append(evaluate.SettingResult(
        label, method, retention, None, accuracy=accuracy, correct_by_type=dict(total),
        total_by_type=total, flops=flops, flops_compiled=flops, kv_bytes=flops / 100,
        equivalent_visual_tokens=144 * (retention or 1), latency_s=0.01,
        predictions=[e.answer for e in examples]))
  return evaluate.Evaluation(evaluate.model_summary(pipe), 4, 5, [e.id for e in examples],
                             [e.question_type for e in examples],
                             [e.answer for e in examples], rows)


@pytest.fixture
def published_run(monkeypatch):
  """The published sweep's command, on 4 examples, with a made-up evaluation: what it
  does after the work. Returns a setter for the evaluation to return."""
  load = evaluate.load_examples
  monkeypatch.setattr(bench.evaluate, "load_examples",
                      lambda *a: load("glyph_vqa/default", None, "test", 4))
  made = {}

  def fake_evaluate(pipe, examples, settings, *args):
    made.setdefault("run", _made_up(pipe, examples, made.get("accuracy", 1.0)))
    if made.get("interrupt"):
      raise KeyboardInterrupt
    return made["run"]

  monkeypatch.setattr(bench.evaluate, "evaluate", fake_evaluate)
  monkeypatch.setattr(bench, "DEFAULT_VARIANTS", "")
  return made


def test_interrupted_evaluation_writes_nothing(shipped, published_run):
  published_run["interrupt"] = True
  message = refused(bench.main, [])
  assert "interrupted; nothing was written" in message and "evaluate.json" in message
  assert_intact(shipped)
  faults.record("benchmarks.evaluate", "Ctrl-C during the sweep", message,
                before="writing any result", intact=INTACT)


def test_degenerate_results_are_not_written(shipped, published_run):
  published_run["accuracy"] = math.nan
  message = refused(bench.main, [])
  assert "non-finite scores" in message and "nothing was written" in message
  assert_intact(shipped)
  faults.record("benchmarks.evaluate", "a row with NaN accuracy", message,
                before="writing any result", intact=INTACT)


def test_a_failed_write_leaves_every_old_file(shipped, published_run, monkeypatch):
  # The JSON is staged first: the plot failing must take it back too.
  def full_disk(run, path, title):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(bench, "plot", full_disk)
  message = refused(bench.main, [])
  assert "cannot write the results" in message and "No space left" in message
  assert_intact(shipped)
  faults.record("benchmarks.evaluate", "disk full while writing the plot", message,
                before="replacing any result", intact=INTACT)


def test_results_go_where_told_with_normal_permissions(tmp_path, published_run):
  md = tmp_path / "B.md"
  md.write_text("# Mine\n")
  md.chmod(0o640)
  argv = ["--limit=4"] + outs(tmp_path)[:2] + [f"--markdown={md}"]
  bench.main(argv)
  record = json.loads((tmp_path / "e.json").read_text())
  assert record["runs"][-1]["command"] == " ".join(["python -m benchmarks.evaluate", *argv])
  mask = os.umask(0)
  os.umask(mask)
  assert stat.S_IMODE((tmp_path / "e.json").stat().st_mode) == 0o666 & ~mask
  assert stat.S_IMODE(md.stat().st_mode) == 0o640  # an existing file keeps its mode
  assert md.read_text().startswith("# Mine\n") and "| aim |" in md.read_text()
  assert (tmp_path / "e.png").stat().st_size > 1000
  assert sorted(os.listdir(tmp_path)) == ["B.md", "e.json", "e.png"]  # no temporaries


def test_staged_files_replace_nothing_when_one_fails(tmp_path):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text("old a")
  with pytest.raises(RuntimeError):
    with outputs.staged() as out:
      out.write_text(str(a), "new a")
      out.write_with(str(b), lambda path: (_ for _ in ()).throw(RuntimeError("render")))
  assert a.read_text() == "old a" and not b.exists() and os.listdir(tmp_path) == ["a.txt"]


@pytest.fixture
def no_model(monkeypatch):
  _forbid(monkeypatch, prefill_speed, "_measure", "model build")


@pytest.mark.parametrize("args, match", [
    (["--methods=aim"], "--methods=aim is not the one the shipped results were run at.*"
     "--markdown=PATH --plot=PATH"),
    (["--retention=0.25", "--text-tokens=32", "--plot="], "--text-tokens=32 .*--markdown"),
    (["--dtype=bfloat16"], "--dtype=bfloat16 is not the one"),
    (["--retention=0.5"], "pooling cannot run it: pooling retains 1/s"),
    (["--retention=0.05"], "fastv cannot run it"),
    (["--retention=1.5"], "in \\(0, 1\\]"),
    (["--methods=aim,foo"], "unknown foo; choose from none, aim"),
    (["--batch=0"], "both must be positive"),
    (["--rounds=x"], "argument --rounds: invalid int value"),
    (["--text-tokens=2"], "give 5 to 1472"),
    (["--plot={tmp}/p.txt"], "name a .png"),
    (["--plot={tmp}/no/p.png"], "does not exist"),
    (["--markdown={tmp}/broken.md"], "not a pair"),
])
def test_prefill_speed_refuses_before_the_model(tmp_path, shipped, no_model, args, match):
  (tmp_path / "broken.md").write_text("<!-- BEGIN prefill_speed batch=1 -->\n")
  message = refused(prefill_speed.main, [a.replace("{tmp}", str(tmp_path)) for a in args])
  assert message.startswith("prefill_speed: ")
  assert re.search(match, message), message
  assert_intact(shipped)
  faults.record("benchmarks.prefill_speed", _case(args), message, before="model build",
                intact=INTACT)


def test_interrupted_prefill_speed_writes_nothing(shipped, monkeypatch):
  def interrupted(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(prefill_speed, "_measure", interrupted)
  message = refused(prefill_speed.main, ["--rounds=3"])
  assert "interrupted; nothing was written" in message and "BENCHMARKS.md" in message
  assert_intact(shipped)
  faults.record("benchmarks.prefill_speed", "Ctrl-C while timing", message,
                before="writing any result", intact=INTACT)
