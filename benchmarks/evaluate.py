r"""Accuracy against prefill cost of every token-reduction setting on glyph_vqa's test split.

  python -m benchmarks.evaluate --checkpoint=DIR --data_dir=DIR
  python -m benchmarks.evaluate --checkpoint=DIR --data_dir=DIR --limit=400 \
      --settings=aim@0.25,fastv-k2-r50,mustdrop-64
  python -m benchmarks.evaluate --add --variants=pmod-new=DIR   # one more row
  python -m benchmarks.evaluate --budgets=0.5,0.3 --json=B.json --markdown=B.md --plot=B.png

Runs each setting (`tokred_jax.eval.evaluate`: a method at a retention level, METHOD@FRACTION,
or a preset; default: dense, aim/fastv/tome/random/pooling at 0.5, 0.25 and 0.125, the
published presets, and p-MoD's trained schedule if the model has routers; --budgets:
aim/fastv/tome/random/pooling each at the same budgets, METHOD@flops=B, their parameters
solved by `tokred_jax.engine.budget`, added to --settings or without it instead of the
sweep) over the same questions with greedy decoding, scores exact-match accuracy overall
and per question type, and reports per example the analytic prefill FLOPs and KV-cache
bytes at the method's exact counts, the equivalent visual tokens and the measured
latency. Dense, random and pooling rows are always added: they are the references.
Settings the model cannot run are listed as skipped with the reason.

Writes the results as JSON (--json), a block in BENCHMARKS.md between this run's markers
(--markdown; text outside the block is kept) and an accuracy-vs-FLOPs plot (--plot).
With --add, the settings and variants given are run on the same questions and added to
the results already in --json (replacing rows of the same label), so that a new
checkpoint or setting does not need the whole sweep again; the block lists every
command that contributed.

The default outputs are the shipped results (benchmarks/evaluate.json, .png and the
BENCHMARKS.md block): only the published sweep (every flag that changes the results at
its default) or an --add to them writes there. Any other run (--limit, another split,
checkpoint or --settings, ...) must name its outputs, or is refused. Every flag, output
path, setting (its plan against the checkpoint's config.json: one the model cannot run
is refused with the reason, not skipped after the others have run), variant and the data
is checked before the weights load; the files are written together at the end, each by
a rename, so a failed or interrupted run leaves the old ones byte-identical.

On several hosts every host runs the same command with --distributed=auto (TPU pods) or
--coordinator_address/--num_processes/--process_id; each runs its share of the batches
on a whole copy of the model, and process 0 writes the results of all (README, "Several
hosts").
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import jax
import matplotlib
from tqdm import tqdm

matplotlib.use("Agg")  # Headless: the plot only goes to a file.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

from benchmarks import outputs
from benchmarks.prefill_speed import machine
from tokred_jax import cli
from tokred_jax.core import distributed
from tokred_jax.engine.pipeline import (DEFAULT_CHECKPOINT, PMOD_CHECKPOINT,
                                        PMOD_QUARTER_CHECKPOINT, Pipeline)
from tokred_jax.eval import evaluate
from tokred_jax.io import checkpoint

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VARIANTS = (f"pmod-cosine={PMOD_CHECKPOINT},"
                    f"pmod-constant@0.25={PMOD_QUARTER_CHECKPOINT}")
# The swept methods' colours in the plot (presets share their method's colour).
_COLOURS = {"aim": "C0", "fastv": "C1", "tome": "C2", "random": "C3", "pooling": "C4",
            "mustdrop": "C5", "pmod": "C6", "dart": "C8"}
# For the other methods and composed recipes, in order of appearance.
_MORE_COLOURS = ("C9", "olive", "teal", "navy", "maroon", "C7")


def header(types) -> str:
  """The table's header row for these question types."""
  return ("| method | retention / preset | accuracy % | "
          + " | ".join(f"{t} %" for t in types)
          + " | GFLOPs / example | FLOPs ratio | KV cache KiB | equiv. visual tokens "
          "| latency ms / example |")


def _setting(r: evaluate.SettingResult) -> str:
  options = "".join(f" ({name}={value:g})" for name, value in r.options.items())
  if r.budget is not None:
    return f"{r.measure}={r.budget:g}{options}"
  if r.preset:
    return r.preset + options
  if r.retention is not None:
    return f"{r.retention:g}{options}"
  return "1.0" if r.method == "none" else "trained schedule"


def table(run: evaluate.Evaluation) -> str:
  """One row per setting; skipped ones say so, with their reasons below the table."""
  types = list(dict.fromkeys(run.question_types))
  dense = next(r for r in run.results if r.method == "none")
  rows = [header(types), "|---|---|" + "---:|" * (len(types) + 6)]
  skipped = []
  for r in run.results:
    if r.skipped:
      skipped.append(f"- {r.label}: {r.skipped}")
      rows.append(f"| {r.method} | {_setting(r)} | skipped |" + " — |" * (len(types) + 5))
      continue
    by_type = r.accuracy_by_type
    rows.append(
        f"| {r.method} | {_setting(r)} | {100 * r.accuracy:.1f} | "
        + " | ".join(f"{100 * by_type[t]:.1f}" for t in types)
        + f" | {r.flops / 1e9:.3f} | {dense.flops / r.flops:.2f}× | {r.kv_bytes / 1024:.1f} "
        f"| {r.equivalent_visual_tokens:.1f} | {1e3 * r.latency_s:.2f} |")
  notes = ["", "Skipped (the model cannot run them):", *skipped] if skipped else []
  return "\n".join(rows + notes)


def model_line(model: dict, checkpoint: str) -> str:
  p = model["params"]
  routers = (f"; p-MoD routers in layers {model['router_layers']}"
             if model["router_layers"] else "")
  return (f"Model `{checkpoint}` ({model['dtype']}): {model['vision_kind'].upper()}-style "
          f"tower {model['vision_width']} wide, {model['vision_layers_run']} of "
          f"{model['vision_layers']} layers run, {model['image_size']} px / "
          f"{model['patch_size']} px patches = {model['visual_tokens']} visual tokens, "
          f"{p.get('vision', 0) / 1e6:.2f}M parameters; projector "
          f"{p.get('projector', 0) / 1e6:.2f}M; {model['text_kind'].title()} LLM "
          f"{model['text_width']} wide, {model['text_layers']} layers, {model['heads']} heads "
          f"({model['kv_heads']} KV), MLP {model['mlp']}, vocabulary {model['vocab']}: "
          f"{p.get('llm', 0) / 1e6:.2f}M parameters{routers}.")


def commands_lines(history: list[dict]) -> list[str]:
  """Each contributing command with its machine, date and duration."""
  if len(history) == 1:
    h, = history
    return [f"Command: `{h['command']}`", "",
            f"Machine: {h['machine']}. Run {h['date']}, {h['minutes']:.1f} min."]
  return ["Commands (each later one added rows to the results of those before it):", "",
          *(f"- `{h['command']}`: {h['machine']}; run {h['date']}, {h['minutes']:.1f} min."
            for h in history)]


def report(run: evaluate.Evaluation, history: list[dict], data: str, checkpoint: str,
           plot_link: str | None) -> str:
  """The Markdown block: commands, machines, model, data, the table, the plot (its path
  relative to the Markdown file)."""
  body = "\n".join([
      *commands_lines(history), "", model_line(run.model, checkpoint), "",
      f"Data: {data}: {len(run.ids)} questions, batch {run.batch_size}, greedy decoding of "
      f"up to {run.max_new_tokens} tokens, exact match after normalising (stripped, "
      "lower case, no final full stop). Per example: prefill GFLOPs and the KV cache "
      "after prefill at the method's exact counts and each prompt's length; FLOPs ratio "
      "= dense ÷ setting; latency = median over batches of prefill + decode time ÷ "
      "batch, after a warm-up call per input shape.", "",
      table(run)])
  if plot_link:
    body += f"\n\n![accuracy vs prefill FLOPs]({plot_link})"
  return body


def plot(run: evaluate.Evaluation, path: str, title: str):
  """Accuracy against prefill GFLOPs: a line per method over its retention levels and
  budgets (budget points as squares, a dashed vertical at each FLOPs budget: the methods
  compared at equal cost), presets (and p-MoD's trained schedule) as labelled hollow
  markers in the method's colour, dense as a star and a dotted level."""
  done = [r for r in run.results if not r.skipped]
  fig, ax = plt.subplots(figsize=(8, 5))
  xs, ys = [r.flops / 1e9 for r in done], [100 * r.accuracy for r in done]
  near_x, near_y = 0.04 * (max(xs) - min(xs)), 0.03 * (max(ys) - min(ys))
  labelled = []

  def annotate(text: str, x: float, y: float, colour: str):
    # Labels of points that (nearly) coincide go one under another, not on top.
    stacked = sum(abs(x - px) < near_x and abs(y - py) < near_y for px, py in labelled)
    labelled.append((x, y))
    ax.annotate(text, (x, y), fontsize=7, xytext=(4, 4 - 9 * stacked),
                textcoords="offset points", color=colour)

  others = iter(_MORE_COLOURS * len(done))
  for method in dict.fromkeys(r.method for r in done):
    if method == "none":
      continue
    colour = _COLOURS[method] if method in _COLOURS else next(others)
    swept = sorted((r for r in done if r.method == method and
                    (r.retention is not None or r.budget is not None)), key=lambda r: r.flops)
    if swept:
      ax.plot([r.flops / 1e9 for r in swept], [100 * r.accuracy for r in swept], "o-",
              color=colour, label=method)
    for r in (r for r in swept if r.budget is not None):
      ax.scatter(r.flops / 1e9, 100 * r.accuracy, marker="s", s=36, color=colour, zorder=3)
    if len(swept) == 1:  # a line of one point (a composed recipe at one level): say which
      annotate(f"{method}@{_setting(swept[0])}", swept[0].flops / 1e9,
               100 * swept[0].accuracy, colour)
    for i, r in enumerate(r for r in done if r.method == method and r.retention is None
                          and r.budget is None):
      ax.scatter(r.flops / 1e9, 100 * r.accuracy, s=50, facecolors="none",
                 edgecolors=colour, label=None if swept or i else method)
      annotate(r.preset or f"{method}, {_setting(r)}", r.flops / 1e9, 100 * r.accuracy,
               colour)
  dense = [r for r in done if r.method == "none"]
  for b in sorted({r.budget for r in done if r.budget is not None and r.measure == "flops"}):
    if dense:
      ax.axvline(b * dense[0].flops / 1e9, color="grey", lw=0.7, ls="--")
      ax.annotate(f"budget {b:g}", (b * dense[0].flops / 1e9, 0), fontsize=7, color="grey",
                  xycoords=("data", "axes fraction"), xytext=(2, 4),
                  textcoords="offset points")
  for r in dense:
    ax.scatter(r.flops / 1e9, 100 * r.accuracy, marker="*", s=160, color="black",
               zorder=3, label="dense (all tokens)")
    ax.axhline(100 * r.accuracy, color="black", lw=0.8, ls=":")
  ax.set_ylim(max(-2, min(ys) - 5), min(102, max(ys) + 5))
  ax.set_xlabel("prefill GFLOPs per example")
  ax.set_ylabel("accuracy %")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _shown(path: str) -> str:
  """A checkpoint path as recorded: relative to the repository when inside it."""
  full = os.path.abspath(path)
  return os.path.relpath(full, _ROOT) if full.startswith(_ROOT + os.sep) else full


def _previous_run(args) -> dict:
  """The saved run that --add extends, checked against this one's arguments."""
  if not args.json:
    raise ValueError("--add needs --json: the saved results to add rows to.")
  if not os.path.isfile(args.json):
    raise ValueError(f"--add: {args.json} does not exist; run the full evaluation first.")
  try:
    with open(args.json, encoding="utf-8") as f:
      record = json.load(f)
    evaluate.Evaluation.from_dict(record)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"--add: {args.json} is not a saved evaluation ({e!r}); name the JSON "
                     "file an earlier run wrote.") from None
  for name in ("checkpoint", "dataset", "split", "limit", "dtype", "batch_size",
               "max_new_tokens"):
    ours = args.batch if name == "batch_size" else getattr(args, name)
    theirs = record.get(name)
    if name == "checkpoint":
      ours, theirs = _shown(ours), _shown(theirs)
    if theirs != ours:
      raise ValueError(f"--add: {args.json} has {name}={theirs!r}, this run "
                       f"{ours!r}; pass the same --{name.replace('_size', '')}.")
  return record


def _check_same_questions(args, record: dict, examples: list[evaluate.Example]):
  if (record["ids"], record["answers"]) != ([e.id for e in examples],
                                            [e.answer for e in examples]):
    raise ValueError(f"--add: {args.json} was run over other questions than "
                     f"{args.dataset}'s {args.split} split has now; run the full "
                     "evaluation again.")


def _history(record: dict) -> list[dict]:
  """The commands of a saved run (older files kept one command at the top level)."""
  if "runs" in record:
    return record["runs"]
  return [{k: record[k] for k in ("command", "machine", "date", "minutes")}]


def _merged(record: dict, run: evaluate.Evaluation) -> evaluate.Evaluation:
  previous = evaluate.Evaluation.from_dict(record)
  previous.add(run)
  return previous


# The published sweep: run with these values and no output flags it writes the shipped
# results (SHIPPED, under the repository); any other run says where its results go.
PUBLISHED = dict(checkpoint=DEFAULT_CHECKPOINT, variants=DEFAULT_VARIANTS,
                 dataset="glyph_vqa/default", split="test", limit=None, batch=32,
                 max_new_tokens=5, dtype="float32", settings="", budgets="")
SHIPPED = dict(json="benchmarks/evaluate.json", plot="benchmarks/evaluate.png",
               markdown="BENCHMARKS.md")


def _unpublished(args) -> list[str]:
  """The flags in which this run differs from the published sweep, as written."""
  out = []
  for name, published in PUBLISHED.items():
    given = getattr(args, name)
    if name == "checkpoint":
      same = _shown(given) == _shown(published)
    else:
      same = given == published or (name == "variants" and given is None)
    if not same:
      out.append(f"--{name}={'' if given is None else given}")
  return out


def _resolve_outputs(args):
  """Fills in the output flags left out, which only the published sweep (or an --add to
  its results) may: ValueError for any other run, naming the flags it must give."""
  left = [name for name in SHIPPED if getattr(args, name) is None]
  if not left:
    return
  why = [] if args.add else _unpublished(args)
  if args.json is not None:
    why.insert(0, f"--json={args.json}")
  if why:
    adding = (" or --add to add its rows to them" if args.json is None and not args.add
              and (args.settings or args.variants is not None) else "")
    raise ValueError(
        f"a run with {' '.join(why)} is not the published sweep, and its results would "
        f"replace the shipped {', '.join(SHIPPED[n] for n in left)}: say where they go "
        f"with {' '.join(f'--{n}=PATH' for n in left)} ('' skips one){adding}.")
  for name in left:
    setattr(args, name, os.path.join(_ROOT, SHIPPED[name]))


def _block_key(args) -> str:
  return (f"evaluate {args.dataset}" + (f" split={args.split}" if args.split != "test" else "")
          + (f" limit={args.limit}" if args.limit else ""))


def _variants(args) -> list[tuple[str, str]]:
  """(label, directory) of each --variants item, each a p-MoD checkpoint (config only)."""
  out = []
  for item in filter(None, args.variants.split(",")):
    label, sep, path = item.partition("=")
    if not sep or not label or not path:
      raise ValueError(f"--variants={args.variants}: write LABEL=DIR,... ({item!r} is not "
                       "LABEL=DIR).")
    if label in dict(out):
      raise ValueError(f"--variants: the label {label!r} is given twice; each row needs "
                       "its own.")
    try:
      evaluate.setting_plan(checkpoint.read_config(path), evaluate.Setting("pmod"))
    except ValueError as e:
      raise ValueError(f"--variants: {label}={path}: {e}") from None
    out.append((label, path))
  return out


def _budget_settings(args) -> list[evaluate.Setting]:
  """The swept methods at each --budgets value (a method that cannot reach one is
  listed as skipped, with the range it reaches)."""
  try:
    levels = [float(b) for b in filter(None, args.budgets.split(","))]
  except ValueError:
    raise ValueError(f"--budgets={args.budgets}: write fractions of dense prefill FLOPs, "
                     "e.g. 0.5,0.3 (or counts with --budget_measure=tokens).") from None
  return evaluate.budget_settings(levels, args.budget_measure)


def _check_args(args):
  """Every check that needs no weights, in one place, before any model work: the flag
  values, the outputs, the settings against the model's config.json, the variants, the
  data and, with --add, the saved results. Returns (settings, variants, examples,
  previous record or None)."""
  if args.batch < 1 or (args.limit is not None and args.limit < 1):
    raise ValueError("--batch and --limit must be positive.")
  if args.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={args.max_new_tokens}: decode at least 1 token.")
  settings = evaluate.parse_settings(args.settings) if args.settings else None
  budget_rows = _budget_settings(args)
  if args.add and not settings and not budget_rows and not args.variants:
    raise ValueError("--add needs --settings or --variants (or --budgets): the rows to add.")
  _resolve_outputs(args)
  if args.json:
    outputs.check_output("--json", args.json)
  if args.plot:
    outputs.check_output("--plot", args.plot, outputs.PLOT_FORMATS)
  if args.markdown:
    outputs.check_block("--markdown", args.markdown, _block_key(args))
  cfg = checkpoint.read_config(args.checkpoint)
  if args.variants is None:
    args.variants = "" if args.add else DEFAULT_VARIANTS
  if settings:  # asked for by name: refused now, not skipped after the rest have run
    evaluate.check_settings(cfg, settings)
  variants = _variants(args)
  previous = _previous_run(args) if args.add else None
  examples = evaluate.load_examples(args.dataset, args.data_dir, args.split, args.limit)
  if settings and cfg.arch != "llava":  # and at the input buckets of the examples (videos)
    evaluate.check_settings(cfg, settings, examples)
  if args.add:
    _check_same_questions(args, previous, examples)
    settings = (settings or []) + budget_rows
  elif budget_rows:
    settings = evaluate.with_baselines((settings or []) + budget_rows)
  else:
    settings = evaluate.with_baselines(settings or evaluate.default_settings(cfg))
  return settings, variants, examples, previous


def _check_usable(run: evaluate.Evaluation):
  """ValueError if the results are degenerate: no dense reference, or a row whose
  accuracy or costs are not finite numbers."""
  if not any(r.method == "none" and not r.skipped for r in run.results):
    raise ValueError("the results have no dense row to compare against")
  for r in run.results:
    values = (r.accuracy, r.flops, r.kv_bytes, r.latency_s)
    if not r.skipped and not all(v is not None and math.isfinite(v) for v in values):
      raise ValueError(f"the {r.label} row has non-finite scores or costs {values}")


def _parser() -> argparse.ArgumentParser:
  parser = outputs.ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                      help="Hugging Face LLaVA directory (default: the embedded model)")
  parser.add_argument("--variants", default=None,
                      help="comma-separated LABEL=DIR: p-MoD checkpoints of the same model, "
                      "each run at the ratios it was trained at ('' for none; default: "
                      "the embedded p-MoD variants, none with --add)")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data directory (default: generate glyph_vqa's examples)")
  parser.add_argument("--dataset", default=PUBLISHED["dataset"])
  parser.add_argument("--split", default=PUBLISHED["split"])
  parser.add_argument("--limit", type=int, default=None, help="first N examples only")
  parser.add_argument("--batch", type=int, default=PUBLISHED["batch"],
                      help="prompts per generate call")
  parser.add_argument("--max_new_tokens", type=int, default=PUBLISHED["max_new_tokens"])
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--settings", default="",
                      help="comma-separated METHOD@RETENTION or preset names (default: "
                      "the full sweep)")
  parser.add_argument("--budgets", default="",
                      help="comma-separated budgets: aim, fastv, tome, random and pooling "
                      "each solved for every one (added to --settings; without them, "
                      "instead of the full sweep)")
  parser.add_argument("--budget_measure", default="flops", choices=("flops", "kv", "tokens"),
                      help="what --budgets are of: dense prefill FLOPs, the dense KV cache "
                      "(fractions) or equivalent visual tokens (counts)")
  shipped = " (default, for the published sweep or --add: %s; any other run must name it)"
  parser.add_argument("--json", default=None, help="results file" + shipped % SHIPPED["json"])
  parser.add_argument("--markdown", default=None,
                      help="file whose evaluate block is replaced, '' to skip"
                      + shipped % SHIPPED["markdown"])
  parser.add_argument("--plot", default=None,
                      help="PNG path, '' to skip" + shipped % SHIPPED["plot"])
  parser.add_argument("--add", action="store_true",
                      help="run only --settings and --variants and add them to the results "
                      "in --json (same questions, checkpoint and dtype)")
  parser.add_argument("--distributed", default="", choices=("", "auto"),
                      help=distributed.HELP["distributed"])
  parser.add_argument("--coordinator_address", default=None,
                      help=distributed.HELP["coordinator_address"])
  parser.add_argument("--num_processes", type=int, default=None,
                      help=distributed.HELP["num_processes"])
  parser.add_argument("--process_id", type=int, default=None,
                      help=distributed.HELP["process_id"])
  return parser


def main(argv: list[str] | None = None):
  args = _parser().parse_args(argv)
  try:
    _main(args, argv)
  except KeyboardInterrupt:  # staged files are discarded: the old ones stay as they were
    kept = ", ".join(filter(None, (args.json, args.plot, args.markdown)))
    raise SystemExit("evaluate: interrupted; nothing was written"
                     + (f" ({kept} as they were)." if kept else ".")) from None


def _main(args, argv: list[str] | None):
  """Checks, runs, then writes (see the module docstring)."""
  try:  # Everything the user can get wrong fails here, before the weights load.
    distributed.initialize(distributed.Options(
        args.coordinator_address, args.num_processes, args.process_id,
        auto=args.distributed == "auto"))
    settings, variants, examples, previous = _check_args(args)
    pipe = Pipeline.load(args.checkpoint, dtype=args.dtype)
    variant_pipes = [(label, Pipeline.load(path, dtype=args.dtype)) for label, path in variants]
  except cli.USER_ERRORS as e:
    raise SystemExit(f"evaluate: {cli.one_line(e)}") from None
  kept = ", ".join(filter(None, (args.json, args.plot, args.markdown))) or "no files"
  start = time.perf_counter()
  per = evaluate.batches_per_setting(len(examples), args.batch)
  with tqdm(total=per * (len(settings) + len(variant_pipes)), unit="batch",
            disable=not distributed.is_main()) as bar:
    def progress(label: str, n: int):
      bar.set_postfix_str(label)
      bar.update(n)
    run = evaluate.evaluate(pipe, examples, settings, args.batch, args.max_new_tokens,
                            progress)
    for label, variant in variant_pipes:  # a row each, at its trained ratios
      result, = evaluate.evaluate(variant, examples, [evaluate.Setting("pmod")],
                                  args.batch, args.max_new_tokens, progress).results
      result.label = result.preset = label
      run.results.append(result)
  given = sys.argv[1:] if argv is None else argv
  this = dict(command=" ".join(["python -m benchmarks.evaluate", *given]),
              machine=machine(), date=datetime.date.today().isoformat(),
              minutes=(time.perf_counter() - start) / 60)
  history = [this]
  try:
    if previous:
      history = _history(previous) + history
      run = _merged(previous, run)
    _check_usable(run)
  except ValueError as e:
    raise SystemExit(f"evaluate: {cli.one_line(e)}; nothing was written ({kept} as they "
                     "were).") from None
  if not distributed.is_main():  # every process holds the results; the first writes them
    return

  data = f"{args.dataset}, {args.split} split" + (
      f" (its first {args.limit})" if args.limit else "")
  record = dict(runs=history, checkpoint=_shown(args.checkpoint), dataset=args.dataset,
                split=args.split, limit=args.limit, dtype=args.dtype, **run.to_dict())
  link = args.plot and os.path.relpath(
      args.plot, os.path.dirname(os.path.abspath(args.markdown or args.plot)))
  body = report(run, history, data, _shown(args.checkpoint), link)
  title = (f"{data}: accuracy vs prefill FLOPs "
           f"({jax.devices()[0].platform.upper()}, {args.dtype})")
  outputs.publish("evaluate", body, json_path=args.json,
                  json_text=json.dumps(record, indent=1), plot_path=args.plot,
                  draw=lambda path: plot(run, path, title), markdown_path=args.markdown,
                  block=_block_key(args))


if __name__ == "__main__":
  main()
