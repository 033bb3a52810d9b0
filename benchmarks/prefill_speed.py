r"""Measured prefill speed of each reduction method at 25% retention (MustDrop: its "64"
preset), next to its FLOPs.

  python -m benchmarks.prefill_speed                      # batch 1, 5 timed rounds
  python -m benchmarks.prefill_speed --batch=4 --rounds=3

A mid-size LLaVA with random weights (a CLIP-style tower at 336 px: 576 visual tokens;
a Llama LLM of about 125M parameters) runs one prefill per method: the prompt is
`--text-tokens` text tokens plus the plan's visual slots. Every method's prefill is
compiled once (tracing plus XLA compile, reported apart), run once to warm up, then timed in
`--rounds` rounds that visit every method in turn, so that a burst of load from other
processes falls on all methods alike rather than on one. MustDrop, whose counts depend on
the image, runs as `segmented.SegmentedPrefill` (a program per segment, a host read of
the surviving count between them): its warm-up call compiles every segment for the
capacities these inputs meet and is reported as its compile time; its timed runs include
the host reads. Its images have flat regions (see `FLAT_WINDOWS`) so that it merges.

Next to the times: the analytic matmul FLOPs of what the compiled program computes
(bucketed capacities), of the method's exact token counts, and XLA's own count of the
compiled program as a cross-check (for MustDrop: `cost.request_cost` at the capacities
the segments ran at and at each sample's counts; XLA's count summed over its programs).
The results replace this benchmark's block in BENCHMARKS.md (text outside the block is
left alone) and are plotted to a PNG. Those defaults are shipped results: a run at other
settings than theirs (--retention, --text-tokens, a subset of --methods, another --dtype
on CPU) must name its --markdown and --plot, or is refused. Every flag, plan and output
path is checked before the model is built, and both files are written at the end, each
by a rename, so a failed or interrupted run leaves the old ones byte-identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm import tqdm

matplotlib.use("Agg")  # Headless: the plot only goes to a file.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

from benchmarks import outputs
from tokred_jax import cli, methods
from tokred_jax.engine import cost, segmented
from tokred_jax.methods import mustdrop
from tokred_jax.methods.base import Plan, make_plan
from tokred_jax.models import llava
from tokred_jax.models.config import LlavaConfig, TextConfig, VisionConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Methods in table order: (method, mode). AIM in reference mode shows that masking the
# pruned tokens, as the official implementations do, saves nothing inside the LLM.
# MustDrop takes a preset, not the retention level, and runs as segments.
CASES = (("none", "fast"), ("aim", "fast"), ("aim", "reference"), ("fastv", "fast"),
         ("tome", "fast"), ("random", "fast"), ("pooling", "fast"), ("mustdrop-64", "fast"))
# MustDrop's merge needs redundant patches: random weights see only pixels, and noise has
# none. The first FLAT_WINDOWS of the 3x3-patch windows (row-major) of every image are
# one flat colour each; the rest is noise. Every method gets the same images.
FLAT_WINDOWS = 32
# Text tokens placed before the image slots (BOS and a chat-template prefix); the rest of
# the prompt follows them, as in LLaVA's "USER: <image>\n<question> ASSISTANT:".
TEXT_BEFORE_IMAGE = 5


def mid_config() -> LlavaConfig:
  """576 visual tokens as in LLaVA-1.5; an LLM of ~125M parameters; a tower small enough
  that a CPU prefill takes about a second."""
  return LlavaConfig(
      vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_layers=4, num_heads=6,
                          image_size=336, patch_size=14),
      text=TextConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                      max_position_embeddings=2048),
      image_token_id=31999, pad_token_id=0, vision_feature_layer=-2)


def param_counts(cfg: LlavaConfig) -> dict[str, int]:
  """Parameters per top-level module and in all, from shapes only."""
  shapes = jax.eval_shape(lambda: llava.init_params(cfg, jax.random.PRNGKey(0)))
  out = {name: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))
         for name, tree in shapes.items()}
  out["total"] = sum(out.values())
  return out


def make_inputs(cfg: LlavaConfig, plan: Plan, text_tokens: int, batch: int,
                seed: int = 0) -> tuple[jax.Array, ...]:
  """(input_ids, pixel_values, attention_mask, positions) for unpadded prompts."""
  rng = np.random.default_rng(seed)
  text = rng.integers(3, cfg.image_token_id, (batch, text_tokens))
  image = np.full((batch, plan.num_visual), cfg.image_token_id)
  ids = np.concatenate([text[:, :TEXT_BEFORE_IMAGE], image, text[:, TEXT_BEFORE_IMAGE:]], 1)
  mask = np.ones(ids.shape, bool)
  positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  s, side = cfg.vision.image_size, cfg.vision.patch_size * mustdrop.WINDOW
  pixels = rng.normal(size=(batch, s, s, cfg.vision.num_channels))
  for w in range(FLAT_WINDOWS):
    r, c = divmod(w, s // side)
    pixels[:, side * r:side * (r + 1), side * c:side * (c + 1)] = rng.normal(
        size=(batch, 1, 1, cfg.vision.num_channels))
  return tuple(jax.device_put(a) for a in (ids.astype(np.int32), pixels.astype(np.float32),
                                           mask, positions.astype(np.int32)))


@dataclasses.dataclass
class Result:
  """One method's plan, costs and measurements. `run(params, *inputs)` is one prefill."""
  label: str
  visual_slots: int
  run: Callable[..., Any]
  inputs: tuple
  compile_s: float
  xla_flops: float
  flops: cost.PrefillFlops
  exact_flops: float
  kv_bytes: int
  equivalent_tokens: float
  note: str = ""
  times: list[float] = dataclasses.field(default_factory=list)

  @property
  def median_s(self) -> float:
    return statistics.median(self.times)


def compile_case(model, params, cfg, name, mode, args) -> Result:
  """Builds the plan, compiles its prefill (timed) and computes its costs."""
  retention = None if name == "none" else args.retention
  plan = make_plan(methods.get(name, cfg, retention, mode), cfg)
  inputs = make_inputs(cfg, plan, args.text_tokens, args.batch)
  # Counts are a traced argument, as in serving: changing them would not recompile.
  fn = jax.jit(lambda p, c, *a: model.apply({"params": p}, *a, max_new_tokens=1, plan=plan,
                                            counts=c, method="prefill"))
  start = time.perf_counter()
  compiled = fn.lower(params, plan.counts(), *inputs).compile()
  compile_s = time.perf_counter() - start
  item = jnp.dtype(args.dtype).itemsize
  ideal = cost.plan_cost(cfg, plan, args.text_tokens, args.batch, bytes_per_element=item,
                         exact=True)
  compiled_cost = cost.plan_cost(cfg, plan, args.text_tokens, args.batch,
                                 bytes_per_element=item)
  label = name if mode == "fast" else f"{name} ({mode})"
  return Result(label, plan.num_visual, compiled, (plan.counts(),) + inputs, compile_s,
                float(compiled.cost_analysis()["flops"]), compiled_cost["flops"],
                ideal["flops"].total, compiled_cost["kv_bytes"].total,
                compiled_cost["equivalent_tokens"])


def _batched(flops: cost.PrefillFlops, batch: int) -> cost.PrefillFlops:
  """One sample's FLOPs, repeated over `batch` samples."""
  return cost.PrefillFlops(**{
      f.name: dataclasses.replace(getattr(flops, f.name),
                                  batch=getattr(flops, f.name).batch * batch)
      for f in dataclasses.fields(flops)})


def segmented_case(model, params, cfg, name, args) -> Result:
  """MustDrop in fast mode: the segmented prefill, warmed up (compiling every segment for
  the capacities these inputs meet; timed as the compile) and costed from its counts."""
  plan = make_plan(methods.get(name, cfg), cfg)
  keys = ("input_ids", "pixel_values", "attention_mask", "positions")
  batch = dict(zip(keys, make_inputs(cfg, plan, args.text_tokens, args.batch)))
  prefill = segmented.SegmentedPrefill(model, plan)
  # Record the jitted programs' arguments in the warm-up to ask XLA for their FLOPs.
  calls, programs = [], (prefill._merge, prefill._segment)  # pylint: disable=protected-access

  def recording(fn):
    def call(*a):
      calls.append((fn, a))
      return fn(*a)
    return call

  prefill._merge, prefill._segment = map(recording, programs)  # pylint: disable=protected-access
  start = time.perf_counter()
  out = jax.block_until_ready(prefill(params, batch, max_new_tokens=1))
  compile_s = time.perf_counter() - start
  prefill._merge, prefill._segment = programs  # pylint: disable=protected-access
  xla_flops = sum(float(fn.lower(*a).compile().cost_analysis()["flops"]) for fn, a in calls)

  aux, caps = out["aux"], out["capacities"]
  merged = np.asarray(aux["vision_tokens"])
  per_layer = np.asarray(aux["visual_per_layer"])  # [layers, batch]
  item = jnp.dtype(args.dtype).itemsize
  exact = [cost.request_cost(cfg, plan, args.text_tokens, merged[i], per_layer[:, i],
                             bytes_per_element=item)
           for i in range(args.batch)]
  # What the segments compute and cache (the prompt, as for the other methods): every
  # sample at its segment's capacity.
  layer_caps = [c for c, (lo, hi) in zip(caps, prefill.bounds) for _ in range(lo, hi)]
  compiled_cost = cost.request_cost(cfg, plan, args.text_tokens, caps[0], layer_caps,
                                    bytes_per_element=item)
  filters = plan.find(mustdrop.KeyFilterPlan).filter_layers
  first = filters[0]
  note = (f"{name}: per sample, {cfg.num_image_tokens} patches → {merged.tolist()} tokens "
          f"after the window merge; visual tokens entering LLM layers 0-{first} "
          f"{per_layer[0].tolist()}, then after each filter (layers "
          f"{', '.join(map(str, filters))}) "
          f"{', '.join(str(per_layer[f + 1].tolist()) for f in filters)}"
          f"; segment capacities {caps}; "
          f"{np.asarray(aux['equivalent_tokens']).round(1).tolist()} equivalent tokens.")
  return Result(name, caps[0], lambda p, b: prefill(p, b, max_new_tokens=1), (batch,),
                compile_s, xla_flops, _batched(compiled_cost["flops"], args.batch),
                sum(c["flops"].total for c in exact),
                compiled_cost["kv_bytes"].total * args.batch,
                float(np.mean(aux["equivalent_tokens"])), note)


def time_cases(results: list[Result], params, rounds: int):
  """One warm-up call each, then `rounds` rounds visiting every method in turn. A
  segmented prefill is timed whole, host reads between its segments included."""
  for r in results:
    jax.block_until_ready(r.run(params, *r.inputs))
  with tqdm(total=rounds * len(results), desc="timing", unit="run") as bar:
    for _ in range(rounds):
      for r in results:
        start = time.perf_counter()
        jax.block_until_ready(r.run(params, *r.inputs))
        r.times.append(time.perf_counter() - start)
        bar.update()


def machine() -> str:
  """CPU model, core count, OS and the device jax runs on, in one line."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    cpu = found.group(1) if found else cpu
  except OSError:
    pass
  dev = jax.devices()[0]
  return (f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}; "
          f"jax {jax.__version__} on {dev.platform} ({dev.device_kind})")


def _g(flops: float, digits: int = 1) -> str:
  return f"{flops / 1e9:.{digits}f}"


def tables(results: list[Result]) -> str:
  """The timing/FLOPs table and the per-stage FLOPs table, in Markdown."""
  base = results[0]
  rows = ["| method | visual slots into LLM | equiv. visual tokens | compile s | median ms "
          "| min ms | **speedup, median** | **speedup, min** | GFLOPs compiled "
          "| **FLOPs ratio** | GFLOPs exact | exact ratio | XLA GFLOPs (vs compiled) "
          "| KV cache MiB |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    xla_delta = 100 * (r.xla_flops / r.flops.total - 1)
    rows.append(
        f"| {r.label} | {r.visual_slots} | {r.equivalent_tokens:.1f} | {r.compile_s:.1f} "
        f"| {_ms(r.median_s)} | {_ms(min(r.times))} "
        f"| **{base.median_s / r.median_s:.2f}×** | **{min(base.times) / min(r.times):.2f}×** "
        f"| {_g(r.flops.total)} | **{base.flops.total / r.flops.total:.2f}×** "
        f"| {_g(r.exact_flops)} | {base.exact_flops / r.exact_flops:.2f}× "
        f"| {_g(r.xla_flops)} ({xla_delta:+.1f}%) | {r.kv_bytes / 2**20:.1f} |")
  stages = ["| method | vision tower | projector | LLM layers | scorer | LM head |",
            "|---|---:|---:|---:|---:|---:|"]
  for r in results:
    f = r.flops
    stages.append(f"| {r.label} | {_g(f.vision.total, 2)} | {_g(f.projector.total, 2)} "
                  f"| {_g(f.llm.batch * sum(f.llm.per_layer), 2)} "
                  f"| {_g(f.llm.batch * f.llm.extra, 2)} | {_g(f.lm_head.total, 2)} |")
  return "\n".join(rows) + "\n\nCompiled-program GFLOPs by stage:\n\n" + "\n".join(stages)


def plot(results: list[Result], path: str, title: str):
  """Measured speedup beside the FLOPs reduction (compiled and exact), per method."""
  base, rest = results[0], results[1:]
  series = {
      "measured speedup (median)": [base.median_s / r.median_s for r in rest],
      "FLOPs reduction, compiled": [base.flops.total / r.flops.total for r in rest],
      "FLOPs reduction, exact counts": [base.exact_flops / r.exact_flops for r in rest],
  }
  x = np.arange(len(rest))
  width = 0.8 / len(series)
  fig, ax = plt.subplots(figsize=(9, 4.5))
  for i, (name, values) in enumerate(series.items()):
    bars = ax.bar(x + (i - 1) * width, values, width, label=name)
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
  # On a loaded machine the fastest run is the least disturbed one: show it too.
  ax.scatter(x - width, [min(base.times) / min(r.times) for r in rest], marker="_", s=200,
             color="black", zorder=3, label="measured speedup (min times)")
  ax.axhline(1.0, color="grey", lw=0.8, ls="--")
  ax.set_xticks(x, [r.label for r in rest])
  ax.set_ylabel("× vs. all 576 tokens")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.08))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _ms(seconds: float) -> str:
  """Milliseconds with a decimal below 10 ms (accelerator prefills take a few ms)."""
  return f"{seconds * 1e3:.1f}" if seconds < 0.01 else f"{seconds * 1e3:.0f}"


# The flags the shipped blocks were run at. Batch and rounds are free (the block's name
# and PNG say the batch), and so is the dtype on an accelerator (its block names it).
PUBLISHED = dict(retention=0.25, text_tokens=64,
                 methods=",".join(dict.fromkeys(n for n, _ in CASES)))


def _parser() -> argparse.ArgumentParser:
  parser = outputs.ArgumentParser(prog="prefill_speed", description=__doc__.split("\n\n")[1],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1, help="prompts per prefill")
  parser.add_argument("--rounds", type=int, default=5, help="timed runs per method")
  parser.add_argument("--retention", type=float, default=PUBLISHED["retention"],
                      help="fraction of visual tokens kept on average over LLM layers")
  parser.add_argument("--text-tokens", type=int, default=PUBLISHED["text_tokens"],
                      help="text tokens per prompt")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--methods", default=PUBLISHED["methods"],
                      help="comma-separated subset of the methods; 'none' always runs")
  shipped = ("; default, for the published settings (every flag but --batch, --rounds and, "
             "on an accelerator, --dtype at its default): %s; any other run must name it")
  parser.add_argument("--markdown", default=None,
                      help="file whose prefill-speed block is replaced ('' to skip)"
                      + shipped % "BENCHMARKS.md")
  parser.add_argument("--plot", default=None,
                      help="PNG path ('' to skip)" + shipped %
                      "benchmarks/prefill_speed[_bN][_BACKEND_DTYPE].png")
  return parser


def _check_args(args, cfg: LlavaConfig, backend: str) -> list[tuple[str, str]]:
  """Every check before the model is built: flag values, the plans of the methods at
  --retention, and the outputs (filled in where the run may write the shipped ones).
  Returns the cases to run; ValueError names the problem."""
  if args.batch < 1 or args.rounds < 1:
    raise ValueError(f"--batch={args.batch} --rounds={args.rounds}: both must be positive.")
  if not 0 < args.retention <= 1:
    raise ValueError(f"--retention={args.retention}: give the fraction of visual tokens "
                     "kept, in (0, 1].")
  room = cfg.text.max_position_embeddings - cfg.num_image_tokens
  if not TEXT_BEFORE_IMAGE <= args.text_tokens <= room:
    raise ValueError(f"--text-tokens={args.text_tokens}: give {TEXT_BEFORE_IMAGE} to {room} "
                     f"(the prompt must fit {cfg.text.max_position_embeddings} positions "
                     f"with {cfg.num_image_tokens} visual tokens).")
  names = list(dict.fromkeys(n for n, _ in CASES))
  wanted = set(filter(None, args.methods.split(","))) | {"none"}
  unknown = sorted(wanted - set(names))
  if unknown:
    raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(names)}.")
  cases = [c for c in CASES if c[0] in wanted]
  for name, mode in cases:  # what compile_case and segmented_case will build
    retention = None if name in ("none", "mustdrop-64") else args.retention
    try:
      make_plan(methods.get(name, cfg, retention, mode), cfg)
    except ValueError as e:
      raise ValueError(f"--retention={args.retention}: {name} cannot run it: {e}") from None
  differs = [f"--{k.replace('_', '-')}={getattr(args, k)}"
             for k in ("retention", "text_tokens") if getattr(args, k) != PUBLISHED[k]]
  if wanted != set(names):
    differs.append(f"--methods={args.methods}")
  if backend == "cpu" and args.dtype != "float32":  # the CPU block's name has no dtype
    differs.append(f"--dtype={args.dtype}")
  left = [f for f in ("markdown", "plot") if getattr(args, f) is None]
  if differs and left:
    raise ValueError(f"a run with {' '.join(differs)} is not the one the shipped results "
                     f"were run at and would replace them: say where its results go with "
                     f"{' '.join(f'--{f}=PATH' for f in left)} ('' skips one).")
  if args.markdown is None:
    args.markdown = os.path.join(_ROOT, "BENCHMARKS.md")
  if args.plot is None:
    suffix = ("" if args.batch == 1 else f"_b{args.batch}") + (
        "" if backend == "cpu" else f"_{backend}_{args.dtype}")
    args.plot = os.path.join(_ROOT, "benchmarks", f"prefill_speed{suffix}.png")
  if args.plot:
    outputs.check_output("--plot", args.plot, outputs.PLOT_FORMATS)
  if args.markdown:
    outputs.check_block("--markdown", args.markdown, _block_key(args, backend))
  return cases


def _block_key(args, backend: str) -> str:
  return f"prefill_speed batch={args.batch}" + (
      "" if backend == "cpu" else f" {backend} {args.dtype}")


def main(argv: list[str] | None = None):
  args = _parser().parse_args(argv)
  cfg = mid_config()
  # CPU runs keep the plain names; an accelerator's run gets its own block and PNG.
  backend = jax.default_backend()
  try:
    cases = _check_args(args, cfg, backend)
  except ValueError as e:
    raise SystemExit(f"prefill_speed: {cli.one_line(e)}") from None
  try:
    _run(args, cfg, cases, backend, argv)
  except KeyboardInterrupt:  # staged files are discarded: the old ones stay as they were
    kept = ", ".join(filter(None, (args.markdown, args.plot)))
    raise SystemExit("prefill_speed: interrupted; nothing was written"
                     + (f" ({kept} as they were)." if kept else ".")) from None


def _run(args, cfg: LlavaConfig, cases, backend: str, argv: list[str] | None):
  """Measures the cases and writes the block and the plot."""
  results, counts, minutes, load_before = _measure(cfg, cases, args)

  command = "python -m benchmarks.prefill_speed " + " ".join(
      sys.argv[1:] if argv is None else argv)
  v, t = cfg.vision, cfg.text
  windows = (v.image_size // v.patch_size // mustdrop.WINDOW) ** 2
  body = "\n".join([
      f"Command: `{command.strip()}`", "",
      f"Machine: {machine()}. Run {datetime.date.today().isoformat()}, "
      f"{minutes:.1f} min for compiles and timing; load average "
      f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after.", "",
      f"Model (random weights, {args.dtype}): CLIP-style tower {v.hidden_size} wide, "
      f"{cfg.vision_layers_used} of {v.num_layers} layers run, {v.image_size} px / "
      f"{v.patch_size} px patches = {cfg.num_image_tokens} visual tokens, "
      f"{counts['vision'] / 1e6:.1f}M parameters; projector {counts['projector'] / 1e6:.1f}M; "
      f"Llama LLM {t.hidden_size} wide, {t.num_layers} layers, {t.num_heads} heads "
      f"({t.num_kv_heads} KV), MLP {t.intermediate_size}, vocabulary {t.vocab_size}: "
      f"{counts['llm'] / 1e6:.1f}M parameters. Prompt: {args.text_tokens} text tokens + the "
      f"visual slots, batch {args.batch}, retention {args.retention}; images of noise "
      f"with the first {FLAT_WINDOWS} of the {windows} {mustdrop.WINDOW}x{mustdrop.WINDOW}-"
      f"patch windows flat. Times: median and "
      f"minimum of {args.rounds} runs; ratios are baseline / method.", "",
      tables(results)] + [f"\n{r.note}" for r in results if r.note])
  title = (f"Prefill at {args.retention:.0%} retention, batch {args.batch}, "
           f"{jax.devices()[0].platform.upper()} ({args.dtype})")
  if args.plot:
    # The link is relative to the Markdown file (the repository root for BENCHMARKS.md).
    link = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.markdown or
                                                                       args.plot)))
    body += f"\n\n![prefill speedup vs FLOPs reduction]({link})"
  outputs.publish("prefill_speed", body, plot_path=args.plot,
                  draw=lambda path: plot(results, path, title), markdown_path=args.markdown,
                  block=_block_key(args, backend))


def _measure(cfg: LlavaConfig, cases, args) -> tuple[list[Result], dict[str, int], float,
                                                     float]:
  """Builds the model, compiles and times every case: (results, parameter counts,
  minutes taken, load average before)."""
  counts = param_counts(cfg)
  print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
  model = llava.Llava(cfg, jnp.dtype(args.dtype))
  params = jax.jit(lambda key: llava.init_params(cfg, key))(jax.random.PRNGKey(0))
  start, load_before = time.perf_counter(), os.getloadavg()[0]
  results = [segmented_case(model, params, cfg, name, args) if name.startswith("mustdrop")
             else compile_case(model, params, cfg, name, mode, args)
             for name, mode in tqdm(cases, desc="compiling", unit="method")]
  time_cases(results, params, args.rounds)
  return results, counts, (time.perf_counter() - start) / 60, load_before


if __name__ == "__main__":
  main()
