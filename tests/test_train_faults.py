"""Training's bad inputs and faults: one line naming the problem and the fix, before the
model loads or compiles, and no saved state lost (checkpoints byte-identical, nothing
non-finite saved, restored or exported).

Most cases call `trainer.train`/`trainer.export` in-process with the expensive steps
patched to fail the test if reached; one batch of `python train.py` subprocesses checks
what the user sees (exit status 1, one line, no traceback).
"""

import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import glyph_llava, train_pmod_llava15, train_tiny
from tests import faults
from tests.test_trainer import CFG, OVERRIDES, random_params
from tokred_jax import cli
from tokred_jax.io import checkpoint
from tokred_jax.train import checkpoint as train_checkpoint
from tokred_jax.train import checks as train_checks
from tokred_jax.train import setup as train_setup
from tokred_jax.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("model") / "tiny"
  checkpoint.save_checkpoint(path, CFG, random_params())
  return str(path)


def make_config(model_dir, **overrides):
  """The test_trainer runs' config, with `overrides` as {dotted field: value}."""
  config = train_tiny.get_config("synthetic")
  config.model.checkpoint = model_dir
  config.update_from_flattened_dict({**OVERRIDES, **overrides})
  return config


def snapshot(path) -> dict[str, bytes]:
  """Every file under `path`, by relative path."""
  path = pathlib.Path(path)
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file()}


@pytest.fixture
def no_heavy_work(monkeypatch):
  """Fails the test if the run gets as far as loading weights, restoring or compiling."""
  def forbidden(name):
    def fail(*args, **kwargs):
      raise AssertionError(f"{name} ran before the bad input was refused")
    return fail
  for name in ("load_params", "restore", "make_train_step"):
    monkeypatch.setattr(trainer, name, forbidden(name))
  return forbidden


def refused(fn, *args, match: str) -> str:
  """The one-line message of the ValueError `fn(*args)` raises."""
  with pytest.raises(ValueError, match=match) as e:
    fn(*args)
  return cli.one_line(e.value)


# ----------------------------------------------------------------- config arguments


@pytest.mark.parametrize("get_config, arg, match", [
    (train_tiny.get_config, "nope", r"no argument or one of \('synthetic',\)"),
    (train_pmod_llava15.get_config, "/some/llava", "takes no argument"),
    (glyph_llava.get_config, "pmod-cosin", "did you mean 'cosine'"),
    (glyph_llava.get_config, "tower-linear", "unknown stage"),
])
def test_config_file_arguments_refused(get_config, arg, match):
  message = refused(get_config, arg, match=match)
  module = get_config.__module__.replace(".", "/")
  faults.record("train.py", f"--config={module}.py:{arg}", message, before="config load")


# --------------------------------------------------------- config values, up front

BAD_VALUES = [
    ("checkpoint_every", 0, "positive integer"),
    ("num_steps", 0, "positive integer"),
    ("num_steps", -5, "positive integer"),
    ("log_every", 0, "positive integer"),
    ("keep_checkpoints", 0, "positive integer"),
    ("seed", -1, r"\[0, 2\*\*32\)"),
    ("data.batch_size", 0, "positive integer"),
    ("data.max_length", -1, "positive integer"),
    ("data.worker_count", -2, ">= 0"),
    ("data.on_bad_sample", "ignore", "on_bad_sample must be one of"),
    ("optim.learning_rate", -1.0, "positive number"),
    ("optim.learning_rate", float("nan"), "positive number"),
    ("optim.end_learning_rate", 1.0, "at most optim.learning_rate"),
    ("optim.warmup_fraction", 1.5, r"in \[0, 1\]"),
    ("optim.b2", 1.0, r"in \[0, 1\)"),
    ("optim.eps", 0.0, "positive number"),
    ("optim.clip_norm", 0.0, "positive number"),
    ("optim.weight_decay", -0.1, ">= 0"),
    ("optim.accum_steps", 0, "positive integer"),
    ("optim.accum_steps", 3, r"divisor of data.batch_size \(8\)"),
    ("optim.freeze", "^vision/(", "regular expression"),
    ("model.dtype", "float16", "one of"),
    ("mesh", "dat=8", "unknown axis 'dat' \\(did you mean 'data'\\?\\)"),
    ("mesh", "data=2,data=4", "given twice"),
    ("mesh", "data=0,fsdp=-1", "a size is positive"),
    ("mesh", "data=-1,fsdp=-1", "at most one axis may be -1"),
    ("mesh", "data:2", "name=size pairs"),
]


@pytest.mark.parametrize("field, value, match", BAD_VALUES,
                         ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_bad_config_values_refused_before_anything(model_dir, tmp_path, monkeypatch,
                                                   no_heavy_work, field, value, match):
  monkeypatch.setattr(trainer, "model_config", no_heavy_work("model_config"))
  workdir = tmp_path / "run"
  message = refused(trainer.train, make_config(model_dir, **{field: value}), str(workdir),
                    match=match)
  assert f"config.{field}" in message
  assert not workdir.exists()  # refused before the workdir was made
  faults.record("train.py", f"--config.{field}={value}", message,
                before="reading the model config")


@pytest.mark.parametrize("field, value, match", [
    ("optim.freeze", "^visoin/", "matches some parameter path"),
    ("optim.freeze", ".", "leaves some parameter to train"),
    ("data.batch_size", 4, r"\(4\) splits into 1 micro-batch\(es\) over the 8 devices"),
    ("optim.accum_steps", 2, "a multiple of 16 per host"),
    ("model.checkpoint", "/no/such/model", "does not exist"),
    ("model.method", "fastvv", "unknown method 'fastvv'"),
], ids=["freeze-matches-nothing", "freeze-matches-all", "batch-vs-devices", "accum-vs-devices",
        "no-model", "unknown-method"])
def test_layout_refused_before_weights_load(model_dir, tmp_path, no_heavy_work, field, value,
                                            match):
  # 8 devices on the batch axes (fsdp=-1).
  message = refused(trainer.train, make_config(model_dir, **{field: value}),
                    str(tmp_path / "run"), match=match)
  devices = " (8 devices)" if field in ("data.batch_size", "optim.accum_steps") else ""
  faults.record("train.py", f"--config.{field}={value}{devices}", message,
                before="weights load")


# ---------------------------------------------------------- workdir, export, data


def test_workdir_and_export_dir_refused(model_dir, tmp_path, no_heavy_work):
  file = tmp_path / "a-file"
  file.write_text("keep me")
  config = make_config(model_dir)
  cases = [(str(file), "is a file, not a directory"),
           (str(file / "run"), "cannot create --workdir .*: Not a directory"),
           ("/proc/tokred-run", "cannot create --workdir /proc/tokred-run")]
  for workdir, match in cases:
    message = refused(trainer.train, config, workdir, match=match)
    case = workdir.replace(str(file), "A_FILE")
    faults.record("train.py", f"--workdir={case}", message, before="weights load",
                  intact="the file")
  assert file.read_text() == "keep me"

  config.export_dir = str(file)
  message = refused(trainer.train, config, str(tmp_path / "run"), match="export directory")
  assert file.read_text() == "keep me"
  faults.record("train.py", "--config.export_dir=A_FILE", message, before="training",
                intact="the file")


def test_export_only_without_checkpoint(model_dir, tmp_path, no_heavy_work):
  config = make_config(model_dir)
  for workdir in (tmp_path / "missing", tmp_path / "empty"):
    if workdir.name == "empty":
      workdir.mkdir()
    message = refused(trainer.export, config, str(workdir), match="no checkpoints in")
    assert "train first" in message
    assert not (workdir / "checkpoints").exists() and not (workdir / "export").exists()
    faults.record("train.py", f"--export_only --workdir=<{workdir.name} dir>", message,
                  before="weights load", intact="workdir (nothing created)")


def test_data_refused_before_tfds(model_dir, tmp_path, monkeypatch, no_heavy_work):
  import tensorflow_datasets as tfds
  # TFDS would download or generate a data set it does not find: refused before that.
  monkeypatch.setattr(tfds, "data_source", no_heavy_work("tfds.data_source"))
  data_dir = tmp_path / "tfds"
  version = data_dir / "llava_conversations" / "mix" / "1.0.0"
  version.mkdir(parents=True)
  (version / "dataset_info.json").write_text('{"splits": [{"name": "train"}]}')
  cases = [({"data.dataset": ""}, "no training data"),
           ({"data.dataset": "llava_conversations/mix"}, "data_dir is not set"),
           ({"data.dataset": "llava_conversations/mix", "data.data_dir": "/no/such/dir"},
            "is not a directory"),
           ({"data.dataset": "llava_conversations/mx", "data.data_dir": str(data_dir)},
            "no data set 'llava_conversations/mx' .*did you mean 'llava_conversations/mix'"),
           ({"data.dataset": "glyph_vqa/default", "data.data_dir": str(data_dir)},
            "it holds llava_conversations/mix"),
           ({"data.dataset": "llava_conversations/mix", "data.data_dir": str(data_dir),
             "data.split": "valid"}, "no split 'valid'.* it has train")]
  for overrides, match in cases:
    config = make_config(model_dir)
    if "data.split" in overrides:
      config.data.split = overrides.pop("data.split")
    config.update_from_flattened_dict(overrides)
    message = refused(trainer.train, config, str(tmp_path / "run"), match=match)
    case = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
    faults.record("train.py", case.replace(str(tmp_path), "TMP") or "no data set", message,
                  before="data load", intact="data_dir (nothing downloaded or generated)")
  assert sorted(p.name for p in data_dir.rglob("*")) == sorted(
      ["llava_conversations", "mix", "1.0.0", "dataset_info.json"])
  # The data set that is there passes.
  config = make_config(model_dir, **{"data.dataset": "llava_conversations/mix",
                                     "data.data_dir": str(data_dir)})
  assert train_checks.check_data(config) is None


# ------------------------------------------------------------------- the lock


def test_second_run_on_a_workdir_refused(model_dir, tmp_path, no_heavy_work):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with train_checkpoint.workdir_lock(str(workdir)):  # the first run
    before = snapshot(workdir)
    for fn in (trainer.train, trainer.export):
      (workdir / "checkpoints").mkdir(exist_ok=True)
      message = refused(fn, make_config(model_dir), str(workdir),
                        match=f"in use by another run \\(pid {os.getpid()}")
      # The table names no pid: it changes from run to run.
      faults.record("train.py", "a second run on the same --workdir"
                    + (" (--export_only)" if fn is trainer.export else ""),
                    message.replace(f"pid {os.getpid()}", "pid <pid>"),
                    before="weights load", intact="workdir")
    assert snapshot(workdir) == before
  # Released with the first run: another lock is granted at once.
  with open(workdir / ".lock") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_stop_signals_are_recorded_then_reverted():
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with train_checkpoint.StopSignals() as signals:
    assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.received == signal.SIGINT
    # After the first, a second signal acts as it normally does.
    assert {s: signal.getsignal(s) for s in before} == before
  assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------------------- restored state


@pytest.fixture(scope="module")
def saved_run(model_dir, tmp_path_factory):
  """A workdir with checkpoints of steps 10 and 20 (written directly: no step compiled)
  and the state they hold."""
  workdir = tmp_path_factory.mktemp("saved") / "run"
  config = make_config(model_dir)
  cfg = trainer.model_config(config)
  _, _, _, build, _, shardings = trainer._run_setup(config, cfg)  # pylint: disable=protected-access
  state = jax.jit(build, out_shardings=shardings)(
      jax.device_put(trainer.load_params(config, cfg), shardings.params))
  data_state = train_setup.synthetic_dataset(CFG, CFG.num_image_tokens, 8, 16, 0).get_state()
  manager = train_checkpoint.checkpoint_manager(str(workdir), config)
  for step in (10, 20):
    train_checkpoint.save(manager, step, state.replace(step=jnp.int32(step)), data_state)
  manager.wait_until_finished()
  manager.close()
  return workdir, jax.device_get(state.params)


def layout(config):
  """(the abstract TrainState, its shardings) of a config."""
  setup = trainer._run_setup(config, trainer.model_config(config))  # pylint: disable=W0212
  return setup[-2:]


def copy_run(saved_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(saved_run[0], workdir)
  return workdir


def test_restore_verifies_across_meshes(saved_run, model_dir, tmp_path):
  """A good checkpoint passes the digest check even on another mesh (the checksum does
  not depend on how the state is split)."""
  workdir = copy_run(saved_run, tmp_path)
  config = make_config(model_dir, mesh="data=2,fsdp=1,tensor=4")
  abstract, shardings = layout(config)
  manager = train_checkpoint.checkpoint_manager(str(workdir), config)
  state, _ = train_checkpoint.restore(manager, 20, abstract, shardings)
  manager.close()
  assert int(state.step) == 20
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved_run[1])):
    np.testing.assert_array_equal(got, want)


def damage_bytes(workdir, model_dir):
  """Random bytes over the middle of each of step 20's data files."""
  del model_dir
  rng = np.random.default_rng(0)
  # Some files hold no live data (superseded writes): damaging only one could miss.
  for chunk in (workdir / "checkpoints" / "20" / "state" / "ocdbt.process_0" / "d").iterdir():
    data = bytearray(chunk.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = rng.bytes(len(data[middle:middle + 64]))
    chunk.write_bytes(bytes(data))


def damage_digest(workdir, model_dir):
  """One checksum of step 20 changed, as a value changed on disk would change it."""
  del model_dir
  digest = workdir / "checkpoints" / "20" / "digest" / "metadata"
  sums = json.loads(digest.read_text())
  sums["params/llm/layers_0/mlp/up/kernel"] ^= 1
  digest.write_text(json.dumps(sums))


def damage_non_finite(workdir, model_dir):
  """Step 20 replaced by NaN params without a digest (as saved before digests existed)."""
  config = make_config(model_dir)
  abstract, shardings = layout(config)
  manager = train_checkpoint.checkpoint_manager(str(workdir), config)
  state, data_state = train_checkpoint.restore(manager, 10, abstract, shardings)
  state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  manager.delete(20)
  manager.save(20, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=train_checkpoint.IteratorStateSave(data_state)))
  manager.wait_until_finished()
  manager.close()


@pytest.mark.parametrize("damage, match, case", [
    (damage_bytes, "cannot be read|is damaged|holds NaN", "random bytes in its data files"),
    (damage_digest, r"is damaged: \['params/llm/layers_0/mlp/up/kernel'\] differ",
     "a changed value (its checksum)"),
    (damage_non_finite, "holds NaN or infinite values", "NaN params, no checksums"),
], ids=["random-bytes", "changed-checksum", "nan-params-without-digest"])
def test_damaged_checkpoint_refused_and_kept(saved_run, model_dir, tmp_path, monkeypatch,
                                             damage, match, case):
  workdir = copy_run(saved_run, tmp_path)
  damage(workdir, model_dir)
  before = snapshot(workdir / "checkpoints")
  monkeypatch.setattr(trainer, "make_train_step", lambda *a, **k: pytest.fail("compiled"))
  config = make_config(model_dir)
  message = refused(trainer.train, config, str(workdir), match=match)
  assert "delete that directory to resume from step 10" in message  # kept, named
  message_export = refused(trainer.export, config, str(workdir), match=match)
  assert snapshot(workdir / "checkpoints") == before
  assert not (workdir / "export").exists()
  faults.record("train.py", f"resume from a checkpoint with {case}", message,
                before="compile", intact="checkpoints byte-identical, nothing exported")
  faults.record("train.py", f"--export_only of a checkpoint with {case}", message_export,
                before="export", intact="checkpoints byte-identical, nothing exported")


def test_resume_under_another_config_refused(saved_run, model_dir, tmp_path, monkeypatch):
  """A changed freeze pattern changes the optimizer state's layout: the saved state does
  not fit, and the message says so before suggesting it is damaged."""
  workdir = copy_run(saved_run, tmp_path)
  before = snapshot(workdir / "checkpoints")
  monkeypatch.setattr(trainer, "make_train_step", lambda *a, **k: pytest.fail("compiled"))
  config = make_config(model_dir, **{"optim.freeze": "^vision/patch_embed/"})
  message = refused(trainer.train, config, str(workdir), match="cannot be read as this "
                    "config's train state .* if the config changed since it was saved")
  assert snapshot(workdir / "checkpoints") == before
  faults.record("train.py", "resume with another --config.optim.freeze", message,
                before="compile", intact="checkpoints byte-identical")


# -------------------------------------------------------------- a diverging run


class PoisonedData:
  """Synthetic batches; the one for step `at` has NaN pixels (a broken image)."""

  def __init__(self, at):
    self.data = train_setup.synthetic_dataset(CFG, CFG.num_image_tokens, 8, 16, 0)
    self.at, self.drawn = at, 0

  def __next__(self):
    batch, self.drawn = next(self.data), self.drawn + 1
    if self.drawn == self.at:
      batch["pixel_values"] = np.full_like(batch["pixel_values"], np.nan)
    return batch

  def get_state(self):
    return self.data.get_state()

  def set_state(self, state):
    self.data.set_state(state)


def test_nan_loss_stops_before_saving_and_keeps_the_last_good(model_dir, tmp_path):
  workdir = tmp_path / "run"
  # Saves at 3 and 6 (two kept); further saves of a NaN state would delete both.
  config = make_config(model_dir, num_steps=12, checkpoint_every=3, keep_checkpoints=2,
                       log_every=4)
  with pytest.raises(trainer.Diverged) as e:
    trainer.train(config, str(workdir), dataset=PoisonedData(at=8))
  message = cli.one_line(e.value)
  assert message.startswith("step 8: the loss is nan")
  assert f"{workdir}/checkpoints keeps step 6, the last good one" in message
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert not (workdir / "export").exists()
  faults.record("train.py", "a NaN loss at step 8 (checkpoints every 3)", message,
                before="saving step 8", intact="checkpoints 3 and 6, nothing exported")


# ------------------------------------------------- what the user sees: train.py


def test_train_py_user_errors_are_one_line(model_dir, tmp_path):
  """Several train.py runs at once (each pays a JAX import): exit status 1 and one line
  on stderr, no traceback, nothing written."""
  locked = tmp_path / "locked"
  locked.mkdir()
  base = [sys.executable, str(REPO / "train.py")]
  tiny = f"--config={REPO / 'configs' / 'train_tiny.py'}"
  runs = {
      "--config=configs/train_tiny.py:nope": [f"{tiny}:nope", "--workdir=W"],
      "--config.checkpoint_every=0": [f"{tiny}:synthetic", "--workdir=W",
                                      "--config.checkpoint_every=0"],
      "--config.mesh=dat=8": [f"{tiny}:synthetic", "--workdir=W", "--config.mesh=dat=8"],
      "--export_only --workdir=EMPTY": [f"{tiny}:synthetic", "--workdir=W",
                                        "--export_only"],
      "a second run on a locked --workdir": [f"{tiny}:synthetic", f"--workdir={locked}"],
  }
  matches = {"--config=configs/train_tiny.py:nope": "no argument or one of",
             "--config.checkpoint_every=0": "config.checkpoint_every=0: must be a positive",
             "--config.mesh=dat=8": "did you mean 'data'",
             "--export_only --workdir=EMPTY": "no checkpoints in",
             "a second run on a locked --workdir": "in use by another run"}
  with open(locked / ".lock", "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    procs = {}
    for case, args in runs.items():
      workdir = tmp_path / f"w{len(procs)}"
      args = [a.replace("--workdir=W", f"--workdir={workdir}") for a in args]
      procs[case] = (workdir, subprocess.Popen(
          base + args + [f"--config.model.checkpoint={model_dir}"], cwd=REPO, text=True,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          env=dict(os.environ, JAX_PLATFORMS="cpu")))
    for case, (workdir, proc) in procs.items():
      out, err = proc.communicate(timeout=300)
      assert proc.returncode == 1, (case, out, err)
      assert "Traceback" not in err, (case, err)
      last = err.strip().splitlines()[-1]
      assert last.startswith("train.py: ") and matches[case] in last, (case, err)
      assert not workdir.exists(), case
      faults.record("train.py", case, last, before="weights load", intact="workdir")
  assert sorted(p.name for p in locked.iterdir()) == [".lock"]


# ------------------------------------------------------- tower_pretrain (stage 1)


def test_tower_pretrain_refuses_bad_config_and_non_finite_loss(tmp_path, monkeypatch):
  from tokred_jax.proj.glyph_vqa import tower_pretrain  # pylint: disable=g-import-not-at-top
  config = glyph_llava.get_config("tower")
  config.update_from_flattened_dict({"num_steps": 0})
  monkeypatch.setattr(tower_pretrain.llava, "init_params",
                      lambda *a: pytest.fail("the model was built"))
  message = refused(tower_pretrain.train, config, str(tmp_path / "tower"),
                    match="config.num_steps=0: must be a positive integer")
  assert not (tmp_path / "tower").exists()
  faults.record("tower_pretrain.py", "--config.num_steps=0", message, before="model init")
  monkeypatch.undo()

  # A loss that turns NaN: the run stops, and no export is written.
  config.update_from_flattened_dict({"num_steps": 2, "log_every": 1, "data.batch_size": 2,
                                     "arch.vision.num_layers": 2, "arch.text.num_layers": 1})
  losses = tower_pretrain.losses
  monkeypatch.setattr(tower_pretrain, "losses", lambda *a: jax.tree.map(
      lambda x: x * jnp.nan, losses(*a)))
  with pytest.raises(trainer.Diverged, match="step 1: the loss is not finite") as e:
    tower_pretrain.train(config, str(tmp_path / "tower"))
  assert not (tmp_path / "tower" / "export").exists()
  faults.record("tower_pretrain.py", "a NaN loss at step 1", cli.one_line(e.value),
                before="writing the export", intact="no export written")
