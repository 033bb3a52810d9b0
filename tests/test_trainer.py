"""Training: accumulation and sharding leave the step unchanged, the loss falls, frozen
parameters stay put, and a run killed (SIGKILL) or stopped (SIGTERM, which saves first)
mid-way resumes to bit-identical parameters.

One uninterrupted `python train.py` run (`reference`) serves several tests and is what
the killed-and-resumed run must match bit for bit. It starts in the background with the
module, so that it overlaps the in-process compilations of the one-step tests, which
therefore come first.
"""

import dataclasses
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from configs import train_tiny
from tokred_jax.core import sharding
from tokred_jax.io import checkpoint
from tokred_jax.models import llava
from tokred_jax.train import setup as train_setup, trainer
from tests import faults
from tests.testing import VISION_28
from tokred_jax.models.config import LlavaConfig, TextConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
# One vision layer runs (LLaVA reads layer -2) and one LLM layer: compiling the training
# step dominates these tests' time.
CFG = LlavaConfig(
    vision=VISION_28,
    text=TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                    bos_token_id=1, eos_token_id=2),
    image_token_id=95, pad_token_id=0)
# Config fields of every run here, as `--config.NAME=VALUE` flags would set them.
OVERRIDES = {"data.dataset": "synthetic", "data.batch_size": 8, "data.max_length": 16,
             "num_steps": 40, "log_every": 5, "checkpoint_every": 10,
             "keep_checkpoints": 2, "optim.learning_rate": 3e-3,
             "mesh": "data=1,fsdp=-1,tensor=1"}


def random_params(seed=0):
  """Random values in the model's shapes (compiling the real init costs seconds)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: rng.normal(0, 1.0 if x.ndim == 1 else x.shape[0] ** -0.5,
                           x.shape).astype(np.float32), trainer.param_shapes(CFG))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("model") / "tiny"
  checkpoint.save_checkpoint(path, CFG, random_params())
  return str(path)


def train_command(model_dir, workdir):
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return [sys.executable, str(REPO / "train.py"),
          f"--config={REPO / 'configs' / 'train_tiny.py'}:synthetic",
          f"--config.model.checkpoint={model_dir}", f"--workdir={workdir}", *flags]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  """Subprocesses share a compilation cache (only the first compiles the step) and run
  FSDP over 2 CPU devices (8 share the cores slowly)."""
  return dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
              XLA_FLAGS="--xla_force_host_platform_device_count=2")


def start_run(model_dir, workdir, env):
  """`python train.py` in the background, its output in WORKDIR.log."""
  with open(f"{workdir}.log", "w") as log:  # the child keeps its own copy
    return subprocess.Popen(train_command(model_dir, workdir), env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for(proc, workdir):
  code = proc.wait(timeout=600)
  assert code == 0, pathlib.Path(f"{workdir}.log").read_text()[-3000:]


@pytest.fixture(scope="module", autouse=True)
def reference_run(model_dir, cache_env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  proc = start_run(model_dir, workdir, cache_env)
  yield workdir, proc
  proc.kill()  # if a test failed before waiting for it
  proc.wait()


@pytest.fixture(scope="module")
def reference(reference_run):
  """The workdir of the finished uninterrupted run."""
  workdir, proc = reference_run
  wait_for(proc, workdir)
  return workdir


def read_scalars(workdir):
  """{tag: {step: value}} from the run's TensorBoard event files (one per start of the
  run, named by time: a resumed run's later values of a step replace earlier ones)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for events in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    data, i = events.read_bytes(), 0
    while i < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        scalars.setdefault(v.tag, {})[event.step] = v.simple_value
  assert scalars, f"no event files in {workdir / 'tensorboard'}"
  return scalars


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def path_str(path):
  return jax.tree_util.keystr(path, simple=True, separator="/")


# ----------------------------------------------- one step: accumulation and sharding

OPTIM = train_tiny.get_config().optim
# Adam's first step moves a weight by lr·g/(|g| + eps): about lr·sign(g) wherever
# |g| >> eps, so with the usual eps = 1e-8 the rounding in a near-zero gradient turns
# into a move of order lr. An eps far above rounding noise keeps the step a smooth
# function of the gradient, so parameters can be compared at fp32 tolerance.
OPTIM.eps = 1e-4


def one_step(mesh, accum_steps=1):
  """Params and metrics after one step on a fixed batch of 8."""
  tx, schedule = trainer.make_optimizer(OPTIM, 10)
  state, shardings = trainer.init_state(random_params(), tx, 0, OPTIM.freeze, mesh)
  step = trainer.make_train_step(llava.Llava(CFG), tx, schedule, shardings, mesh,
                                 freeze=OPTIM.freeze, accum_steps=accum_steps)
  batch = next(train_setup.synthetic_dataset(CFG, CFG.num_image_tokens, 8, 16, seed=1))
  batch["loss_mask"][:3] = False  # micro-batches with different token counts
  state, metrics = step(state, trainer.put_batch(batch, mesh))
  return flat(state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device_step():
  return one_step(sharding.make_mesh({"data": 1}, jax.devices()[:1]))


def assert_same_step(got, want, rtol):
  (params, metrics), (params_want, metrics_want) = got, want
  for k in ("loss", "grad_norm", "learning_rate"):
    np.testing.assert_allclose(metrics[k], metrics_want[k], rtol=rtol, err_msg=k)
  assert metrics["loss_tokens"] == metrics_want["loss_tokens"]
  for k, v in params_want.items():
    np.testing.assert_allclose(params[k], v, rtol=rtol, atol=1e-7, err_msg=k)


def test_grad_accumulation_equals_big_batch(single_device_step):
  accumulated = one_step(sharding.make_mesh({"data": 1}, jax.devices()[:1]), accum_steps=2)
  assert_same_step(accumulated, single_device_step, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", [{"data": 1, "fsdp": 8, "tensor": 1},
                                        {"data": 2, "fsdp": 1, "tensor": 4}],
                         ids=["fsdp8", "data2xtensor4"])
def test_sharded_step_equals_single_device(single_device_step, mesh_shape):
  assert_same_step(one_step(sharding.make_mesh(mesh_shape)), single_device_step, rtol=1e-5)


# ------------------------------------------- layouts and loading (nothing compiled)


def test_frozen_params_have_no_optimizer_state():
  params = trainer.param_shapes(CFG)
  tx, _ = trainer.make_optimizer(train_tiny.get_config().optim, 10)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  abstract = jax.eval_shape(trainer.state_builder(tx, 0, "^vision/"), params)
  paths = [path_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]]
  assert not [p for p in paths if "vision" in p]
  assert [p for p in paths if p.endswith("mu/llm/layers_0/mlp/up/kernel")]
  # Adam's moments are split like their parameters (FSDP on embed).
  shardings = trainer.state_shardings(abstract, "^vision/", mesh, sharding.DEFAULT_RULES)
  up = shardings.params["llm"]["layers_0"]["mlp"]["up"]["kernel"]
  assert up.spec[0] == "fsdp"
  moments = [s for path, s in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
             if path_str(path).endswith("llm/layers_0/mlp/up/kernel")]
  assert len(moments) == 2 and all(s == up for s in moments)


def test_add_routers_to_a_dense_checkpoint():
  config = train_tiny.get_config("synthetic")  # the embedded 4-layer model
  config.model.add_routers = "cosine"
  cfg = trainer.model_config(config)
  assert cfg.text.router_layers == (1, 2, 3)  # PRD keeps layer 0 dense
  params = flat(trainer.load_params(config, cfg))
  _, dense = checkpoint.load_checkpoint(train_setup.TINY_CHECKPOINT)
  for k, v in flat(dense).items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  routers = sorted(k for k in params if "/router/" in k)
  assert routers == [f"llm/layers_{l}/router/{n}" for l in (1, 2, 3)
                     for n in ("bias", "kernel")]
  assert all(not params[k].any() for k in routers)  # zero: the dense model at first


# ------------------------------------------------------------- the reference run


def test_loss_falls(reference):
  losses = read_scalars(reference)["train/loss"]
  assert losses[20] < 0.7 * losses[5], losses
  assert losses[40] < losses[20], losses
  # Each sample's loss counts the last 5 of its 11 text tokens.
  assert set(read_scalars(reference)["train/loss_tokens"].values()) == {8 * 5}


def test_frozen_params_unchanged_others_trained(reference, model_dir):
  _, start = checkpoint.load_checkpoint(model_dir)
  _, end = checkpoint.load_checkpoint(reference / "export")
  start, end = flat(start), flat(end)
  vision = [k for k in start if k.startswith("vision/")]
  assert vision and end.keys() == start.keys()
  for k in vision:
    np.testing.assert_array_equal(end[k], start[k], err_msg=k)
  for k in set(start) - set(vision):
    assert not np.array_equal(end[k], start[k]), k


def test_metrics_in_tensorboard(reference):
  scalars = read_scalars(reference)
  for name in ("loss", "learning_rate", "grad_norm", "loss_tokens", "tokens_per_s",
               "flops_per_s"):
    assert sorted(scalars[f"train/{name}"]) == list(range(5, 41, 5)), name
  assert scalars["train/flops_per_s"][20] > 0
  lr = scalars["train/learning_rate"]
  assert lr[5] == pytest.approx(3e-3, rel=0.03) and lr[40] < 1e-5  # 2 warmup steps


def test_export_has_normal_permissions(reference):
  """Files 0644 and directories 0755 under the usual umask 022 (not tempfile's 0700 or
  safetensors' 0600): whoever shares the machine can read the model."""
  umask = os.umask(0)
  os.umask(umask)
  export = reference / "export"
  assert export.stat().st_mode & 0o777 == 0o777 & ~umask
  files = list(export.iterdir())
  assert {f.name for f in files} >= {"config.json", "model.safetensors"}
  for f in files:
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_export_on_demand_equals_the_runs_export(reference, model_dir, tmp_path):
  config = train_tiny.get_config("synthetic")
  config.model.checkpoint = model_dir
  config.update_from_flattened_dict(OVERRIDES)
  config.export_dir = str(tmp_path / "exported")
  cfg, params = checkpoint.load_checkpoint(trainer.export(config, str(reference)))
  want_cfg, want = checkpoint.load_checkpoint(reference / "export")
  # CFG records no chat template, so the loaded model, and its export, get the default.
  assert cfg == want_cfg == dataclasses.replace(CFG, template="tokred")
  for k, v in flat(want).items():
    np.testing.assert_array_equal(flat(params)[k], v, err_msg=k)


# ------------------------------------------------------------------ kill and resume


def finished_steps(workdir):
  path = workdir / "checkpoints"
  if not path.exists():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def test_killed_run_resumes_bit_exact(reference, model_dir, cache_env, tmp_path):
  workdir = tmp_path / "run"
  proc = start_run(model_dir, workdir, cache_env)
  deadline = time.time() + 300
  while not [s for s in finished_steps(workdir) if s >= 10] and time.time() < deadline:
    assert proc.poll() is None, pathlib.Path(f"{workdir}.log").read_text()[-3000:]
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "export").exists()
  killed_at = max(finished_steps(workdir))
  assert 10 <= killed_at < 40

  # A half-written checkpoint of a later step, as a crash during a save leaves it.
  partial = workdir / "checkpoints" / f"{killed_at + 5}.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 64)

  wait_for(start_run(model_dir, workdir, cache_env), workdir)
  assert f"resumed from step {killed_at}" in pathlib.Path(f"{workdir}.log").read_text()
  assert not partial.exists()  # cleaned up, never loaded
  got = safetensors.numpy.load_file(workdir / "export" / "model.safetensors")
  want = safetensors.numpy.load_file(reference / "export" / "model.safetensors")
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_terminated_run_saves_resumes_bit_exact(reference, model_dir, cache_env, tmp_path):
  """SIGTERM (a preempted VM) saves the step in progress, whatever the interval, and
  exits 128 + 15 with one line; the rerun resumes there and ends as the reference."""
  workdir = tmp_path / "run"
  proc = start_run(model_dir, workdir, cache_env)
  deadline = time.time() + 300
  while not finished_steps(workdir) and time.time() < deadline:
    assert proc.poll() is None, pathlib.Path(f"{workdir}.log").read_text()[-3000:]
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before it could be stopped"
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 128 + signal.SIGTERM
  log = pathlib.Path(f"{workdir}.log").read_text()
  assert "Traceback" not in log
  (line,) = [l for l in log.splitlines() if "stopped by SIGTERM" in l]
  stopped_at = int(line.split("after step ")[1].split(",")[0])
  assert 10 <= stopped_at < 40 and max(finished_steps(workdir)) == stopped_at, log[-2000:]
  assert not (workdir / "export").exists()
  faults.record("train.py", "SIGTERM during training", line.strip(),
                before="-", intact=f"step {stopped_at} saved, resumed bit-exact")

  wait_for(start_run(model_dir, workdir, cache_env), workdir)
  assert f"resumed from step {stopped_at}" in pathlib.Path(f"{workdir}.log").read_text()
  got = safetensors.numpy.load_file(workdir / "export" / "model.safetensors")
  want = safetensors.numpy.load_file(reference / "export" / "model.safetensors")
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
