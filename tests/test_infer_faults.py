"""infer.py's bad input: one line naming the fix, before the weights are read.

Most cases call `infer.infer` in-process with the weight loader replaced by one that
fails the test; a few run the script against a checkpoint whose weights file is garbage,
so reading it would print another message.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import infer
import tokred_jax
from configs import default
from tests import faults
from tests.test_processing import _png_header
from tokred_jax import cli
from tokred_jax.engine import pipeline, report
from tokred_jax.io import checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = os.path.join(tokred_jax.TINY_CHECKPOINT, "sample.png")


@pytest.fixture
def no_weights(monkeypatch):
  """Fails the test if anything reads weights."""
  def refuse(*args, **kwargs):
    raise AssertionError("the weights were read before the bad input was refused")
  monkeypatch.setattr(checkpoint, "load_params", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Bad image files and a folder for outputs."""
  d = tmp_path_factory.mktemp("infer_faults")
  (d / "text.png").write_text("not an image")
  data = d / "cut.png"
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  PIL.Image.fromarray(noise).save(data)
  data.write_bytes(data.read_bytes()[:200])
  (d / "huge.png").write_bytes(_png_header(30000, 30000))
  PIL.Image.fromarray(np.zeros((8, 8), np.int32), "I").save(d / "wide.tif")
  (d / "plots").mkdir()
  return d


def _config(**fields):
  config = default.get_config()
  config.checkpoint = tokred_jax.TINY_CHECKPOINT
  config.max_new_tokens = 2
  config.warmup = False
  config.update(fields)
  return config


# (case, config fields, image, prompt, message): each must be refused before the weights.
CASES = [
    ("--image=missing.png", {}, "missing.png", None, "cannot read image file missing.png"),
    ("--image=text.png (not an image)", {}, "text.png", None, "cannot read image file"),
    ("--image=cut.png (truncated)", {}, "cut.png", None, "cannot read image file"),
    ("--image=huge.png (30000x30000 header)", {}, "huge.png", None,
     r"900,000,000 pixels \(2.5 GiB as RGB\), over the limit"),
    ("--image=wide.tif (32-bit pixels)", {}, "wide.tif", None, "32-bit integer pixels"),
    ("--prompt=", {}, None, "", "--prompt is empty"),
    ("--prompt='   '", {}, None, "   ", "--prompt is empty"),
    ("--prompt='<image> <image> two?'", {}, None, "<image> <image> two?", "exactly one"),
    ("--prompt=<600 words>", {}, None, "word " * 600, "at most .* fit"),
    ("--config.method=aimm", dict(method="aimm"), None, None,
     "not a method \\(did you mean 'aim'\\?\\)"),
    ("--config.retention=1.5", dict(method="aim", retention=1.5), None, None,
     r"retention must be in \(0, 1\]"),
    ("--config.mode=slow", dict(method="aim", retention=0.25, mode="slow"), None, None,
     "mode 'slow' is not one of"),
    ("--config.method=pooling --config.retention=0.3",
     dict(method="pooling", retention=0.3), None, None, "0.3 is none of these"),
    ("--config.method=none --config.retention=0.5", dict(retention=0.5), None, None,
     "keeps every token"),
    ("--config.mesh=data=3,tensor=1 (8 devices)", dict(mesh="data=3,tensor=1"), None, None,
     "needs 3 devices, but there are 8"),
    ("--config.mesh=data:2", dict(mesh="data:2"), None, None, "name=size pairs"),
    ("--config.mesh=data=2,fsdp=-1,tensor=-1", dict(mesh="data=2,fsdp=-1,tensor=-1"),
     None, None, "at most one axis may be -1"),
    ("--config.temperature=-1", dict(temperature=-1.0), None, None,
     "temperature must be a finite number >= 0"),
    ("--config.temperature=nan", dict(temperature=float("nan")), None, None,
     "temperature must be a finite number >= 0"),
    ("--config.top_p=0", dict(top_p=0.0), None, None, r"top_p must be in \(0, 1\]"),
    ("--config.top_p=1.5", dict(top_p=1.5), None, None, r"top_p must be in \(0, 1\]"),
    ("--config.max_new_tokens=0", dict(max_new_tokens=0), None, None,
     "max_new_tokens must be >= 1"),
    ("--config.max_new_tokens=100000", dict(max_new_tokens=100000), None, None,
     "leaves no room for the prompt"),
    ("--config.dtype=float8", dict(dtype="float8"), None, None, "dtype 'float8'"),
    ("--config.plot=plots/nowhere/kept.png", dict(plot="plots/nowhere/kept.png"), None, None,
     "does not exist; create it"),
    ("--config.plot=plots (a directory)", dict(plot="plots"), None, None,
     "is a directory; name a .png file"),
    ("--config.plot=kept.xyz", dict(plot="plots/kept.xyz"), None, None,
     "name a .png file"),
    ("--checkpoint=missing", dict(checkpoint="missing"), None, None,
     "checkpoint directory .*missing does not exist"),
]


@pytest.mark.parametrize("case, fields, image, prompt, message", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_the_weights(case, fields, image, prompt, message,
                                                 files, no_weights, monkeypatch):
  monkeypatch.chdir(files)  # Relative paths in the cases live here.
  before = sorted(os.listdir(files))
  with pytest.raises(ValueError, match=message) as e:
    infer.infer(_config(**fields), image=image, prompt=prompt)
  assert sorted(os.listdir(files)) == before  # The output checks leave nothing behind.
  faults.record("infer.py", case, f"infer.py: {cli.one_line(e.value)}", before="weights load",
                intact="-")


def test_preset_without_checkpoint(no_weights):
  config = _config(checkpoint=None)
  config.preset = "llava-1.5-7b"
  with pytest.raises(ValueError, match="preset has no weights here; pass --checkpoint") as e:
    infer.infer(config)
  faults.record("infer.py", "--config=configs/llava15_7b.py (no checkpoint)",
                f"infer.py: {e.value}", before="weights load")


def test_existing_plot_is_kept_until_the_run_ends(files, no_weights):
  """The output check opens the file to see it is writable; a refused run leaves it."""
  plot = files / "plots" / "old.png"
  plot.write_bytes(b"an earlier figure")
  with pytest.raises(ValueError, match="temperature") as e:
    infer.infer(_config(plot=str(plot), temperature=-2.0))
  assert plot.read_bytes() == b"an earlier figure"
  faults.record("infer.py", "--config.plot=old.png --config.temperature=-2",
                f"infer.py: {e.value}", before="weights load", intact="the existing plot file")


@pytest.fixture(scope="module")
def garbage_weights(tmp_path_factory):
  """The tiny checkpoint with a weights file that fails loudly if anything reads it."""
  path = tmp_path_factory.mktemp("garbage") / "tiny"
  shutil.copytree(tokred_jax.TINY_CHECKPOINT, path)
  (path / "model.safetensors").write_bytes(b"\xff" * 4096)
  return path


@pytest.mark.parametrize("args, message", [
    (["--image=missing.png"], "cannot read image file missing.png"),
    (["--prompt="], "--prompt is empty"),
    (["--config.temperature=-1"], "temperature must be a finite number >= 0"),
    (["--config.method=aim", "--config.budget=1.5"], "a flops budget is a fraction"),
])
def test_script_prints_one_line_before_the_weights(args, message, garbage_weights):
  out = subprocess.run([sys.executable, str(ROOT / "infer.py"),
                        f"--checkpoint={garbage_weights}", *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith("infer.py: ") and message in lines[0]
  assert "corrupt" not in out.stderr  # The garbage weights were never opened.
  faults.record("infer.py", " ".join(args), lines[0], before="weights load")


def test_garbage_weights_are_refused_after_the_checks(garbage_weights):
  """The control for the cases above: with good input, that checkpoint does fail."""
  with pytest.raises(ValueError, match="truncated or corrupt") as e:
    infer.infer(_config(checkpoint=str(garbage_weights)))
  message = cli.one_line(e.value).replace(str(garbage_weights), "DIR")
  faults.record("infer.py", "--checkpoint=DIR (model.safetensors overwritten with garbage)",
                f"infer.py: {message}", before="compile")


def _rows(text: str) -> set[str]:
  return {" ".join(line.split()) for line in text.splitlines() if line.strip()}


def test_readme_fsdp_command_runs(capsys):
  """--config.mesh=data=1,fsdp=-1,tensor=1 on the 8 test devices: the one prompt is
  repeated over the 8 fsdp shards, and the costs printed are those of one prompt. (That
  an FSDP mesh answers as one device does is test_pipeline's.)"""
  infer.infer(_config(mesh="data=1,fsdp=-1,tensor=1"))
  out = capsys.readouterr().out
  assert "batch: 8 copies of the prompt" in out and "answer:" in out
  one = tokred_jax.Pipeline.load(tokred_jax.TINY_CHECKPOINT, weights=False)
  plan = one.plan("none")
  image = os.path.join(tokred_jax.DEFAULT_CHECKPOINT, "sample.png")
  batch = one.prepare([image], [pipeline.default_prompt(tokred_jax.TINY_CHECKPOINT)], 2,
                      plan=plan)
  new_tokens = int(re.search(r"new tokens\s+(\d+)", out)[1])
  assert _rows(report.cost_table({}, one.cost(batch, plan, new_tokens))) <= _rows(out)
