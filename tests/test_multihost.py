"""Several processes, one job (JAX's multi-controller runtime) on localhost CPU devices.

A job of 2 processes x 2 devices (and of 4 x 1) trains exactly as 1 process x 4 devices
on the same mesh and global batch: loss by loss and in its exported weights. Killing
one process of a job ends the job; rerunning it resumes from the last complete
checkpoint and ends where the uninterrupted job ends. The evaluation on 2 processes
predicts exactly what 1 process predicts, and infer.py answers once.
"""

import json
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest
import safetensors.numpy

from tokred_jax import data
from tokred_jax.core import distributed, localhost
from tokred_jax.eval import evaluate
from tests import faults
from tokred_jax.io import checkpoint
from tests.test_trainer import CFG, OVERRIDES, REPO, random_params, read_scalars

# The same mesh for every layout: data over the hosts, FSDP within them.
MESH = "data=2,fsdp=2,tensor=1"
GLOBAL_BATCH = 8
STEPS = 12
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("model") / "tiny"
  checkpoint.save_checkpoint(path, CFG, random_params())
  return str(path)


def command(model_dir, workdir, num_processes):
  overrides = dict(OVERRIDES, num_steps=STEPS, log_every=1, checkpoint_every=4,
                   keep_checkpoints=3, mesh=MESH)
  overrides["data.batch_size"] = GLOBAL_BATCH // num_processes  # per host
  return [sys.executable, str(REPO / "train.py"),
          f"--config={REPO / 'configs' / 'train_tiny.py'}:synthetic",
          f"--config.model.checkpoint={model_dir}", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in overrides.items()]]


def run_ok(command, num_processes, devices, log_dir):
  """The finished job, once every process exited 0 (else the first failure's output)."""
  codes, job = localhost.run(command, num_processes, devices, TIMEOUT_S, log_dir, cwd=REPO)
  assert codes == [0] * num_processes, job.output(codes.index(next(c for c in codes if c)))
  return job


def train(model_dir, workdir, num_processes, devices):
  return run_ok(command(model_dir, workdir, num_processes), num_processes, devices,
                f"{workdir}-logs")


def exported(workdir):
  return safetensors.numpy.load_file(workdir / "export" / "model.safetensors")


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one") / "run"
  train(model_dir, workdir, 1, 4)
  return workdir


@pytest.fixture(scope="module")
def two_processes(model_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two") / "run"
  train(model_dir, workdir, 2, 2)
  return workdir


def assert_same_run(got, want, exact=False, first_step=1):
  """The losses of steps first_step.. and the exported weights agree (to float32
  tolerance, or bit for bit)."""
  got_loss, want_loss = read_scalars(got)["train/loss"], read_scalars(want)["train/loss"]
  steps = list(range(first_step, STEPS + 1))
  assert [s for s in sorted(got_loss) if s >= first_step] == steps
  np.testing.assert_allclose([got_loss[s] for s in steps], [want_loss[s] for s in steps],
                             rtol=0 if exact else 1e-5)
  got_w, want_w = exported(got), exported(want)
  assert got_w.keys() == want_w.keys()
  for k in want_w:
    if exact:
      np.testing.assert_array_equal(got_w[k], want_w[k], err_msg=k)
    else:
      np.testing.assert_allclose(got_w[k], want_w[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_two_processes_train_as_one(one_process, two_processes):
  assert_same_run(two_processes, one_process)
  # The loss fell, so the comparison is of a run that learned something.
  loss = read_scalars(two_processes)["train/loss"]
  assert loss[STEPS] < loss[1]
  # Each host wrote its own data position, the primary host the rest, once.
  for step in (4, 8, 12):
    data = two_processes / "checkpoints" / str(step) / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


def test_four_processes_train_as_one(model_dir, one_process, tmp_path):
  workdir = tmp_path / "run"
  train(model_dir, workdir, 4, 1)
  assert_same_run(workdir, one_process)


def finished_steps(workdir):
  path = workdir / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def test_killed_process_job_resumes(model_dir, two_processes, tmp_path):
  workdir = tmp_path / "run"
  job = localhost.start(command(model_dir, workdir, 2), 2, 2, f"{workdir}-logs", cwd=REPO)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not [s for s in finished_steps(workdir) if s >= 4]:
      assert time.monotonic() < deadline and all(p.poll() is None for p in job.processes), \
          job.output(0)[-3000:]
      time.sleep(0.01)
    job.processes[1].send_signal(signal.SIGKILL)
    codes = job.wait(TIMEOUT_S)  # the job's other process is stopped with it
  finally:
    job.stop()
  assert codes[1] == -signal.SIGKILL and codes[0] != 0, codes
  assert not (workdir / "export").exists()
  killed_at = max(finished_steps(workdir))
  assert 4 <= killed_at < STEPS

  job = train(model_dir, workdir, 2, 2)
  assert f"resumed from step {killed_at}" in job.output(0)
  # The killed job's last TensorBoard events may be lost with it; the resumed job logs
  # every step after the checkpoint.
  assert_same_run(workdir, two_processes, exact=True, first_step=killed_at + 1)


def evaluate_job(tmp_path, num_processes):
  """The evaluation of 10 questions in batches of 2 (5 batches: 3 on process 0 and 2
  on process 1 of two) over settings with static and data-dependent counts."""
  out = tmp_path / f"eval-{num_processes}.json"
  command = [sys.executable, "-m", "benchmarks.evaluate", "--limit=10", "--batch=2",
             "--max_new_tokens=3", "--settings=none,aim@0.25,mustdrop-64", "--variants=",
             f"--json={out}", "--markdown=", "--plot="]
  job = run_ok(command, num_processes, 1, tmp_path / f"eval-{num_processes}-logs")
  return json.loads(out.read_text()), job


def test_evaluation_on_two_processes_predicts_as_one(tmp_path):
  one, _ = evaluate_job(tmp_path, 1)
  two, job = evaluate_job(tmp_path, 2)
  assert two["ids"] == one["ids"] and len(one["ids"]) == 10
  labels = ["none", "aim@0.25", "mustdrop-64", "random@0.25", "pooling-2x2"]
  assert [r["label"] for r in two["results"]] == [r["label"] for r in one["results"]] == labels
  for got, want in zip(two["results"], one["results"]):
    assert len(got["predictions"]) == 10
    for key in ("predictions", "accuracy", "correct_by_type", "flops", "flops_compiled",
                "kv_bytes", "equivalent_visual_tokens", "equivalent_visual_tokens_official"):
      assert got[key] == want[key], (got["label"], key)
  # Process 0 ran 3 of the 5 batches of each setting, showed progress and wrote the file.
  assert "15/15 [" in job.output(0) and "wrote" in job.output(0)
  assert "wrote" not in job.output(1)


def test_infer_on_two_processes_answers_once(tmp_path):
  """Each process answers on its own 2-device mesh; process 0 alone prints."""
  command = [sys.executable, "infer.py", "--config.max_new_tokens=4", "--config.mesh=data=2"]
  one = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                       env=localhost.process_env(2))
  assert one.returncode == 0, one.stderr
  answer, = [line for line in one.stdout.splitlines() if line.startswith("answer:")]
  job = run_ok(command, 2, 2, tmp_path / "logs")
  assert [line for line in job.output(0).splitlines() if line.startswith("answer:")] == [answer]
  assert "answer:" not in job.output(1)


def test_finite_epochs_refused_on_several_hosts(model_dir, tmp_path):
  """Hosts' shards of a finite data set differ in length: one would run out first."""
  workdir = tmp_path / "run"
  flag = "--config.data.num_epochs=1"
  codes, job = localhost.run(command(model_dir, workdir, 2) + [flag], 2, 1, TIMEOUT_S,
                             tmp_path / "logs", cwd=REPO)
  # The launcher stops the job at the first failure: each process refuses, or is
  # stopped before it gets there.
  refused = [i for i, code in enumerate(codes) if code == 1]
  assert refused and set(codes) <= {1, -signal.SIGKILL}, (codes, job.output(0))
  # Every process that refused said the same line.
  (message,) = {job.output(i).strip().splitlines()[-1] for i in refused}
  assert "a job of several hosts needs it unset" in message, message
  assert "Traceback" not in job.output(0) + job.output(1)
  assert not (workdir / "checkpoints").exists()
  faults.record("train.py", f"{flag} on 2 processes", message, before="the model loads")


# ------------------------------------------------- without processes: input and data


@pytest.mark.parametrize("flags, problem", [
    (["--num_processes=2", "--process_id=0"], "needs --coordinator_address too"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"],
     "give it as HOST:PORT"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"],
     "must be in 0 .. 1"),
    (["--distributed=auto", "--num_processes=2"], "--distributed=auto detects"),
])
def test_bad_job_flags_refused_at_once(flags, problem, tmp_path):
  proc = subprocess.run(
      [sys.executable, str(REPO / "train.py"), f"--config={REPO}/configs/train_tiny.py:synthetic",
       f"--workdir={tmp_path / 'run'}", *flags], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 1 and problem in proc.stderr, proc.stderr
  assert not (tmp_path / "run").exists()  # nothing was written
  faults.record("train.py", " ".join(flags), proc.stderr, before="joining the job")


def test_unreachable_coordinator_is_one_line():
  """JAX's runtime would abort the process with a C++ stack trace; nothing listens on
  a port just freed."""
  port = str(localhost.free_port())
  options = distributed.Options(f"localhost:{port}", 2, 1, timeout_s=1)
  with pytest.raises(ValueError, match="nothing answered there in 1 s") as e:
    distributed.initialize(options)
  faults.record("distributed.initialize", "--process_id=1 with no process 0 at the address",
                str(e.value).replace(port, "PORT"), before="joining the job")


@pytest.mark.parametrize("length, count", [(10, 1), (10, 2), (11, 2), (11, 4), (3, 4)])
def test_shards_are_disjoint_and_cover_the_stream(length, count):
  stream = grain.MapDataset.range(length).shuffle(seed=3)
  shards = [list(data.shard(stream, i, count)) for i in range(count)]
  assert max(map(len, shards)) - min(map(len, shards)) <= 1
  # Together, in the order hosts stack their batches, they are the stream: host i holds
  # elements i, i + count, ...
  merged = [shards[i % count][i // count] for i in range(length)]
  assert merged == list(stream)


def test_infinite_stream_shards():
  stream = grain.MapDataset.range(5).shuffle(seed=0).repeat(None)
  shards = [data.shard(stream, i, 2) for i in range(2)]
  assert [shards[i][j] for j in range(6) for i in range(2)] == [stream[k] for k in range(12)]


@pytest.mark.parametrize("examples, batch, processes", [(10, 2, 2), (10, 4, 3), (3, 4, 2),
                                                        (7, 1, 4)])
def test_evaluation_batches_split_over_processes(examples, batch, processes, monkeypatch):
  """Every one-process batch runs on exactly one process, and the shares differ by at
  most one batch."""
  one = list(evaluate.my_batches(examples, batch))
  shares = []
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  for index in range(processes):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    shares.append(list(evaluate.my_batches(examples, batch)))
    assert evaluate.batches_per_setting(examples, batch) == len(shares[-1])
  assert sorted(s for share in shares for s in share) == one
  assert max(map(len, shares)) - min(map(len, shares)) <= 1
