r"""Tokred_jax against Hugging Face transformers on the same weights, on the CPU: prefill
time and decode time per token, dense and with every reduction method.

  python -m benchmarks.hf_speed          # batch 1 (every case) and 8, 3 timed rounds
  python -m benchmarks.hf_speed --batch=1 --rounds=1 --markdown=x.md --json=x.json --plot=x.png

A mid-size LLaVA-1.5 (`mid_config`) gets random weights from `models.llava.init_params`,
exported once as a Hugging Face checkpoint (`io.checkpoint.save_checkpoint`, into a
temporary directory) that both sides load: ours with `io.checkpoint.load_checkpoint`,
transformers with `LlavaForConditionalGeneration.from_pretrained(dir,
attn_implementation="sdpa", dtype=float32)`, torch on every core in inference mode. The
two must give the same last-position prefill logits (max |ours − HF| / max |HF| < 1e-3),
or the run stops before any timing. Prompts: `--text-tokens` random token ids (5 before
the image, as "USER: <image>\n...") around the image slots; images as prefill_speed's.

Cases: transformers dense at the exact length; ours dense at the exact length and padded
to its default length bucket (`io.processing.default_buckets`); ours with each method at
each retention, unpadded (fast mode; AIM also in reference mode, which masks as the
official code does; p-MoD with zero routers added to the dense weights, so timing only;
MustDrop at its three presets, as a segmented prefill: one program at the capacities
learned from the warm-up prompt, "(ladder)" one program choosing its capacities from a
ladder on the device, "(host)" a host read and a launch per cut). A case is a prefill (to the last
logits and the cache), then `--new-tokens` greedy tokens with no end-of-sequence stop:
ours an `engine.generate.Generator` of its own, transformers a loop of forward calls on
its cache. Decode ms/token: the loop's time over its new_tokens − 1 model steps (the
first token comes from the prefill's logits). Batches outside `--full-batches` run the
methods at the middle retention only (MustDrop: its middle preset), without twins. Each
case runs once to compile and warm up (compile s: the wall time of that call spent in
jax's tracing, lowering and XLA compiling, from `jax.monitoring`'s compile events), then
`--rounds` rounds visit every case in turn, so that load from other processes falls on
all alike; times are medians. Ratios: reference time / case time
(above 1: faster); FLOPs ratio: dense matmul FLOPs / the case's (`engine.cost`, compiled
capacities). KV MiB: the cache each side holds (ours allocated after prefill with room
for the new tokens; transformers' after decoding).

Reduction share: (t_method − t_twin) / t_method for prefill, where the twin
(benchmarks/twins.py) has the method's token capacities in every tower and LLM layer and
a trivial selection (the first tokens kept, or a random subset), in one program, in the
method's mode. So the share is the time spent choosing tokens, MustDrop's switches and
padding (or its host reads) between segments included. –: no twin (random is the
trivial selection itself; p-MoD's router is one Linear(D, 1)), or none has the capacities.

The `hf_speed` block of --markdown is replaced; --json and --plot are written. These
defaults are shipped results: a run at other settings (any flag but --rounds) must name
all three, or is refused. Every flag, plan and path is checked before any model is
built; the files are written at the end, each by a rename.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import matplotlib
import numpy as np
from tqdm import tqdm

matplotlib.use("Agg")  # Headless: the plot only goes to a file.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

from benchmarks import outputs, prefill_speed, twins
from benchmarks.runners import CompileClock, Hf, Ours
from tokred_jax import cli, methods
from tokred_jax.engine import cost
from tokred_jax.engine.generate import Generator, SamplingConfig
from tokred_jax.io import checkpoint, processing
from tokred_jax.methods import pmod
from tokred_jax.methods.base import SIZINGS, Recipe, make_plan
from tokred_jax.models import llava
from tokred_jax.models.config import ConfigError, LlavaConfig, TextConfig, VisionConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = "hf_speed"
METHODS = ("aim", "fastv", "tome", "random", "pooling", "dart", "pmod", "mustdrop")
MUSTDROP_PRESETS = ("mustdrop-192", "mustdrop-128", "mustdrop-64")
PARITY_TOL = 1e-3
# The settings of the shipped results; --rounds is free.
PUBLISHED = dict(config="mid", batch="1,8", full_batches="1", retention="0.5,0.25,0.125",
                 methods=",".join(METHODS), text_tokens=45, new_tokens=16)
OUTPUTS = dict(markdown="BENCHMARKS.md", json="benchmarks/hf_speed.json",
               plot="benchmarks/hf_speed.png")


def mid_config() -> LlavaConfig:
  """CLIP ViT-B/14 at 336 px (576 patches, 11 of 12 layers run, quick_gelu) and a
  12-layer Llama 1024 wide (16 heads over 8 KV heads, MLP 2816, vocabulary 32000)."""
  return LlavaConfig(
      vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_layers=12,
                          num_heads=12, image_size=336, patch_size=14),
      text=TextConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                      num_layers=12, num_heads=16, num_kv_heads=8, head_dim=64,
                      max_position_embeddings=2048),
      image_token_id=31999, pad_token_id=0, vision_feature_layer=-2)


def tiny_config() -> LlavaConfig:
  """For tests: 84 px (36 patches, 1 of 2 tower layers run), a 3-layer LLM 64 wide."""
  return LlavaConfig(
      vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          image_size=84, patch_size=14),
      text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512),
      image_token_id=255, pad_token_id=0, vision_feature_layer=-2)


CONFIGS = {"mid": mid_config, "tiny": tiny_config}


def make_params(cfg: LlavaConfig):  # the test swaps in weights that need no compile
  return jax.device_get(jax.jit(lambda key: llava.init_params(cfg, key))(jax.random.PRNGKey(0)))


def with_routers(cfg: LlavaConfig) -> LlavaConfig:
  """cfg with p-MoD routers where PRD's cosine routes (plans need no weights)."""
  layers = pmod.router_layers(pmod.prd_cosine(cfg.text.num_layers))
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, router_layers=layers))


# --- The cases ------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
  """One row: what runs, its FLOPs and equivalent visual tokens, its times (seconds)."""
  label: str
  group: str  # the plot's group of bars
  retention: float | None
  runner: Any
  flops: float
  equivalent: float
  decodes: bool = True  # twins only prefill
  twin: Any = None  # the Case with the same shapes and a trivial selection
  kv_bytes: int = 0
  first_s: float = 0.0
  compile_s: float | None = None
  prefill_s: list = dataclasses.field(default_factory=list)
  decode_s: list = dataclasses.field(default_factory=list)

  def visit(self) -> tuple[Any, Any]:
    """One prefill and decode, timed: (prefill output, new tokens)."""
    start = time.perf_counter()
    out = self.runner.prefill()
    self.prefill_s.append(time.perf_counter() - start)
    if not self.decodes:
      return out, None
    start, new = time.perf_counter(), self.runner.decode(out)
    self.decode_s.append(time.perf_counter() - start)
    return out, new

  def warm(self, clock: CompileClock) -> tuple[Any, Any]:
    """The first visit (ours compile in it): its compile time and KV bytes kept, not its
    times."""
    clock.take()
    out, new = self.visit()
    self.first_s = self.prefill_s.pop() + (self.decode_s.pop() if self.decodes else 0.0)
    self.compile_s = None if self.runner.programs is None else clock.take()
    self.kv_bytes = self.runner.kv_bytes(out) if self.decodes else 0
    return out, new

  def median(self, which: str) -> float:
    return statistics.median(getattr(self, f"{which}_s"))


def plan_cases(cfg: LlavaConfig, args) -> tuple[list[tuple], list[str]]:
  """Every (label, group, method, mode, retention, plan) to measure, and a line for each
  method and retention that cannot run, with ConfigError's reason."""
  out, skipped, routed = [], [], with_routers(cfg)
  for name in args.methods:
    if name == "mustdrop":
      out += [(p + ("" if sizing == SIZINGS[0] else f" ({sizing})"), name, p, "fast", None,
               make_plan(methods.get(p, cfg, sizing=sizing), cfg))
              for p in MUSTDROP_PRESETS for sizing in SIZINGS]
      continue
    for mode in ("fast", "reference") if name == "aim" else ("fast",):
      label = name if mode == "fast" else f"{name} (reference)"
      for rho in args.retention:
        model_cfg = routed if name == "pmod" else cfg
        try:
          plan = make_plan(methods.get(name, model_cfg, rho, mode), model_cfg)
        except ConfigError as e:
          skipped.append(f"{label} at {rho:g}: {cli.one_line(e).rstrip('.')}")
          continue
        out.append((f"{label} {rho:g}", label, name, mode, rho, plan))
  return out, skipped


def build_cases(ctx: dict, args, batch: int, planned) -> list[Case]:
  """transformers dense, ours dense exact and bucketed, then each method and its twin;
  outside --full-batches, the methods at the middle retention only and no twins."""
  full = batch in args.full_batches
  if not full:
    middle = (args.retention[len(args.retention) // 2], MUSTDROP_PRESETS[1])
    planned = [p for p in planned if p[4] in middle or p[2] in middle]
  cfg, params, text, n_v = ctx["cfg"], ctx["params"], args.text_tokens, ctx["cfg"].num_image_tokens
  sampling = SamplingConfig(max_new_tokens=args.new_tokens)
  runner = lambda c, plan, p, inputs: Ours(
      Generator(llava.Llava(c), sampling, cfg.pad_token_id or 0, (), plan), p, inputs)
  flops = lambda c, plan, t=text: float(cost.plan_cost(c, plan, t, batch)["flops"].total)
  dense = make_plan(Recipe(), cfg)
  inputs = prefill_speed.make_inputs(cfg, dense, text, batch)
  length = text + n_v
  bucket = min(b for b in processing.default_buckets(cfg.text.max_position_embeddings)
               if b >= length)
  ids, pixels, mask, _ = (np.asarray(a) for a in inputs)  # left-padded, as encode_batch does
  pad = ((0, 0), (bucket - length, 0))
  mask = np.pad(mask, pad)
  padded = (np.pad(ids, pad, constant_values=cfg.pad_token_id or 0), pixels, mask,
            np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32))
  cases = [Case("transformers dense", "dense", None,
                Hf(ctx["torch"], ctx["hf"], inputs, args.new_tokens), flops(cfg, dense), n_v),
           Case("ours dense, exact length", "dense", None, runner(cfg, dense, params, inputs),
                flops(cfg, dense), n_v),
           Case(f"ours dense, bucket {bucket}", "dense", None,
                runner(cfg, dense, params, padded), flops(cfg, dense, bucket - n_v), n_v)]
  for label, group, name, mode, rho, plan in planned:
    c, p = (ctx["routed_cfg"], ctx["routed_params"]) if name == "pmod" else (cfg, params)
    case_inputs = prefill_speed.make_inputs(c, plan, text, batch)
    case = Case(label, group, rho, runner(c, plan, p, case_inputs), flops(c, plan),
                cost.plan_cost(c, plan, text)["equivalent_tokens"])
    cases.append(case)
    twin = None if name == "mustdrop" or not full else twins.twin_plan(plan, c)
    if twin is not None:  # MustDrop's needs its counts: see `mustdrop_counts`
      case.twin = Case(f"twin of {label}", group, rho, runner(c, twin, p, case_inputs),
                       flops(c, twin), case.equivalent, decodes=False)
  return cases


def mustdrop_counts(case: Case, cfg: LlavaConfig, text: int, batch: int, with_twin: bool):
  """MustDrop's FLOPs and equivalent tokens from the counts of one more prefill (the
  capacities its segments ran at; each sample's equivalent tokens), and its twin."""
  runner = case.runner
  seg = runner.gen._segmented  # pylint: disable=protected-access
  out = seg(runner.params, runner.batch, None, runner.gen.sampling.max_new_tokens)
  caps = [c for c, (lo, hi) in zip(out["capacities"], seg.bounds) for _ in range(lo, hi)]
  case.flops = float(cost.request_cost(cfg, seg.plan, text, caps[0], caps)["flops"].total
                     * batch)
  case.equivalent = float(np.mean(out["aux"]["equivalent_tokens"]))
  twin = twins.twin_plan(seg.plan, cfg, caps) if with_twin else None
  if twin is not None:
    gen = Generator(llava.Llava(cfg), runner.gen.sampling, cfg.pad_token_id or 0, (), twin)
    case.twin = Case(f"twin of {case.label}", case.group, None,
                     Ours(gen, runner.params, prefill_speed.make_inputs(cfg, twin, text, batch)),
                     float(cost.plan_cost(cfg, twin, text, batch)["flops"].total),
                     case.equivalent, decodes=False)


def measure(ctx: dict, args, batch: int, planned) -> dict:
  """Compiles and warms every case at `batch` (the dense ones first, to check parity),
  then times them in interleaved rounds. -> {"rows", "parity"}."""
  cases = build_cases(ctx, args, batch, planned)
  clock = ctx["clock"]
  (hf_out, hf_new), *dense = [c.warm(clock) for c in cases[:3]]
  ref, parity = cases[0].runner.logits(hf_out), {}
  for case, (out, new) in zip(cases[1:3], dense):
    err = float(np.max(np.abs(case.runner.logits(out) - ref)) / np.max(np.abs(ref)))
    parity[case.label] = dict(relative_error=err, tokens_equal=float(np.mean(new == hf_new)))
    if not err < PARITY_TOL:
      raise SystemExit(f"hf_speed: {case.label} and transformers disagree at batch {batch}: "
                       f"max |logit difference| / max |logit| = {err:.2e} >= {PARITY_TOL:g}; "
                       "the comparison would not be fair, so nothing was timed or written.")
  for case in tqdm(cases[3:], desc=f"compiling, batch {batch}", unit="case"):
    case.warm(clock)
    if case.group == "mustdrop":
      mustdrop_counts(case, ctx["cfg"], args.text_tokens, batch, batch in args.full_batches)
    if case.twin is not None:
      case.twin.warm(clock)
  runs = cases + [c.twin for c in cases if c.twin is not None]
  with tqdm(total=args.rounds * len(runs), desc=f"timing, batch {batch}", unit="run") as bar:
    for _ in range(args.rounds):
      for case in runs:
        case.visit()
        bar.update()
  return dict(rows=rows(cases, args.new_tokens), parity=parity)


def rows(cases: list[Case], new_tokens: int) -> list[dict]:
  """Per case the figures of the table and the JSON; ratios are reference / case."""
  (hf, ours), steps, out = cases[:2], new_tokens - 1, []
  for c in cases:
    p, d, twin = c.median("prefill"), c.median("decode"), c.twin
    out.append(dict(
        case=c.label, group=c.group, retention=c.retention,
        equivalent_visual_tokens=round(c.equivalent, 1),
        prefill_ms=1e3 * p, prefill_min_ms=1e3 * min(c.prefill_s),
        prefill_vs_hf=hf.median("prefill") / p, prefill_vs_ours=ours.median("prefill") / p,
        decode_ms_per_token=1e3 * d / steps, decode_vs_hf=hf.median("decode") / d,
        decode_vs_ours=ours.median("decode") / d, flops=c.flops, flops_ratio=ours.flops / c.flops,
        kv_mib=c.kv_bytes / 2 ** 20, programs=c.runner.programs,
        compile_s=c.compile_s, first_call_s=c.first_s,
        reduction_share=None if twin is None else (p - twin.median("prefill")) / p,
        twin_prefill_ms=None if twin is None else 1e3 * twin.median("prefill"),
        twin_flops_vs_method=None if twin is None else twin.flops / c.flops,
        twin_programs=None if twin is None else twin.runner.programs,
        prefill_times_s=c.prefill_s, decode_times_s=c.decode_s))
  return out


def table(batch_rows: list[dict]) -> str:
  """The Markdown table of one batch."""
  f = lambda x, fmt: "–" if x is None else format(x, fmt)
  lines = ["| case | equiv. visual tokens | prefill ms | **vs HF** | vs ours dense | decode "
           "ms/token | **vs HF** | vs ours dense | FLOPs ratio | KV MiB | programs | "
           "compile s | reduction share |", "|---|" + "---:|" * 12]
  for r in batch_rows:
    lines.append(
        f"| {r['case']} | {r['equivalent_visual_tokens']:g} | {r['prefill_ms']:.0f} | "
        f"**{r['prefill_vs_hf']:.2f}×** | {r['prefill_vs_ours']:.2f}× | "
        f"{r['decode_ms_per_token']:.1f} | **{r['decode_vs_hf']:.2f}×** | "
        f"{r['decode_vs_ours']:.2f}× | {r['flops_ratio']:.2f}× | {r['kv_mib']:.1f} | "
        f"{f(r['programs'], 'd')} | {f(r['compile_s'], '.1f')} | "
        f"{f(r['reduction_share'], '.0%')} |")
  return "\n".join(lines)


def plot(results: dict, path: str, title: str):
  """Prefill and decode against transformers, a row of panels per batch; bars grouped by
  method, coloured by retention (MustDrop: by preset)."""
  colours = {}
  fig, axes = plt.subplots(len(results), 2, figsize=(15, 4.2 * len(results)), squeeze=False)
  for (batch, res), row in zip(results.items(), axes):
    groups = list(dict.fromkeys(r["group"] for r in res["rows"]))
    for ax, key, what in ((row[0], "prefill_vs_hf", "prefill"),
                          (row[1], "decode_vs_hf", "decode per token")):
      for g, group in enumerate(groups):
        members = [r for r in res["rows"] if r["group"] == group]
        width = 0.8 / len(members)
        for i, r in enumerate(members):
          kind = (r["case"].replace("ours ", "") if group == "dense" else
                  r["case"] if group == "mustdrop" else f"ρ {r['retention']:g}")
          bar = ax.bar(g - 0.4 + width * (i + 0.5), r[key], width * 0.95, label=kind,
                       color=colours.setdefault(kind, f"C{len(colours) % 10}"))
          ax.bar_label(bar, fmt="%.2f", fontsize=6)
      ax.axhline(1.0, color="grey", lw=0.8, ls="--")
      ax.set_xticks(range(len(groups)), groups, fontsize=8)
      ax.set_ylabel(f"{what}: × vs transformers")
      ax.set_title(f"{what}, batch {batch}", fontsize=9)
  legend = dict(zip(*reversed(axes[0, 0].get_legend_handles_labels())))
  fig.legend(legend.values(), legend.keys(), fontsize=7, ncol=len(legend), loc="lower center")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.04, 1, 0.97))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def render(args, cfg: LlavaConfig, results: dict, skipped: list[str], info: dict) -> str:
  """The Markdown block: how it was run, what the columns mean, a table per batch."""
  v, t = cfg.vision, cfg.text
  parity = "; ".join(f"batch {b}, {label}: {p['relative_error']:.1e} (greedy tokens equal: "
                     f"{p['tokens_equal']:.0%})" for b, res in results.items()
                     for label, p in res["parity"].items())
  ratios = [r["twin_flops_vs_method"] for res in results.values() for r in res["rows"]
            if r["twin_flops_vs_method"] is not None]
  fewer = "" if args.rounds == 3 else " (the default is 3)"
  doc = lambda i: " ".join(__doc__.split("\n\n")[i].split())
  lines = [
      f"Command: `{info['command']}`", "",
      f"Machine: {info['machine']}. Run {info['date']}, {info['minutes']:.1f} min in all; "
      f"load average {info['load'][0]:.2f} before, {info['load'][1]:.2f} after.", "",
      f"Model ({args.config}; random weights, float32, one checkpoint both sides load): CLIP "
      f"tower {v.hidden_size} wide, {cfg.vision_layers_used} of {v.num_layers} layers run, "
      f"{v.image_size} px / {v.patch_size} px = {cfg.num_image_tokens} visual tokens; Llama "
      f"{t.hidden_size} wide, {t.num_layers} layers, {t.num_heads} heads ({t.num_kv_heads} "
      f"KV), MLP {t.intermediate_size}, vocabulary {t.vocab_size}; "
      f"{info['parameters'] / 1e6:.1f}M parameters. Prompts of "
      f"{args.text_tokens} text tokens + the image = {args.text_tokens + cfg.num_image_tokens} "
      f"tokens dense, {args.new_tokens} new tokens. Times: medians of {args.rounds} "
      f"interleaved rounds{fewer}.", "",
      f"Parity, ours dense against transformers (max |logit difference| / max |logit| at "
      f"the prefill's last position; the run stops at {PARITY_TOL:g}): {parity}.", "",
      doc(3), "", doc(4) + (f" Twin FLOPs / method FLOPs: {min(ratios):.3f}–"
                            f"{max(ratios):.3f}." if ratios else "")]
  middle = f"ρ {args.retention[len(args.retention) // 2]:g} and {MUSTDROP_PRESETS[1]}"
  for b, res in results.items():
    what = "" if b in args.full_batches else (
        f" the methods at {middle} only, no twins (not in --full-batches)")
    lines += ["", f"Batch {b}:{what}", "", table(res["rows"])]
  if skipped:
    lines += ["", "Not run, the method cannot reach that retention here: "
              + "; ".join(skipped) + "."]
  lines += ["", f"Our side compiled {info['programs']} programs in all ({info['twin_programs']}"
            " of them for the twins)."]
  if args.plot:
    link = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.markdown or
                                                                       args.plot)))
    lines += ["", f"![prefill and decode against transformers]({link})"]
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = outputs.ArgumentParser(prog="hf_speed", description=__doc__.split("\n\n")[1],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
  add = parser.add_argument
  add("--config", default=PUBLISHED["config"], choices=sorted(CONFIGS),
      help="the model: mid (the benchmark's) or tiny (tests)")
  add("--batch", default=PUBLISHED["batch"], help="comma-separated batch sizes")
  add("--full-batches", default=PUBLISHED["full_batches"], help="those of --batch that run "
      "every retention and the twins; the others, the middle retention only (a shorter run)")
  add("--retention", default=PUBLISHED["retention"],
      help="comma-separated retention levels (fraction of visual tokens kept)")
  add("--methods", default=PUBLISHED["methods"], help="comma-separated subset of "
      + ", ".join(METHODS) + " (dense always runs)")
  add("--rounds", type=int, default=3, help="timed runs per case")
  add("--text-tokens", type=int, default=PUBLISHED["text_tokens"], help="text tokens per prompt")
  add("--new-tokens", type=int, default=PUBLISHED["new_tokens"], help="greedy tokens decoded")
  for flag, what in (("markdown", "file whose hf_speed block is replaced"),
                     ("json", "JSON of every figure"), ("plot", "PNG of the ratios")):
    add(f"--{flag}", default=None, help=f"{what} ('' skips it); default {OUTPUTS[flag]} for "
        "the published settings (every flag but --rounds at its default), which any other "
        "run must name")
  return parser


def _numbers(flag: str, text: str, kind, ok, want: str) -> list:
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or not all(ok(v) for v in values):
    example = PUBLISHED[flag[2:].replace("-", "_")]
    raise ValueError(f"{flag}={text}: give comma-separated {want}, e.g. {example}.")
  return list(dict.fromkeys(values))


def _check_args(args, cfg: LlavaConfig):
  """Every check before a model is built: flags, plans, outputs (defaults filled in where
  the run may write the shipped ones). -> (planned cases, skipped ones)."""
  given = dict(vars(args))
  args.batch = _numbers("--batch", args.batch, int, lambda b: b >= 1, "positive integers")
  args.full_batches = _numbers("--full-batches", args.full_batches, int,
                               lambda b: b in args.batch, "batch sizes among --batch")
  args.retention = _numbers("--retention", args.retention, float, lambda r: 0 < r <= 1,
                            "fractions in (0, 1]")
  args.methods = list(dict.fromkeys(m for m in args.methods.split(",") if m))
  unknown = sorted(set(args.methods) - set(METHODS))
  if unknown:
    raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
  if args.rounds < 1 or args.new_tokens < 2:
    raise ValueError(f"--rounds={args.rounds} --new-tokens={args.new_tokens}: give at least 1 "
                     "round and 2 new tokens (one decode step).")
  room = cfg.text.max_position_embeddings - cfg.num_image_tokens - args.new_tokens
  if not prefill_speed.TEXT_BEFORE_IMAGE <= args.text_tokens <= room:
    raise ValueError(f"--text-tokens={args.text_tokens}: give {prefill_speed.TEXT_BEFORE_IMAGE}"
                     f" to {room} (prompt and new tokens must fit "
                     f"{cfg.text.max_position_embeddings} positions).")
  if jax.default_backend() != "cpu":
    raise ValueError(f"jax runs on {jax.default_backend()} and transformers on the CPU; "
                     "compare on one device: run with JAX_PLATFORMS=cpu.")
  planned, skipped = plan_cases(cfg, args)
  differs = [f"--{k.replace('_', '-')}={given[k]}" for k, v in PUBLISHED.items()
             if str(given[k]) != str(v)]
  left = [f for f in OUTPUTS if getattr(args, f) is None]
  if differs and left:
    raise ValueError(f"a run with {' '.join(differs)} is not the one the shipped results were "
                     f"run at and would replace them: say where its results go with "
                     f"{' '.join(f'--{f}=PATH' for f in left)} ('' skips one).")
  for flag in left:
    setattr(args, flag, os.path.join(_ROOT, OUTPUTS[flag]))
  for flag, formats in (("json", (".json",)), ("plot", outputs.PLOT_FORMATS)):
    if getattr(args, flag):
      outputs.check_output(f"--{flag}", getattr(args, flag), formats)
  if args.markdown:
    outputs.check_block("--markdown", args.markdown, BLOCK)
  return planned, skipped


def _import_hf():
  """(torch, transformers), or ValueError saying how to install them."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"needs torch and transformers ({e}): "
                     "pip install -e '.[bench]'") from None
  return torch, transformers


def main(argv: list[str] | None = None):
  args = _parser().parse_args(argv)
  cfg = CONFIGS[args.config]()
  try:
    planned, skipped = _check_args(args, cfg)
    torch, transformers = _import_hf()
  except ValueError as e:
    raise SystemExit(f"hf_speed: {cli.one_line(e)}") from None
  try:
    _run(args, cfg, planned, skipped, argv, torch, transformers)
  except KeyboardInterrupt:  # staged files are discarded: the old ones stay as they were
    raise SystemExit("hf_speed: interrupted; nothing was written.") from None


def _measure(args, cfg: LlavaConfig, planned, torch, transformers) -> tuple[dict, int]:
  """One checkpoint, both models, every batch measured: ({batch: measure(...)}, the
  number of parameters)."""
  torch.set_num_threads(os.cpu_count())
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "llava")
    checkpoint.save_checkpoint(path, cfg, make_params(cfg))
    loaded_cfg, params = checkpoint.load_checkpoint(path)
    if dataclasses.replace(loaded_cfg, template=cfg.template) != cfg:
      raise SystemExit(f"hf_speed: the exported checkpoint reads back as another model: "
                       f"{loaded_cfg}.")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation="sdpa", dtype=torch.float32).eval()
    # On the device once: a numpy tree would be copied in at every call, timed with it.
    params = jax.device_put(params)
    routed_cfg, routed = pmod.add_routers(cfg, params, with_routers(cfg).text.router_layers)
    routed = jax.device_put(routed)  # the routers; the other leaves are already there
    ctx = dict(cfg=cfg, params=params, hf=hf, torch=torch, routed_cfg=routed_cfg,
               routed_params=routed, clock=CompileClock())
    size = sum(x.size for x in jax.tree.leaves(params))
    jax.monitoring.register_event_time_span_listener(ctx["clock"])
    try:
      return {b: measure(ctx, args, b, planned) for b in args.batch}, size
    finally:
      jax.monitoring.unregister_event_time_span_listener(ctx["clock"])


def _run(args, cfg: LlavaConfig, planned, skipped, argv, torch, transformers):
  """Measures every batch, then writes the block, the JSON and the plot."""
  start, load = time.perf_counter(), os.getloadavg()[0]
  results, parameters = _measure(args, cfg, planned, torch, transformers)
  counted = [(r["programs"] or 0, r["twin_programs"] or 0)
             for res in results.values() for r in res["rows"]]
  info = dict(
      command=" ".join(["python -m benchmarks.hf_speed"]
                       + (sys.argv[1:] if argv is None else argv)),
      machine=f"{prefill_speed.machine()}; torch {torch.__version__} "
      f"({torch.get_num_threads()} threads), transformers {transformers.__version__}",
      date=datetime.date.today().isoformat(), minutes=(time.perf_counter() - start) / 60,
      load=(load, os.getloadavg()[0]), programs=sum(a + b for a, b in counted),
      twin_programs=sum(b for _, b in counted), parameters=parameters)
  body = render(args, cfg, results, skipped, info)
  data = dict(info, args=vars(args), model=dataclasses.asdict(cfg), skipped=skipped,
              results={str(b): r for b, r in results.items()})
  title = (f"ours against transformers, {cfg.num_image_tokens + args.text_tokens}-token "
           f"prompts ({args.config} model, CPU)")
  outputs.publish("hf_speed", body, json_path=args.json,
                  json_text=json.dumps(data, indent=1) + "\n", plot_path=args.plot,
                  draw=lambda p: plot(results, p, title), markdown_path=args.markdown,
                  block=BLOCK)


if __name__ == "__main__":
  main()
