"""Accuracy against cost of token-reduction settings on a visual-QA test split.

  examples = evaluate.load_examples("glyph_vqa/default", data_dir, limit=400)
  run = evaluate.evaluate(pipe, examples, evaluate.default_settings(pipe.cfg))
  json.dump(run.to_dict(), f)

A *setting* is a method at a retention level ("aim@0.25"), a method at a budget
("aim@flops=0.3": its parameters solved by `tokred_jax.engine.budget` for 30% of dense
prefill FLOPs at the examples' median prompt length; also kv=FRACTION, tokens=COUNT), a
preset ("aim-252"), a method at its own schedule ("none", "pmod": p-MoD's trained PRD
schedule), or a composed recipe at either ("tome+fastv@0.25", "tome+fastv@flops=0.3:
split=0.4", the one option a composed setting takes); `budget_settings` makes the swept
methods at equal budgets. Each is run
over the same examples in the same order (sorted by their index in the split), batched
with the final batch padded by repeats of its last example; answers are decoded
greedily, normalised (`normalize`) and scored by exact match against the reference.
In a job of several processes (`tokred_jax.core.distributed`) every process holds the
whole model on its own devices and runs every n-th of those batches (`my_batches`);
the results are gathered, so every process ends with the Evaluation one process gives.

Per setting (`SettingResult`):
  accuracy        overall and per question type.
  FLOPs           analytic prefill matmul FLOPs per example (`tokred_jax.engine.cost`) at the
                  method's exact counts and each example's real prompt length: for
                  static plans `cost.plan_cost(exact=True)`; for MustDrop, whose counts
                  depend on the data, `cost.request_cost` at the counts each example got.
                  `flops_compiled` is what `Pipeline.cost` reports instead: what the
                  compiled program computes (bucketed capacities and prompt padding; for
                  MustDrop the upper bound, every capacity full).
  KV cache        bytes the prompt leaves in the KV cache after prefill, at the same
                  exact counts (the allocated cache also has room for the new tokens).
  equivalent visual tokens  the mean visual-token count over LLM layers, each layer
                  counted with the tokens it processed. For MustDrop also
                  `equivalent_visual_tokens_official`, the official script's count (a
                  filter layer counted with its post-filter tokens, so it is lower).
  latency         median over batches of the prefill + decode wall time (each phase
                  ended by `jax.block_until_ready`), divided by the batch size. Every new
                  input shape is run once untimed first, so compilation is not timed
                  (MustDrop's segments compile per capacity they meet, which a later batch
                  may still do: the median keeps such a batch out).

The anyres and video models (LLaVA-NeXT, OneVision) plan each batch for its own input
bucket (`setting_input`, `Pipeline.batch_plan`): their FLOPs, KV bytes and equivalent
tokens are at the bucket's counts (its empty slots included), and budget settings,
which are solved per bucket, are skipped.

Settings the model cannot run (e.g. FastV below k/L retention, ToMe beyond what its
layers can merge, pooling at a retention that is not 1/s^2) are recorded as skipped with
the reason; `check_settings(cfg, settings)` raises `ConfigError` for them instead, from
the model's config alone, for a caller that would rather refuse them before any work.
Settings that are malformed (unknown method, retention outside (0, 1]) raise
`ConfigError` when the `Setting` is made.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import statistics
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokred_jax import methods
from tokred_jax.core import distributed
from tokred_jax.data import generated, glyphs
from tokred_jax.engine import budget as budgets
from tokred_jax.engine import cost
from tokred_jax.engine.generate import SamplingConfig
from tokred_jax.engine.pipeline import Pipeline
from tokred_jax.io import anyres, batching, processing, templates
from tokred_jax.methods import fastv, registry
from tokred_jax.methods.base import Plan, Recipe, make_plan
from tokred_jax.models import llava_next, llava_onevision
from tokred_jax.models.config import ConfigError, LlavaConfig

RETENTIONS = (0.5, 0.25, 0.125)
SWEPT_METHODS = ("aim", "fastv", "tome", "random", "pooling")


@dataclasses.dataclass(frozen=True)
class Setting:
  """A method (see `methods.METHODS`), a preset (`methods.PRESETS`) or a composed recipe
  ("tome+fastv", parts joined with "+", see `methods.registry`), with an optional
  retention level in (0, 1] for methods and recipes. Checked when made."""
  method: str
  retention: float | None = None
  # Keyword arguments of the method's builder, e.g. (("k", 1),) for FastV.
  options: tuple[tuple[str, int | float], ...] = ()
  # Or a budget the parameters are solved for (tokred_jax.engine.budget), in `measure`.
  budget: float | None = None
  measure: str = "flops"

  def __post_init__(self):
    known = set(methods.METHODS) | set(methods.PRESETS) | set(methods.PARTS)
    parts = self.method.split("+")
    if any(p not in known for p in parts) or len(parts) == 1 and self.method in methods.PARTS:
      raise ConfigError(f"unknown method {self.method!r}; choose from {methods.METHODS} or "
                        f"the presets {sorted(methods.PRESETS)} (or join methods, presets "
                        f"and the parts {sorted(methods.PARTS)} with '+').")
    if len(parts) > 1 and any(name != "split" for name, _ in self.options):
      raise ConfigError(f"setting {self.method}: a composed recipe takes no options here but "
                        "split; set them in a config file (methods.get(name, cfg, part={...})).")
    if self.budget is not None:
      if self.retention is not None:
        raise ConfigError(f"setting {self.method}: give a retention or a budget, not both.")
      try:  # the budget's own checks (measure, range): they need no model
        budgets.check(self.method, self.budget, self.measure,
                      method_kwargs=dict(self.options))
      except ConfigError as e:
        raise ConfigError(f"setting {self.label}: {e}") from None
    if self.method == "none" and self.retention == 1:
      object.__setattr__(self, "retention", None)  # one dense setting, however written
    if self.retention is None:
      return
    if not 0 < self.retention <= 1:
      raise ConfigError(f"setting {self.method}@{self.retention}: retention must be in "
                        "(0, 1] (the fraction of visual tokens kept on average).")
    if self.method in methods.PRESETS:
      raise ConfigError(f"{self.method!r} is a preset and fixes its own token counts; "
                        "drop the retention or name the method instead.")
    if self.method == "none" and self.retention != 1:
      raise ConfigError("method 'none' keeps every token (retention 1); pick a method to "
                        f"retain {self.retention}.")

  @property
  def label(self) -> str:
    label = self.method if self.retention is None else f"{self.method}@{self.retention:g}"
    if self.budget is not None:
      label = f"{self.method}@{self.measure}={self.budget:g}"
    return label + "".join(f":{name}={value:g}" for name, value in self.options)

  @property
  def base_method(self) -> str:
    """The method a preset belongs to (the name itself for methods)."""
    return methods.PRESETS[self.method][0] if self.method in methods.PRESETS else self.method


def parse_settings(spec: str) -> list[Setting]:
  """Settings from e.g. "none,aim@0.25,aim-252,fastv@0.25:k=1,aim@flops=0.3" (each
  checked; ConfigError names a bad one). ":NAME=NUMBER" passes an option to the method;
  "@MEASURE=VALUE" asks for a budget (see `budget.MEASURES`)."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    head, *options = item.split(":")
    method, _, level = head.partition("@")
    measure, is_budget, amount = level.rpartition("=")
    try:
      value = float(amount) if amount or is_budget else None
      parsed = tuple((name, float(value) if "." in value else int(value))
                     for name, value in (o.split("=") for o in options))
    except ValueError:
      raise ConfigError(f"setting {item!r}: write METHOD@FRACTION[:NAME=NUMBER] or "
                        "METHOD@MEASURE=BUDGET, e.g. aim@0.25, fastv@0.25:k=1 or "
                        "aim@flops=0.3.") from None
    if is_budget:
      out.append(Setting(method, None, parsed, budget=value, measure=measure))
    else:
      out.append(Setting(method, value, parsed))
  if not out:
    raise ConfigError(f"no settings in {spec!r}; e.g. 'none,aim@0.25,pooling-2x2'.")
  return out


def setting_plan(cfg: LlavaConfig, setting: Setting,
                 text_tokens: int = budgets.TEXT_TOKENS, packing=None) -> Plan:
  """The setting's plan for a model of `cfg` (its config alone: no weights needed); a
  budget is solved at prompts of `text_tokens` text tokens; packing: the input bucket
  of an anyres model (`input_packings`). ConfigError says why the model cannot run it,
  an option its method lacks included."""
  options = dict(setting.options)
  builder = registry.BUILDERS.get(setting.base_method)
  takes = inspect.signature(builder).parameters if builder else {}
  # A composed recipe's one option, split, was checked when the setting was made.
  if "+" not in setting.method and not any(p.kind == p.VAR_KEYWORD for p in takes.values()):
    known = [n for n in takes if n not in ("cfg", "retention", "mode")]
    unknown = [n for n in options if n not in known]
    if unknown:
      raise ConfigError(f"setting {setting.label}: {setting.base_method} has no option "
                        f"{unknown[0]!r}; "
                        + (f"its options are {', '.join(known)}." if known else
                           "it takes none."))
  if setting.budget is not None and packing is not None:
    raise ConfigError(f"setting {setting.label}: budgets are solved per input bucket on "
                      f"{cfg.arch}; give a retention (e.g. {setting.method}@0.25) instead.")
  try:
    if setting.budget is not None:
      return budgets.solve(cfg, setting.method, setting.budget, measure=setting.measure,
                           num_text_tokens=text_tokens, **options).plan
    return make_plan(methods.get(setting.method, cfg, setting.retention, **options), cfg,
                     packing)
  except TypeError as e:  # an option that a schedule behind **kwargs does not take
    raise ConfigError(f"setting {setting.label}: {e}.") from None


def input_packings(cfg: LlavaConfig, examples: Sequence[Example] | None = None) -> list:
  """The input buckets (`methods.base.make_plan`'s packing) a model's batches of
  `examples` can fall into: [None] for llava; every crop bucket of the model's pinpoints
  for anyres images (`anyres.crop_buckets`); for videos (`Example.video`) every rung of
  the frame ladder up to the longest one's."""
  if cfg.arch == "llava":
    return [None]
  spec = batching.spec_for(cfg)
  frames = [len(e.video) for e in examples or () if e.video is not None]
  if frames:
    top, _ = anyres.frame_bucket(max(frames), batching.FRAME_LADDER)
    return [llava_onevision.Packing(f, spec.grid) for f in batching.FRAME_LADDER if f <= top]
  return [llava_next.Packing(b.num_crops, b.capacity, spec.grid)
          for b in anyres.crop_buckets(spec)]


def setting_input(cfg: LlavaConfig, setting: Setting, text_tokens: int = budgets.TEXT_TOKENS,
                  packings: Sequence[Any] = (None,)) -> Plan | Recipe:
  """What batches of the setting are prepared with: its plan (llava), or for the anyres
  models, which plan each batch for its own bucket (`Pipeline.batch_plan`), its recipe,
  checked to plan at every bucket of `packings` (ConfigError as `setting_plan`)."""
  plans = [setting_plan(cfg, setting, text_tokens, p) for p in packings]
  return plans[0] if cfg.arch == "llava" else plans[0].recipe


def check_settings(cfg: LlavaConfig, settings: Sequence[Setting],
                   examples: Sequence[Example] | None = None):
  """ConfigError naming every setting a model of `cfg` cannot run (on `examples`' input
  buckets, for the anyres models), each with the reason (the evaluation itself would
  list them as skipped after running the rest)."""
  failed, packings = [], input_packings(cfg, examples)
  for s in settings:
    try:
      setting_input(cfg, s, packings=packings)
    except ValueError as e:
      reason = str(e).removeprefix(f"setting {s.label}: ").rstrip(".")
      failed.append(f"{s.label} ({reason})")
  if failed:
    raise ConfigError(f"this model cannot run {'; '.join(failed)}.")


def default_settings(cfg: LlavaConfig) -> list[Setting]:
  """Dense; every swept method at each of RETENTIONS (FastV with k = 1 where k = 2 cannot
  reach it); the published presets; and p-MoD at its trained ratios when the model has
  routers."""
  out = [Setting("none")]
  for m in SWEPT_METHODS:
    for r in RETENTIONS:
      # FastV's published k = 2 (of 32 layers) keeps every token in two layers; where
      # that is more than r of a shallow model, it drops tokens after one layer.
      small_k = m == "fastv" and r * cfg.text.num_layers < fastv.FASTV_K
      out.append(Setting(m, r, (("k", 1),) if small_k else ()))
  out += [Setting(p) for p in methods.PRESETS]
  if cfg.text.router_layers:
    out.append(Setting("pmod"))
  return out


def budget_settings(levels: Sequence[float], measure: str = "flops",
                    names: Sequence[str] = SWEPT_METHODS) -> list[Setting]:
  """Each method of `names` at each budget of `levels`: the methods at equal cost."""
  return [Setting(m, budget=b, measure=measure) for b in levels for m in names]


def with_baselines(settings: Sequence[Setting]) -> list[Setting]:
  """`settings` without repeats, plus the references every table has: dense first,
  random at each retention asked for (0.25 if none) unless some random setting is
  there, and 2x2 pooling unless some pooling setting is there."""
  out = list(dict.fromkeys([Setting("none"), *settings]))
  methods_in = {s.base_method for s in out}
  if "random" not in methods_in:
    levels = dict.fromkeys(s.retention for s in out if s.retention is not None)
    out += [Setting("random", r) for r in (levels or (0.25,))]
  if "pooling" not in methods_in:
    out.append(Setting("pooling-2x2"))
  return out


@dataclasses.dataclass(frozen=True)
class Example:
  """One question: image u8[H, W, 3] (of any size for the anyres models) or, instead,
  video u8[F, H, W, 3] (image None), the prompt as stored ("<image>\\nQ"), its answer."""
  id: str
  question_type: str
  image: np.ndarray | None
  prompt: str
  answer: str
  video: np.ndarray | None = None


def _index(example_id: str) -> int:
  """The example's index in its split ("test-17" -> 17; -1 if the id has none)."""
  found = re.search(r"(\d+)$", example_id)
  return int(found.group(1)) if found else -1


def load_examples(dataset: str, data_dir: str | None, split: str = "test",
                  limit: int | None = None) -> list[Example]:
  """The split's single-question examples in index order (TFDS stores them shuffled),
  the first `limit` of them if given. `data_dir` None generates the examples of the
  project's own data sets (the same ones a built copy holds). A data set of videos
  (video_vqa) gives examples with `video` set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be a positive number of examples, got {limit}.")
  if data_dir is None:
    if not generated.is_generated(dataset):
      raise ValueError(f"{dataset} needs --data_dir (only {', '.join(generated.NAMES)} can "
                       "be generated).")
    source = generated.source(dataset, split, None)
    _check_limit(dataset, split, limit, len(source))
    records = [source[i] for i in range(limit or len(source))]
  # TFDS would try to build a missing data set (and fail without TensorFlow): say how.
  elif not os.path.isdir(os.path.join(data_dir, *dataset.split(":")[0].split("/"))):
    name = generated.name_of(dataset) if generated.is_generated(dataset) else "glyph_vqa"
    raise ValueError(f"{dataset} is not built in {data_dir}; build it with `python -m "
                     f"tokred_jax.data.{name} --data_dir={data_dir}` (add "
                     "--config=small for the small one), or leave out data_dir.")
  else:
    try:
      source = tfds.data_source(dataset, split=split, data_dir=data_dir)
    except (ValueError, KeyError) as e:  # tfds: an unknown split or config
      raise ValueError(f"{dataset} in {data_dir} has no split {split!r}: "
                       f"{str(e).rstrip('.')}.") from None
    _check_limit(dataset, split, limit, len(source))
    records = source.__getitems__(list(range(len(source))))
  records.sort(key=lambda r: _index(r["id"].decode()))
  records = records[:limit]
  out = []
  for r in records:
    turns = r["conversations"]
    if len(turns["value"]) != 2:
      raise ValueError(f"example {r['id'].decode()} has {len(turns['value'])} turns; the "
                       "evaluation takes one question and one answer per example.")
    prompt, answer = (v.decode() for v in turns["value"])
    image, frames = r.get("image"), r.get("frames")
    out.append(Example(r["id"].decode(), r["question_types"][0].decode(),
                       None if image is None else np.asarray(image), prompt, answer,
                       None if frames is None else np.asarray(frames)))
  return out


def _check_limit(dataset: str, split: str, limit: int | None, size: int):
  if limit is not None and limit > size:
    raise ValueError(f"limit {limit} is more than the {size} examples of {dataset}'s "
                     f"{split} split; ask for at most {size}, or leave it out for all.")


def normalize(answer: str) -> str:
  """Stripped, lower-cased, without one trailing full stop: " Red." -> "red"."""
  answer = answer.strip().lower()
  return answer[:-1].rstrip() if answer.endswith(".") else answer


def is_correct(prediction: str, reference: str) -> bool:
  """Exact match after `normalize`."""
  return normalize(prediction) == normalize(reference)


@dataclasses.dataclass
class SettingResult:
  """One setting's scores and costs (per example; None where skipped)."""
  label: str
  method: str
  retention: float | None
  preset: str | None
  options: dict[str, int | float] = dataclasses.field(default_factory=dict)
  budget: float | None = None  # a budget setting's target, in `measure`
  measure: str | None = None
  skipped: str | None = None  # why, if the model cannot run the setting
  accuracy: float | None = None
  correct_by_type: dict[str, int] = dataclasses.field(default_factory=dict)
  total_by_type: dict[str, int] = dataclasses.field(default_factory=dict)
  flops: float | None = None
  flops_compiled: float | None = None
  kv_bytes: float | None = None
  equivalent_visual_tokens: float | None = None
  equivalent_visual_tokens_official: float | None = None  # MustDrop only
  latency_s: float | None = None
  predictions: list[str] = dataclasses.field(default_factory=list)

  @property
  def accuracy_by_type(self) -> dict[str, float]:
    return {k: self.correct_by_type[k] / n for k, n in self.total_by_type.items()}


@dataclasses.dataclass
class Evaluation:
  """Everything one run measured: the model, the examples, a result per setting."""
  model: dict[str, Any]
  batch_size: int
  max_new_tokens: int
  ids: list[str]
  question_types: list[str]
  answers: list[str]
  results: list[SettingResult]

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable, each result with its per-type accuracies."""
    out = dataclasses.asdict(self)
    for r, d in zip(self.results, out["results"]):
      d["accuracy_by_type"] = r.accuracy_by_type
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Evaluation:
    """The inverse of `to_dict` (extra keys, such as a saved run's command, ignored)."""
    fields = {f.name for f in dataclasses.fields(SettingResult)}
    results = [SettingResult(**{k: v for k, v in r.items() if k in fields})
               for r in d["results"]]
    return cls(d["model"], d["batch_size"], d["max_new_tokens"], d["ids"],
               d["question_types"], d["answers"], results)

  def add(self, other: Evaluation):
    """Puts `other`'s results (a run over the same examples) after these, each replacing
    one with the same label. ValueError if the examples or decoding differ."""
    if (other.ids, other.answers) != (self.ids, self.answers):
      raise ValueError("the runs are over different examples; evaluate the same data set, "
                       "split and limit.")
    if other.max_new_tokens != self.max_new_tokens:
      raise ValueError(f"the runs decode up to {self.max_new_tokens} and "
                       f"{other.max_new_tokens} tokens; use the same --max_new_tokens.")
    labels = {r.label for r in other.results}
    self.results = [r for r in self.results if r.label not in labels] + other.results


def model_summary(pipe: Pipeline) -> dict[str, Any]:
  """The model's shape and parameter counts (per top-level module and in all)."""
  cfg, v, t = pipe.cfg, pipe.cfg.vision, pipe.cfg.text
  params = {name: int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))
            for name, tree in pipe.params.items()}
  return dict(
      vision_kind=v.kind, vision_width=v.hidden_size, vision_layers=v.num_layers,
      vision_layers_run=cfg.vision_layers_used, image_size=v.image_size,
      patch_size=v.patch_size, visual_tokens=cfg.num_image_tokens, text_kind=t.kind,
      text_width=t.hidden_size, text_layers=t.num_layers, heads=t.num_heads,
      kv_heads=t.num_kv_heads, mlp=t.intermediate_size, vocab=t.vocab_size,
      router_layers=list(t.router_layers), dtype=jnp.dtype(pipe.dtype).name,
      params={**params, "total": sum(params.values())})


def _costs(pipe: Pipeline, plan: Plan, batch: dict[str, np.ndarray], rows: int
           ) -> list[tuple[float, float, float, float]]:
  """(FLOPs, KV bytes, equivalent visual tokens, the official MustDrop count of them)
  of the first `rows` samples at the method's exact counts and each sample's real
  prompt length (the last entry equals the third for other methods)."""
  text = np.sum(batch["attention_mask"][:rows], axis=1) - plan.num_visual
  item = jnp.dtype(pipe.dtype).itemsize
  if plan.data_dependent:  # MustDrop: the counts each sample really got
    _, aux = pipe.forward(batch, plan, return_aux=True)
    per_layer = np.asarray(aux["visual_per_layer"])
    merged = np.asarray(aux.get("vision_tokens", np.full(rows, pipe.cfg.num_image_tokens)))
    costs = [cost.request_cost(pipe.cfg, plan, int(n), int(merged[i]), per_layer[:, i],
                               bytes_per_element=item) for i, n in enumerate(text)]
  else:
    costs = [cost.plan_cost(pipe.cfg, plan, int(n), bytes_per_element=item, exact=True)
             for n in text]
  return [(c["flops"].total, c["kv_bytes"].total, c["equivalent_tokens"],
           c.get("equivalent_tokens_official", c["equivalent_tokens"])) for c in costs]


def _prepare(pipe: Pipeline, chunk: Sequence[Example], max_new_tokens: int,
             setting: Plan | Recipe) -> tuple[dict[str, Any], Plan]:
  """A batch of examples (images, or videos) and its plan (the anyres models': for the
  batch's bucket)."""
  prompts = [e.prompt for e in chunk]
  if chunk[0].video is not None:
    batch = pipe.prepare(None, prompts, max_new_tokens, plan=setting,
                         videos=[e.video for e in chunk])
  else:
    batch = pipe.prepare([e.image for e in chunk], prompts, max_new_tokens, plan=setting)
  return batch, pipe.batch_plan(batch, setting) if pipe.anyres else setting


def _run_setting(pipe: Pipeline, setting: Plan | Recipe, examples: Sequence[Example],
                 batch_size: int, sampling: SamplingConfig, result: SettingResult,
                 progress: Callable[[str, int], None]):
  """Fills `result` (its per-type counts at zero) with the setting's predictions, scores,
  costs and latency; `setting` from `setting_input`. In a job of several processes each
  runs its share of the batches (`my_batches`) and every process gets all of the
  results."""
  warmed, done, data_dependent = set(), [], False
  for start in my_batches(len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    rows = len(chunk)
    chunk += [chunk[-1]] * (batch_size - rows)
    batch, plan = _prepare(pipe, chunk, sampling.max_new_tokens, setting)
    data_dependent = plan.data_dependent
    shapes = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(batch))
    if shapes not in warmed:  # compile outside the timed call (a new length or bucket)
      pipe.generate_tokens(batch, sampling, plan=plan)
      warmed.add(shapes)
    tokens, timings = pipe.generate_tokens(batch, sampling, plan=plan)
    done.append(dict(
        start=start, time=(timings.prefill_s + timings.decode_s) / batch_size,
        predictions=[pipe.tokenizer.decode(row) for row in tokens[:rows]],
        costs=[[float(v) for v in c] for c in _costs(pipe, plan, batch, rows)],
        compiled=rows * float(pipe.cost(batch, plan)["flops"].total) / batch_size))
    progress(result.label, 1)
  batches = sorted((b for share in distributed.gather(done) for b in share),
                   key=lambda b: b["start"])
  result.predictions = [p for b in batches for p in b["predictions"]]
  for e, prediction in zip(examples, result.predictions):
    result.total_by_type[e.question_type] += 1
    result.correct_by_type[e.question_type] += is_correct(prediction, e.answer)
  result.accuracy = sum(result.correct_by_type.values()) / len(examples)
  costs = np.asarray([c for b in batches for c in b["costs"]], np.float64)
  flops, kv, equivalent, official = np.mean(costs, axis=0)
  result.flops, result.kv_bytes = float(flops), float(kv)
  result.equivalent_visual_tokens = float(equivalent)
  if data_dependent:
    result.equivalent_visual_tokens_official = float(official)
  result.flops_compiled = sum(b["compiled"] for b in batches) / len(examples)
  result.latency_s = statistics.median(b["time"] for b in batches)


def _zero_by_type(examples: Sequence[Example]) -> dict[str, int]:
  """0 for each question type present: glyph_vqa's in its order, any others by name."""
  present = {e.question_type for e in examples}
  kinds = [k for k in glyphs.QUESTION_TYPES if k in present]
  return dict.fromkeys(kinds + sorted(present - set(kinds)), 0)


def evaluate(pipe: Pipeline, examples: Sequence[Example], settings: Sequence[Setting],
             batch_size: int = 32, max_new_tokens: int = 5,
             progress: Callable[[str, int], None] | None = None) -> Evaluation:
  """Runs every setting over `examples` (see the module docstring).

  Args:
    pipe: the loaded model.
    examples: from `load_examples`; every setting sees them in this order.
    settings: run in this order (see `with_baselines` for the reference rows).
    batch_size: prompts per generate call (at most len(examples)).
    max_new_tokens: greedy decoding stops there or at end-of-sequence.
    progress: called as progress(label, n) when n more batches are done (a skipped
      setting counts as all of its batches), e.g. to advance a progress bar.

  Returns:
    The Evaluation; settings the model cannot run have `skipped` set.
  """
  if not examples:
    raise ValueError("no examples to evaluate.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  batch_size = min(batch_size, len(examples))
  sampling = SamplingConfig(max_new_tokens=max_new_tokens)  # temperature 0: greedy
  # Every plan first, so that a setting the model rejects costs no model work.
  runs = []
  text = (median_text_tokens(pipe, examples) if any(s.budget is not None for s in settings)
          else budgets.TEXT_TOKENS)
  packings = input_packings(pipe.cfg, examples)
  for s in settings:
    preset = s.method if s.method in methods.PRESETS else None
    result = SettingResult(s.label, s.base_method, s.retention, preset, dict(s.options),
                           s.budget, s.measure if s.budget is not None else None)
    try:
      plan = setting_input(pipe.cfg, s, text, packings)
    except ValueError as e:  # ConfigError included: the method cannot do it here
      result.skipped, plan = str(e), None
    runs.append((plan, result))
  types = _zero_by_type(examples)
  progress = progress or (lambda label, n: None)
  for plan, result in runs:
    if plan is None:
      progress(result.label, batches_per_setting(len(examples), batch_size))
      continue
    result.correct_by_type, result.total_by_type = dict(types), dict(types)
    _run_setting(pipe, plan, examples, batch_size, sampling, result, progress)
  return Evaluation(model_summary(pipe), batch_size, max_new_tokens,
                    [e.id for e in examples], [e.question_type for e in examples],
                    [e.answer for e in examples], [r for _, r in runs])


def median_text_tokens(pipe: Pipeline, examples: Sequence[Example]) -> int:
  """The median number of text tokens of the examples' prompts in the model's chat
  template (the prompt length budgets are solved at)."""
  template = templates.get(pipe.cfg.template or "tokred")
  counts = [len(template.encode(pipe.tokenizer, processing.build_prompt(e.prompt, template))[0])
            - 1 for e in examples]  # the one <image> placeholder is not text
  return int(statistics.median(counts))


def my_batches(num_examples: int, batch_size: int) -> range:
  """The first example of each batch this process runs: all of them in a job of one
  process; in a job of n, process i runs batches i, i + n, ... of the one-process
  batches, so every example is batched (and padded) as it would be in one process."""
  starts = range(0, num_examples, min(batch_size, num_examples))
  return starts[jax.process_index()::jax.process_count()]


def batches_per_setting(num_examples: int, batch_size: int) -> int:
  """Generate calls per setting that runs, on this process (the progress bar's unit)."""
  return len(my_batches(num_examples, batch_size))
