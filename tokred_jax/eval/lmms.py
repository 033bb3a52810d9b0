"""The lmms-eval model "tokred_jax": any token-reduction setting on lmms-eval's tasks.

  lmms-eval --model tokred_jax --tasks pope,mme --batch_size 16 --output_path out/ \
      --model_args pretrained=/ckpt/llava-1.5-7b-hf,method=aim@0.25,dtype=bfloat16

or in Python, `lmms_eval.evaluator.simple_evaluate(model=TokredJax(method="aim@0.25"),
tasks=[...])`, then `with_cost(results, model)`. Registered through the entry point
group `lmms_eval.models` (`tokred_jax.eval.lmms_manifest`), so installing the package is
the registration.

Model args:
  pretrained      a Hugging Face LLaVA / LLaVA-NeXT / OneVision directory (default: the
                  embedded glyph-llava).
  method          a setting as `tokred_jax.eval.evaluate.parse_settings` reads it: "none",
                  "aim@0.25", "aim-252", "tome+fastv@0.25", "aim@flops=0.3", ...; or a bare
                  method with `retention`. Budgets are solved at `text_tokens` text tokens.
  dtype           float32 or bfloat16.     template   the chat template (default: the model's).
  batch_size      prompts per call; the last batch of a group is filled with repeats.
  mesh            e.g. data=2:tensor=4 (NAME=SIZE joined by ":"; -1: the remaining devices).
  max_new_tokens  when a task's generation_kwargs give none.  num_frames, seed.

Generation keeps the original LLaVA decoding: greedy unless a task asks temperature > 0
(then top_p sampling); `until` strings cut the answer; beams are refused. Images come as
PIL images, a video as one path. The plan is made as the project's evaluation makes it
(`evaluate.setting_plan`), so answers equal `evaluate.evaluate`'s for the same questions.

Cost: per request, as `evaluate` computes it (`evaluate._costs`: analytic prefill FLOPs
and KV bytes at the method's exact counts and the real prompt length, equivalent visual
tokens), and latency: the batch's timed wall time over its batch size, every new input
shape run once untimed first. Each request is logged with lmms-eval's `log_metrics`, so
results["throughput"] holds `avg_<task>/prefill_flops`, `/kv_bytes`,
`/equivalent_visual_tokens`, `/latency_s`; `with_cost` puts the same means into
results["results"][task], next to the task's metrics.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Sequence

import jax
import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from PIL import Image

from tokred_jax import methods
from tokred_jax.engine import budget as budgets
from tokred_jax.engine.generate import SamplingConfig
from tokred_jax.engine.pipeline import DEFAULT_CHECKPOINT, Pipeline
from tokred_jax.eval import evaluate
from tokred_jax.io import templates
from tokred_jax.models.config import ConfigError

NAME = "tokred_jax"  # as tokred_jax.eval.lmms_manifest registers it
COST_FIELDS = ("prefill_flops", "kv_bytes", "equivalent_visual_tokens", "latency_s")
# generation_kwargs the LLaVA-1.5 tasks send; any other is refused rather than ignored.
# image_aspect_ratio (mmbench, scienceqa_img, seedbench) picks among the original LLaVA
# code's image processors: images here are processed as the checkpoint's processor does.
GEN_KWARGS = {"until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams",
              "image_aspect_ratio"}


def parse_mesh(spec: str) -> dict[str, int]:
  """"data=2:tensor=4" -> {"data": 2, "tensor": 4} (model args split on commas)."""
  try:
    return {name: int(size) for name, size in (p.split("=") for p in spec.split(":"))}
  except ValueError:
    raise ConfigError(f"mesh={spec!r}: write NAME=SIZE joined by ':', e.g. "
                      "mesh=data=2:tensor=4 or mesh=fsdp=-1.") from None


class TokredJax(lmms):
  """A Pipeline and one token-reduction setting, answering lmms-eval's requests."""

  def __init__(self, pretrained: str = DEFAULT_CHECKPOINT, method: str = "none",
               retention: float | None = None, dtype: str = "float32",
               batch_size: int | str = 8, mesh: str | None = None,
               template: str | None = None, max_new_tokens: int = 128,
               text_tokens: int = budgets.TEXT_TOKENS, num_frames: int = 32, seed: int = 0,
               device: str | None = None, max_batch_size: int | None = None):
    # device and max_batch_size are what the lmms-eval command passes every model: JAX
    # runs on its default platform, over `mesh`, at the fixed `batch_size`.
    del device, max_batch_size
    super().__init__()
    if str(batch_size).isdigit() and int(batch_size) > 0:
      self.batch_size = int(batch_size)
    else:
      raise ConfigError(f"batch_size={batch_size!r}: give a positive whole number (there is "
                        "no 'auto': every batch size compiles its own programs).")
    if retention is not None:
      if "@" in str(method):
        raise ConfigError(f"method={method} already sets its level; drop retention="
                          f"{retention} or write method={method.split('@')[0]}.")
      method = f"{method}@{retention}"
    (self.setting,) = evaluate.parse_settings(str(method))
    # Config and tokenizer first: a setting the model cannot run fails before the weights.
    self.pipe = Pipeline.load(pretrained, dtype, None if mesh is None else parse_mesh(mesh),
                              template, weights=False)
    mesh_shape = self.pipe.mesh.shape if self.pipe.mesh is not None else {}
    split = math.prod(mesh_shape.get(a, 1) for a in ("data", "fsdp"))
    if self.batch_size % split:
      raise ConfigError(f"batch_size={self.batch_size} does not split over the mesh's data x "
                        f"fsdp = {split} devices; give a multiple of {split}.")
    if self.pipe.anyres and self.setting.budget is not None:
      raise ConfigError(f"method={self.setting.label}: budgets are solved per input bucket on "
                        f"{self.pipe.cfg.arch}; give a retention (e.g. aim@0.25) instead.")
    # The anyres models plan per input bucket (`Pipeline.batch_plan`), so they take the recipe.
    self.plan = (methods.get(self.setting.method, self.pipe.cfg, self.setting.retention,
                             **dict(self.setting.options)) if self.pipe.anyres else
                 evaluate.setting_plan(self.pipe.cfg, self.setting, text_tokens))
    self.template = templates.get(self.pipe.cfg.template or "tokred")
    self.max_new_tokens, self.num_frames = int(max_new_tokens), int(num_frames)
    self.rng, self.calls = jax.random.PRNGKey(seed), 0
    self.pipe.load_weights()
    self._warmed: set = set()
    self._costs = collections.defaultdict(list)  # task -> [(FLOPs, KV, tokens, s)] a request

  @property
  def cost(self) -> dict[str, dict[str, float]]:
    """Per task, the mean of each of COST_FIELDS over its requests so far."""
    return {task: dict(zip(COST_FIELDS, np.mean(np.asarray(rows, np.float64), 0).tolist()))
            for task, rows in self._costs.items()}

  def _sampling(self, kwargs: dict[str, Any]) -> tuple[SamplingConfig, tuple[str, ...]]:
    """The SamplingConfig and stop strings of a request's generation_kwargs."""
    unknown = sorted(set(kwargs) - GEN_KWARGS)
    if unknown or kwargs.get("num_beams", 1) != 1:
      what = f"option {unknown[0]!r}" if unknown else f"num_beams={kwargs['num_beams']}"
      raise ConfigError(f"generation {what} is not supported by {NAME}; it takes "
                        f"{', '.join(sorted(GEN_KWARGS - {'num_beams'}))} and num_beams=1 "
                        "only.")
    until = kwargs.get("until") or ()
    sample = kwargs.get("do_sample", True) and float(kwargs.get("temperature") or 0) > 0
    sampling = SamplingConfig(int(kwargs.get("max_new_tokens") or self.max_new_tokens),
                              float(kwargs["temperature"]) if sample else 0.0,
                              float(kwargs.get("top_p") or 1.0) if sample else 1.0)
    return sampling, (until,) if isinstance(until, str) else tuple(until)

  def _visuals(self, doc_to_visual, doc) -> list[Any]:
    """A request's PIL images (RGB) or its one video path."""
    found = doc_to_visual(doc) if doc_to_visual else []
    found = found if isinstance(found, (list, tuple)) else [found]
    found = [v for v in found if v is not None]
    if not found:
      raise ConfigError(f"{NAME} answers about images or videos; this request has none "
                        "(text-only tasks need a text model).")
    return [v.convert("RGB") if isinstance(v, Image.Image) else v for v in found]

  def _prepare(self, prompts: Sequence[str], visuals: Sequence[list[Any]], new_tokens: int,
               chat_template: bool = True):
    """A padded batch and its plan: one image per prompt on LLaVA-1.5, several images or one
    video (a path) on the anyres models."""
    if isinstance(visuals[0][0], str):
      batch = self.pipe.prepare(None, prompts, new_tokens, chat_template, self.plan,
                                videos=[v[0] for v in visuals], num_frames=self.num_frames)
    else:
      images = [v[0] if len(v) == 1 else v for v in visuals]
      batch = self.pipe.prepare(images, prompts, new_tokens, chat_template, self.plan)
    return batch, self.pipe.batch_plan(batch, self.plan)

  def _timed(self, key, run):
    """run()'s result and wall time, run once untimed first for each new key (compiles)."""
    if key not in self._warmed:
      run()
      self._warmed.add(key)
    start = time.perf_counter()
    out = jax.block_until_ready(run())
    return out, time.perf_counter() - start

  def _record(self, tasks: Sequence[str], batch, plan, seconds: float, new: Sequence[int]):
    """Each real row's cost, kept per task and logged for results["throughput"]."""
    latency = seconds / len(batch["input_ids"])
    for task, n, (flops, kv, tokens, _) in zip(tasks, new, evaluate._costs(
        self.pipe, plan, batch, len(tasks))):
      self._costs[task].append((flops, kv, tokens, latency))
      log_metrics(latency, int(n), n / latency if latency else 0.0, {
          "total_requests": 1, **{f"{task}/{k}": v for k, v in zip(
              COST_FIELDS, (flops, kv, tokens, latency))}})

  def _generate(self, items: Sequence[tuple[str, list[Any], dict, str]]) -> list[str]:
    """Answers to (context, visuals, generation_kwargs, task) items, in their order.

    Items with the same settings and kind of visual are batched together, shortest
    context first, so that batches share a length bucket."""
    groups = collections.defaultdict(list)
    for i, (context, visuals, kwargs, _) in enumerate(items):
      groups[self._sampling(kwargs), isinstance(visuals[0], str)].append(i)
    out = [""] * len(items)
    for ((sampling, until), _), order in groups.items():
      order.sort(key=lambda i: len(items[i][0]))
      for start in range(0, len(order), self.batch_size):
        rows = order[start:start + self.batch_size]
        full = rows + rows[-1:] * (self.batch_size - len(rows))  # one program per bucket
        batch, plan = self._prepare([items[i][0] for i in full], [items[i][1] for i in full],
                                    sampling.max_new_tokens)
        rng = None
        if sampling.temperature > 0:
          rng, self.calls = jax.random.fold_in(self.rng, self.calls), self.calls + 1
        shapes = tuple(np.shape(a) for a in jax.tree_util.tree_leaves(batch))
        (tokens, timings), _ = self._timed(
            ("generate", sampling, shapes),
            lambda: self.pipe.generate_tokens(batch, sampling, rng, plan))
        seconds = timings.prefill_s + timings.decode_s  # as evaluate times a batch
        texts = [self.pipe.tokenizer.decode(t) for t in tokens[:len(rows)]]
        for i, text in zip(rows, texts):
          cuts = [text.find(s) for s in until if s and s in text]
          out[i] = text[:min(cuts)] if cuts else text
        pad = self.pipe.cfg.pad_token_id or 0
        self._record([items[i][3] for i in rows], batch, plan, seconds,
                     np.sum(np.asarray(tokens[:len(rows)]) != pad, axis=1))
    return out

  def _doc(self, task: str, split: str, doc_id: int) -> dict:
    return self.task_dict[task][split][doc_id]

  def generate_until(self, requests: list[Instance]) -> list[str]:
    """Instance.args: (context, generation_kwargs, doc_to_visual, doc_id, task, split)."""
    return self._generate([
        (ctx, self._visuals(to_visual, self._doc(task, split, doc_id)), kwargs, task)
        for ctx, kwargs, to_visual, doc_id, task, split in (r.args for r in requests)])

  def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
    """Instance.args: (context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task,
    split). After round r, doc_to_text(doc, previous_output=, round_idx=r + 1,
    previous_round_info=) returns (visuals, context, done, outputs, info) for the next
    round; each round answers every unfinished request in batches. One list of answers,
    one a round, per request."""
    args = [r.args for r in requests]
    docs = [self._doc(task, split, doc_id) for *_, doc_id, task, split in args]
    items = [(a[0], self._visuals(a[2], d), a[1], a[5]) for a, d in zip(args, docs)]
    outputs, infos, live, round_idx = [[] for _ in args], [None] * len(args), list(
        range(len(args))), 0
    while live:
      for i, text in zip(live, self._generate([items[i] for i in live])):
        outputs[i].append(text)
      round_idx, still = round_idx + 1, []
      for i in live:
        visuals, context, done, outputs[i], infos[i] = args[i][3](
            docs[i], previous_output=outputs[i], round_idx=round_idx,
            previous_round_info=infos[i])
        if not done:
          items[i] = (context, self._visuals(lambda v: v, visuals), args[i][1], args[i][5])
          still.append(i)
      live = still
    return [list(o) for o in outputs]

  def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
    """Instance.args: (context, continuation or doc_to_target, doc_to_visual, doc_id, task,
    split). The sum of log p(continuation token | everything before it) over the
    continuation's tokens, after the context in the chat template, and whether greedy
    decoding would give every one of them."""
    rows = []
    for ctx, cont, to_visual, doc_id, task, split in (r.args for r in requests):
      doc = self._doc(task, split, doc_id)
      cont = cont if isinstance(cont, str) else cont(doc)
      prompt = self.template.prompt(ctx)  # as Pipeline.prepare writes a question
      n = (len(self.template.encode(self.pipe.tokenizer, prompt + cont)[0]) -
           len(self.template.encode(self.pipe.tokenizer, prompt)[0]))
      rows.append((prompt + cont, self._visuals(to_visual, doc), n, task))
    out = [(0.0, True)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      full = chunk + chunk[-1:] * (self.batch_size - len(chunk))
      batch, plan = self._prepare([rows[i][0] for i in full], [rows[i][1] for i in full], 0,
                                  chat_template=False)
      shapes = tuple(np.shape(a) for a in jax.tree_util.tree_leaves(batch))
      logits, seconds = self._timed(("forward", shapes), lambda: self.pipe.forward(batch, plan))
      # Prompts are left-padded, so every one ends at T - 1: position t predicts t + 1.
      logp = np.asarray(jax.nn.log_softmax(logits[:, :-1].astype(np.float32), -1))
      targets = np.asarray(batch["input_ids"])[:, 1:]
      for b, i in enumerate(chunk):
        n = rows[i][2]
        if not n:  # an empty continuation: log 1, and greedy
          continue
        lp, tg = logp[b, -n:], targets[b, -n:]
        out[i] = (float(np.sum(lp[np.arange(n), tg])), bool(np.all(lp.argmax(-1) == tg)))
      self._record([rows[i][3] for i in chunk], batch, plan, seconds, [0] * len(chunk))
    return out


def with_cost(results: dict[str, Any], model: TokredJax) -> dict[str, Any]:
  """`simple_evaluate`'s results with each task's mean cost (COST_FIELDS) added to
  results["results"][task]."""
  for task, cost in model.cost.items():
    results["results"].setdefault(task, {}).update(cost)
  return results
