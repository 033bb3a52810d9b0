"""Training LLaVA models: token cross-entropy, AdamW, sharded jitted steps, Orbax resume.

`train` reads top to bottom: mesh -> data -> model -> restore -> step -> loop -> export.

  state, history = trainer.train(config, workdir)   # see configs/train_tiny.py
  trainer.export(config, workdir)                   # latest checkpoint -> HF directory

Batches are dicts of numpy arrays (`BATCH_NDIM`): input_ids i32[B, T],
attention_mask bool[B, T], positions i32[B, T], pixel_values f32[B, S, S, 3],
labels i32[B, T] (the next token at each position) and loss_mask bool[B, T] (True on
the tokens the loss counts, the assistant's). Anyres and video models take their
visual keys instead of pixel_values (`batch_ndim`; tokred_jax.data.visual: crops and
their layout, or frames and frame_valid), as the plan's input bucket says. One batch is
one optimizer step; with `optim.accum_steps = k` the step splits it into k micro-batches.

Choices, and why:
  * Gradient accumulation is a `lax.scan` over micro-batches inside the one jitted
    step, not `optax.MultiSteps`. The scan sums per-token losses and token counts over
    the micro-batches and divides once, so the step equals the step on the whole batch
    (a mean of per-micro-batch means would weight tokens unequally when micro-batches
    hold different numbers of assistant tokens). It also keeps one data batch = one
    optimizer step = one checkpointable step, and the accumulator lives only inside
    the step instead of in the optimizer state and every checkpoint.
  * Frozen parameters (`optim.freeze`, a regex on paths like "vision/layers_0/...") are
    split off before differentiation: the optimizer sees only the trainable ones, so
    frozen ones get no gradient, no update (they pass through bit for bit) and no
    optimizer state, and XLA drops the backward pass through a frozen vision tower.
  * Optimizer-state shardings come from `jax.eval_shape` of the optimizer's init: every
    leaf whose key path ends in a parameter's path (Adam's mu and nu) takes that
    parameter's sharding; the rest (step counts) are replicated.
  * The data iterator's position is saved in the same Orbax step as the train state
    (see `train_checkpoint`), so a resumed run draws exactly the batches it would have
    drawn.
  * Nothing bad is kept: the whole config is checked before anything loads
    (`train_checks`); restored state is verified against a digest saved with it; a
    non-finite loss or gradient stops the run (`Diverged`) before its state is saved,
    so the last good checkpoint stays; SIGTERM/SIGINT save the current step and stop
    (`Interrupted`); a lock on the workdir keeps a second run out.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import struct, traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokred_jax.core import sharding
from tokred_jax.data import visual
from tokred_jax.engine import cost
from tokred_jax.io import checkpoint
from tokred_jax.methods import pmod
from tokred_jax.methods.base import Plan
from tokred_jax.models import llava
from tokred_jax.models.config import LlavaConfig
from tokred_jax.train import checks as train_checks
from tokred_jax.train.setup import (DTYPES, Batch, CheckpointableIterator, Params,
                                    export_tokenizer, load_params, make_dataset, make_model,
                                    make_plan, model_config, param_shapes)
# Diverged and Stopped too: what `train` raises, so callers find them here.
from tokred_jax.train.checkpoint import (Diverged, Interrupted, NonFiniteState,  # noqa: F401
                                         Stopped, StopSignals, check_finite,
                                         checkpoint_manager, diverged, restore, save,
                                         workdir_lock)

# The batch contract: key -> rank. Every batch is sharded on its leading axis.
BATCH_NDIM = {"input_ids": 2, "attention_mask": 2, "positions": 2, "pixel_values": 4,
              "labels": 2, "loss_mask": 2}
_TEXT_NDIM = {k: n for k, n in BATCH_NDIM.items() if k != "pixel_values"}


def batch_ndim(plan: Plan | None) -> dict[str, int]:
  """The batch contract of a step with `plan`: BATCH_NDIM for one image a sequence, the
  text keys and the visual ones of its input bucket for the anyres and video models."""
  kind = visual.kind_of(None if plan is None else plan.packing)
  return BATCH_NDIM if kind == visual.IMAGE else {**_TEXT_NDIM, **visual.NDIM[kind]}


class TrainState(struct.PyTreeNode):
  """Everything a step changes, saved whole by Orbax.

  step: i32[], optimizer steps done; params: the full parameter tree (f32 masters,
  frozen ones included); opt_state: the optimizer state of the trainable parameters;
  rng: u32[2], the run's key (step s draws from fold_in(rng, s), so resumed runs draw
  the same numbers).
  """
  step: jax.Array
  params: Params
  opt_state: Any
  rng: jax.Array


# ----------------------------------------------------------------------------- loss


def token_loss(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy over the masked tokens and their number.

  logits f32[B, T, V], labels i32[B, T], loss_mask bool[B, T] -> (f32[], i32[]). Sums,
  not a mean, so that micro-batches add up to the whole batch exactly.
  """
  logits = logits.astype(jnp.float32)
  target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - target
  return jnp.sum(jnp.where(loss_mask, ce, 0.0)), jnp.sum(loss_mask, dtype=jnp.int32)


# ------------------------------------------------------------------------ optimizer


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int
                           ) -> optax.Schedule:
  """Linear warmup over `warmup_fraction` of the steps, then cosine decay to
  `end_learning_rate`. Indexed by steps done, so the first update already uses
  lr / warmup steps rather than being spent at lr 0."""
  warmup = math.ceil(optim.warmup_fraction * num_steps)
  base = optax.warmup_cosine_decay_schedule(
      0.0, optim.learning_rate, warmup, num_steps + 1, optim.end_learning_rate)
  return lambda count: base(count + 1)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping, then AdamW (weight decay on matrices only: decaying norm
  scales and biases would pull them towards 0 for no regularising benefit)."""
  schedule = learning_rate_schedule(optim, num_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  return tx, schedule


def split_params(params: Params, freeze: str) -> tuple[Params, Params]:
  """(trainable, frozen): two nested dicts; a path ("vision/layers_0/attn/q/kernel")
  matching the regex `freeze` (re.search; "" freezes nothing) goes to `frozen`."""
  flat = traverse_util.flatten_dict(params, sep="/")
  is_frozen = {k: bool(freeze) and re.search(freeze, k) is not None for k in flat}
  pick = lambda want: traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if is_frozen[k] == want}, sep="/")
  return pick(False), pick(True)


def merge_params(trainable: Params, frozen: Params) -> Params:
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trainable, sep="/"),
                                       **traverse_util.flatten_dict(frozen, sep="/")},
                                      sep="/")


# ------------------------------------------------------------------------- sharding


def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
  """A sharding for every optimizer-state leaf: a leaf whose key path ends in a
  parameter's path (e.g. ".../mu/llm/layers_0/mlp/up/kernel") and has its shape takes
  that parameter's sharding; the others (counts) are replicated."""
  by_path = {_path(p): (x.shape, s) for (p, x), s in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0],
      jax.tree.leaves(param_shardings))}
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    keys = _path(path).split("/")
    for start in range(len(keys)):  # longest suffix first
      shape, s = by_path.get("/".join(keys[start:]), (None, None))
      if shape == leaf.shape:
        return s
    return replicated
  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def state_shardings(abstract_state: TrainState, freeze: str, mesh: Mesh,
                    rules: sharding.Rules) -> TrainState:
  """Shardings of a TrainState (from `jax.eval_shape`): params by logical axis."""
  params = sharding.param_shardings(abstract_state.params, mesh, rules)
  trainable, _ = split_params(abstract_state.params, freeze)
  trainable_shardings, _ = split_params(params, freeze)
  replicated = NamedSharding(mesh, PartitionSpec())
  return TrainState(
      replicated, params,
      opt_state_shardings(abstract_state.opt_state, trainable, trainable_shardings, mesh),
      replicated)


def state_builder(tx: optax.GradientTransformation, seed: int, freeze: str):
  """fn(params) -> the step-0 TrainState; `jax.eval_shape` of it gives the layout."""
  def build(params):
    return TrainState(jnp.zeros((), jnp.int32), params,
                      tx.init(split_params(params, freeze)[0]),
                      jax.random.key_data(jax.random.key(seed)))
  return build


def init_state(params: Params, tx: optax.GradientTransformation, seed: int, freeze: str,
               mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES
               ) -> tuple[TrainState, TrainState]:
  """A step-0 TrainState laid out on `mesh`, and its shardings.

  The optimizer init is jitted with the derived out_shardings, so Adam's moments are
  created already split like their parameters (never whole on one device).
  """
  build = state_builder(tx, seed, freeze)
  shardings = state_shardings(jax.eval_shape(build, params), freeze, mesh, rules)
  params = jax.device_put(params, shardings.params)
  return jax.jit(build, out_shardings=shardings)(params), shardings


# --------------------------------------------------------------------- the step


def _micro_batches(x: jax.Array, k: int, mesh: Mesh, rules: sharding.Rules) -> jax.Array:
  """[B, ...] -> [k, B/k, ...]; micro-batch j holds samples j, j+k, j+2k, ...

  Strided rather than contiguous: each device's contiguous block of the batch holds
  equal shares of every micro-batch, so the split needs no communication.
  """
  x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.lax.with_sharding_constraint(
      x, sharding.logical_sharding((None, "batch") + (None,) * (x.ndim - 2), mesh, rules))


def make_train_step(model: llava.Llava, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, shardings: TrainState, mesh: Mesh,
                    rules: sharding.Rules = sharding.DEFAULT_RULES, *, freeze: str = "",
                    accum_steps: int = 1, plan: Plan | None = None):
  """The jitted step: fn(state, batch) -> (state, metrics), the state donated.

  `batch` follows `BATCH_NDIM` (numpy or arrays sharded on the batch axis), its size a
  multiple of accum_steps x the batch mesh axes. metrics: f32[] loss (mean over the
  masked tokens), grad_norm (before clipping), learning_rate (this step's); i32[]
  loss_tokens. `plan` is a static reduction plan (None: no reduction).
  """
  counts = plan.counts() if plan is not None else None
  ndim = batch_ndim(plan)

  def micro_loss(trainable, frozen, batch, rng):
    logits = model.apply({"params": merge_params(trainable, frozen)}, batch["input_ids"],
                         visual.model_input(batch), batch["attention_mask"],
                         batch["positions"], plan=plan, counts=counts, rng=rng)
    loss_sum, count = token_loss(logits, batch["labels"], batch["loss_mask"])
    return loss_sum, (loss_sum, count)

  grad_fn = jax.grad(micro_loss, has_aux=True)
  trainable_shardings, _ = split_params(shardings.params, freeze)

  def step(state: TrainState, batch: Batch):
    trainable, frozen = split_params(state.params, freeze)
    rng = jax.random.fold_in(state.rng, state.step)

    def accumulate(carry, xs):
      grads, loss_sum, count = carry
      micro, j = xs
      g, (l, c) = grad_fn(trainable, frozen, micro, jax.random.fold_in(rng, j))
      return (jax.tree.map(jnp.add, grads, g), loss_sum + l, count + c), None

    zeros = jax.lax.with_sharding_constraint(
        jax.tree.map(jnp.zeros_like, trainable), trainable_shardings)
    micro = {k: _micro_batches(batch[k], accum_steps, mesh, rules) for k in ndim}
    (grads, loss_sum, count), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)),
        (micro, jnp.arange(accum_steps)))
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = merge_params(optax.apply_updates(trainable, updates), frozen)
    metrics = dict(loss=loss_sum / denom, loss_tokens=count,
                   grad_norm=optax.tree.norm(grads),
                   learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_shardings = {k: sharding.batch_sharding(mesh, n, rules) for k, n in ndim.items()}
  jitted = jax.jit(step, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
                   donate_argnums=0)

  split = accum_steps * train_checks.batch_devices(mesh, rules)

  def run(state: TrainState, batch: Batch):
    missing = [k for k in ndim if k not in batch]
    if missing:
      raise ValueError(f"the batch has no {', '.join(missing)}, which a step planned for "
                       f"{visual.kind_of(None if plan is None else plan.packing)} inputs "
                       "takes; make the data with the same plan (setup.make_dataset).")
    if batch["input_ids"].shape[0] % split:
      raise ValueError(f"a batch of {batch['input_ids'].shape[0]} does not split into "
                       f"{accum_steps} micro-batches over the batch mesh axes; make it a "
                       f"multiple of {split}.")
    # Traced inside the context, so the model's `constrain` calls lay activations out.
    with sharding.activation_sharding(mesh, rules):
      return jitted(state, {k: batch[k] for k in ndim})
  return run


def put_batch(batch: Batch, mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES
              ) -> dict[str, jax.Array]:
  """This process's share of a batch -> global arrays split on the batch axes (the keys
  of the batch contract it holds: `batch_ndim` of any kind)."""
  known = {**BATCH_NDIM, **visual.NDIM[visual.ANYRES], **visual.NDIM[visual.VIDEO]}
  return {k: jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, n, rules), np.asarray(batch[k]))
      for k, n in known.items() if k in batch}


def train_flops_per_step(cfg: LlavaConfig, plan: Plan, batch: int, length: int
                         ) -> int:
  """Matmul FLOPs of one step, padding included: 3x the forward (the usual estimate,
  the backward costing twice the forward), with logits at every position.

  It overcounts a frozen vision tower, whose backward XLA skips, by 2x its forward.
  """
  forward = cost.plan_cost(cfg, plan, length - plan.num_visual, batch)["flops"]
  head = cost.lm_head_flops(cfg, length, batch).total
  return 3 * (forward.total - forward.lm_head.total + head)


# ------------------------------------------------------------------------ logging


class _Meter:
  """Averages step metrics between log points, and measures throughput on the wall
  clock from the end of the first step on (so compilation is not counted)."""

  def __init__(self, flops_per_step: int):
    self.flops_per_step = flops_per_step
    self.pending: list[dict[str, jax.Array]] = []
    self.timed_steps = 0
    self.tokens = 0
    self.start: float | None = None

  def add(self, metrics: dict[str, jax.Array], tokens: int):
    self.pending.append(metrics)
    if self.start is None:
      jax.block_until_ready(metrics)
      self.start = time.perf_counter()
    else:
      self.timed_steps += 1
      self.tokens += tokens

  def flush(self) -> dict[str, float]:
    """Means over the steps since the last flush; the learning rate of the last."""
    steps = jax.device_get(self.pending)
    out = {k: float(np.mean([m[k] for m in steps])) for k in steps[0]}
    out["learning_rate"] = float(steps[-1]["learning_rate"])
    if self.timed_steps:
      elapsed = time.perf_counter() - self.start
      out["tokens_per_s"] = self.tokens / elapsed
      out["flops_per_s"] = self.flops_per_step * self.timed_steps / elapsed
      self.start, self.timed_steps, self.tokens = time.perf_counter(), 0, 0
    self.pending = []
    return out


# ------------------------------------------------------------------------ the run


def _run_setup(config: ml_collections.ConfigDict, cfg: LlavaConfig):
  """What `train` and `export` share: (mesh, optimizer, its schedule, the step-0 state
  builder, the state's abstract shapes, its shardings). Checks the freeze pattern and
  the batch layout against the model (nothing loaded or compiled yet)."""
  mesh = sharding.make_mesh(sharding.parse_mesh(config.mesh) or {"data": -1})
  paths = list(traverse_util.flatten_dict(param_shapes(cfg), sep="/"))
  train_checks.check_layout(config, mesh, paths, jax.process_count())
  tx, schedule = make_optimizer(config.optim, config.num_steps)
  build = state_builder(tx, config.seed, config.optim.freeze)
  abstract = jax.eval_shape(build, param_shapes(cfg))
  shardings = state_shardings(abstract, config.optim.freeze, mesh, sharding.DEFAULT_RULES)
  return mesh, tx, schedule, build, abstract, shardings


def _export_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.export_dir or os.path.join(workdir, "export")


def train(config: ml_collections.ConfigDict, workdir: str,
          dataset: CheckpointableIterator | None = None) -> tuple[TrainState, list[dict]]:
  """Trains for `config.num_steps`, resuming from WORKDIR/checkpoints if it holds one.

  Writes TensorBoard events to WORKDIR/tensorboard and, with `config.export`, the final
  params as a Hugging Face directory (`config.export_dir`, default WORKDIR/export).
  `dataset` replaces the iterator `config.data` names. Returns the final state and the
  logged metrics (one dict per log point, with its "step").

  Raises ValueError for bad input (before anything loads), `Diverged` when a step's
  loss or gradient is not finite, `Interrupted` after saving on SIGTERM/SIGINT.
  """
  train_checks.check_config(config, DTYPES)
  train_checks.check_workdir(workdir, create=True)
  if dataset is None:
    train_checks.check_data(config)
  if config.export:
    train_checks.check_export_dir(_export_path(config, workdir))
  with workdir_lock(workdir):
    return _train(config, workdir, dataset)


def _train(config: ml_collections.ConfigDict, workdir: str,
           dataset: CheckpointableIterator | None) -> tuple[TrainState, list[dict]]:
  """`train` once its input is checked and the workdir locked."""
  # Mesh, optimizer and the state's layout.
  cfg = model_config(config)
  mesh, tx, schedule, build, abstract, shardings = _run_setup(config, cfg)
  rules = sharding.DEFAULT_RULES
  # Data: as many image slots per sequence as the reduction plan keeps visual tokens.
  plan = make_plan(config, cfg)
  dataset = dataset if dataset is not None else make_dataset(config, cfg, plan)
  # Model.
  model = make_model(config, cfg)
  # Restore the latest complete checkpoint (verified), or start from the model checkpoint.
  manager = checkpoint_manager(workdir, config)
  if manager.latest_step() is not None:
    state, data_state = restore(manager, manager.latest_step(), abstract, shardings)
    dataset.set_state(data_state)
    tqdm.tqdm.write(f"resumed from step {int(state.step)}")
  else:
    params = load_params(config, cfg)
    state = jax.jit(build, out_shardings=shardings)(jax.device_put(params, shardings.params))
  # Step.
  step_fn = make_train_step(model, tx, schedule, shardings, mesh, rules,
                            freeze=config.optim.freeze, accum_steps=config.optim.accum_steps,
                            plan=plan)
  # Loop.
  global_batch = config.data.batch_size * jax.process_count()
  meter = _Meter(train_flops_per_step(cfg, plan, global_batch, config.data.max_length))
  writer = None
  if jax.process_index() == 0:
    # Imported here: tensorboardX imports torch when it is installed (seconds).
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  history = []
  done = int(state.step)
  bar = tqdm.tqdm(range(done + 1, config.num_steps + 1), initial=done,
                  total=config.num_steps, desc="train", disable=jax.process_index() != 0)
  unchecked = []  # (step, metrics) not yet checked finite
  try:
    with StopSignals() as signals:
      for step in bar:
        batch = next(dataset)
        data_state = dataset.get_state()  # the position after this step's batch
        state, metrics = step_fn(state, put_batch(batch, mesh, rules))
        unchecked.append((step, metrics))
        meter.add(metrics, int(np.sum(batch["attention_mask"])) * jax.process_count())
        stop = signals.received or (jax.process_count() > 1 and
                                    manager.reached_preemption(step))
        log = step % config.log_every == 0 or step == config.num_steps
        saving = manager.should_save(step) or step == config.num_steps or stop
        # Reading the previous step's metrics lets this one run meanwhile; before a save
        # or a log point this step's are read too (that waits for it).
        check_finite(unchecked if saving or log else unchecked[:-1], manager)
        unchecked = [] if saving or log else unchecked[-1:]
        if saving:
          # Async: returns once the state is copied off the devices, so donating it to
          # the next step is safe.
          try:
            save(manager, step, state, data_state)
          except NonFiniteState as e:
            raise diverged(manager, str(e)) from None
        if log:
          logged = meter.flush()
          history.append(dict(logged, step=step))
          bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['learning_rate']:.2e}",
                          tok_s=f"{logged.get('tokens_per_s', 0):.0f}")
          if writer is not None:
            for name, value in logged.items():
              writer.add_scalar(f"train/{name}", value, step)
        if stop:
          manager.wait_until_finished()
          name = signal.Signals(signals.received or signal.SIGTERM).name
          raise Interrupted(f"stopped by {name} after step {step}, which is saved in "
                            f"{manager.directory / str(step)}; rerun the same command to "
                            "resume.", signals.received or signal.SIGTERM)
  finally:
    bar.close()
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()
  if config.export:
    export_params(config, workdir, trained_config(cfg, plan), state.params)
  return state, history


def trained_config(cfg: LlavaConfig, plan: Plan) -> LlavaConfig:
  """`cfg` recording the p-MoD ratios it was trained at, so that inference uses them."""
  ratios = pmod.trained_ratios(plan)
  if ratios is None or not cfg.text.router_layers:
    return cfg
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text,
                                                           router_ratios=tuple(ratios)))


def export_params(config: ml_collections.ConfigDict, workdir: str, cfg: LlavaConfig,
                  params: Params) -> str:
  """Writes `params` as a Hugging Face LLaVA directory (with the model checkpoint's
  tokenizer.json, if it has one) to `config.export_dir` or WORKDIR/export; returns it."""
  path = _export_path(config, workdir)
  host = multihost_utils.process_allgather(params, tiled=True)  # whole arrays, every host
  if jax.process_index() == 0:
    checkpoint.save_checkpoint(path, cfg, host, export_tokenizer(config, cfg, workdir))
  return path


def export(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Exports the params of WORKDIR's latest complete checkpoint (see `export_params`)."""
  train_checks.check_config(config, DTYPES)
  train_checks.check_workdir(workdir, create=False)
  train_checks.check_export_dir(_export_path(config, workdir))
  with workdir_lock(workdir):
    cfg = model_config(config)
    _, _, _, _, abstract, shardings = _run_setup(config, cfg)
    manager = checkpoint_manager(workdir, config)
    try:
      if manager.latest_step() is None:
        raise ValueError(f"no complete checkpoint in {workdir}/checkpoints to export; "
                         "train first (the same command without --export_only).")
      state, _ = restore(manager, manager.latest_step(), abstract, shardings)
    finally:
      manager.close()
    return export_params(config, workdir, trained_config(cfg, make_plan(config, cfg)),
                         state.params)
