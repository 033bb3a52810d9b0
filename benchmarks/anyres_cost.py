r"""Analytic cost of LLaVA-NeXT-7B and LLaVA-OneVision-7B at full size, beside the papers.

  python -m benchmarks.anyres_cost          # prints the tables, writes JSON and Markdown

No weights, nothing run: plans (`methods.base.make_plan`) for the published input
buckets, their counts through `engine.cost`, parameter counts from `jax.eval_shape`.

  (a) OneVision-7B video, 32 frames, `--ov-text` text tokens: dense and AIM (aim-74,
      aim-49, aim-25), next to AIM's 99.63 -> 14.76 LLM TFLOPs, and the official FLOPs
      script's convention (the schedule one layer earlier, no newline token, no scorer)
      computed apart, step by step.
  (b) p-MoD on NeXT-7B (Vicuna), PRD routers on layers 8-31: our count (every matmul) and
      p-MoD's (projections and MLP only: the published 39.46 / 21.94 TFLOPs are what that
      count gives for the 2,928 tokens of a square image and ~119 text tokens), and the KV
      cache with and without the text, next to 55.6% / 53.8%.
  (c) Visual tokens and bucket capacities of a few image sizes: the padding each bucket wastes.
  (d) Parameter counts of the presets.
  (e) Scratch memory of AIM's PageRank scorer at the 32-frame prompt's length, from XLA's
      buffer assignment of the compiled program (compiled, never run): the full matrix
      against the query blocks.

The tables replace the `anyres_cost` block of --markdown (text around it is kept) and
go to --json; both are written at the end, each by a rename.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import functools

import jax
import jax.numpy as jnp

from benchmarks import outputs
from tokred_jax import cli, methods
from tokred_jax.engine import cost
from tokred_jax.io import anyres
from tokred_jax.methods import aim, pmod
from tokred_jax.methods.base import make_plan
from tokred_jax.models import llava, llava_next, llava_onevision, presets
from tokred_jax.models.config import LlavaConfig

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = "anyres_cost"
OV, NEXT = "llava-onevision-qwen2-7b-ov", "llava-v1.6-vicuna-7b"
FRAMES = 32
AIM_PRESETS = ("aim-74", "aim-49", "aim-25")
# Published figures (METHODS.md; AIM Table 7, p-MoD Table 1).
AIM_PUBLISHED = {"none": 99.63, "aim-49": 14.76}
PMOD_PUBLISHED = dict(dense=39.46, pmod=21.94, flops_fraction=0.556, kv_fraction=0.538)
# p-MoD states no prompt length; this one reproduces both of its TFLOPs (see the docstring).
PMOD_TEXT = 119
# (height, width): square, 4:3, 16:9, a 1:3 strip, 1:2 portrait, a large square.
IMAGE_SIZES = ((384, 384), (672, 672), (480, 640), (720, 1280), (1080, 1920), (336, 1008),
               (1000, 500), (2304, 2304))
PUBLISHED_PARAMS = {NEXT: 7.06e9, OV: 8.03e9}  # the Hugging Face model cards, rounded
T = 1e12


def _flops_row(cfg: LlavaConfig, plan, text: int) -> dict:
  """A plan's exact and compiled (bucketed) cost, in TFLOPs and MiB."""
  exact, compiled = (cost.plan_cost(cfg, plan, text, exact=e) for e in (True, False))
  f = exact["flops"]
  return dict(visual_into_llm=plan.exact.visual, visual_slots=plan.num_visual,
              equivalent_tokens=round(exact["equivalent_tokens"], 1),
              llm_tflops=f.llm.total / T, llm_tflops_compiled=compiled["flops"].llm.total / T,
              vision_projector_tflops=(f.vision.total + f.projector.total) / T,
              kv_mib=exact["kv_bytes"].total / 2 ** 20, llm_tokens=list(exact["llm_tokens"]))


def stack_tflops(cfg: LlavaConfig, text: int, visual_per_layer, attention: bool = True) -> float:
  """LLM layer-stack TFLOPs with `text` + visual_per_layer[l] tokens in layer l; without
  attention, only the projections and the MLP (no QKᵀ, no probs·V)."""
  return sum(cost.llm_layer_flops(cfg, text + v, None if attention else 0)
             for v in visual_per_layer) / T


def onevision_video(text: int = 100, frames: int = FRAMES) -> dict:
  """(a): rows for dense and the AIM presets, and the official-convention steps."""
  cfg = presets.get(OV)
  packing = llava_onevision.Packing(frames, cfg.vision.grid)
  rows = {}
  for name in ("none",) + AIM_PRESETS:
    plan = make_plan(methods.get(name, cfg), cfg, packing)
    rows[name] = _flops_row(cfg, plan, text) | dict(published=AIM_PUBLISHED.get(name))
  # The official count: the post-merge frames' tokens without the newline, each layer
  # taking the kept count of the layer after it in our schedule (l1, l2 one earlier).
  l1, l2 = aim.default_schedule(cfg.text.num_layers)
  n_layers, per_frame = cfg.text.num_layers, llava_onevision.pooled_grid(cfg.vision.grid) ** 2
  official = {"none": [frames * per_frame] * n_layers}
  steps = {}
  for name in AIM_PRESETS:
    plan = make_plan(methods.get(name, cfg), cfg, packing)
    n_v = plan.exact.visual - 1  # the newline
    ours = plan.exact.llm_visual
    earlier = aim.kept_counts(n_v, aim.layer_ratios(n_layers, l1 - 1, l2 - 1))
    official[name] = list(earlier)
    steps[name] = [
        ("ours (plan_cost, PageRank scorer included)", rows[name]["llm_tflops"]),
        ("without the scorer", stack_tflops(cfg, text, ours)),
        ("without the newline token", stack_tflops(
            cfg, text, aim.kept_counts(n_v, aim.layer_ratios(n_layers, l1, l2)))),
        ("schedule one layer earlier (official)", stack_tflops(cfg, text, earlier))]
  convention = {name: dict(visual_per_layer=v, llm_tflops=stack_tflops(cfg, text, v),
                           published=AIM_PUBLISHED.get(name))
                for name, v in official.items()}
  return dict(model=OV, frames=frames, text_tokens=text, rows=rows,
              official_convention=convention, steps=steps)


def pagerank_memory(num_tokens: int, model: str = OV) -> dict:
  """(e): temporary bytes of the compiled scorer, full matrix and blocks, for one prompt
  of `num_tokens` at the model's head counts, and the size of one f32[H, T, T] matrix."""
  text = presets.get(model).text
  args = (jax.ShapeDtypeStruct((1, num_tokens, text.num_heads, text.head_dim), jnp.float32),
          jax.ShapeDtypeStruct((1, num_tokens, text.num_kv_heads, text.head_dim), jnp.float32),
          jax.ShapeDtypeStruct((1, num_tokens), jnp.bool_),
          jax.ShapeDtypeStruct((1, num_tokens), jnp.bool_))

  def temp_bytes(block_size):
    scorer = jax.jit(functools.partial(aim.pagerank_scores, block_size=block_size))
    return scorer.lower(*args).compile().memory_analysis().temp_size_in_bytes

  return dict(model=model, tokens=num_tokens, heads=text.num_heads,
              matrix_bytes=text.num_heads * num_tokens ** 2 * 4,
              full_bytes=temp_bytes(num_tokens), block_size=aim.auto_block_size(num_tokens),
              blocked_bytes=temp_bytes(None))


def with_prd_routers(cfg: LlavaConfig) -> LlavaConfig:
  """cfg with p-MoD's PRD routers (shifted cosine, layers 8-31 of 32) and their ratios,
  as a p-MoD checkpoint records them (plans need no weights)."""
  ratios = pmod.prd_cosine(cfg.text.num_layers)
  text = dataclasses.replace(cfg.text, router_layers=pmod.router_layers(ratios),
                             router_ratios=ratios)
  return dataclasses.replace(cfg, text=text)


def next_pmod(text: int = PMOD_TEXT, sizes=((672, 672), (480, 640))) -> dict:
  """(b): dense and p-MoD on NeXT-7B for images of `sizes` (H, W), each in a packing of
  exactly its token count (what the method ideally costs; the compiled program of the
  5-crop bucket runs 2,928 slots)."""
  cfg = with_prd_routers(presets.get(NEXT))
  spec = anyres.AnyresSpec.llava_next()
  cases = []
  for size in sizes:
    packing = llava_next.Packing(anyres.num_crops(size, spec), anyres.num_image_tokens(size, spec),
                                 spec.grid)
    rows = {}
    for name, recipe in (("dense", methods.get("none", cfg)), ("pmod", pmod.build(cfg))):
      plan = make_plan(recipe, cfg, packing)
      row = _flops_row(cfg, plan, text)
      visual = plan.visual_per_layer
      row.update(llm_tflops_linear=stack_tflops(cfg, text, visual, attention=False),
                 kv_visual=sum(visual))
      rows[name] = row
    d, p = rows["dense"], rows["pmod"]
    cases.append(dict(
        image_hw=list(size), crops=packing.crops, visual_tokens=packing.slots, rows=rows,
        flops_fraction=p["llm_tflops"] / d["llm_tflops"],
        flops_fraction_linear=p["llm_tflops_linear"] / d["llm_tflops_linear"],
        kv_fraction=p["kv_mib"] / d["kv_mib"], kv_fraction_visual=p["kv_visual"] / d["kv_visual"]))
  return dict(model=NEXT, text_tokens=text, routed_layers=list(cfg.text.router_layers),
              ratios=list(cfg.text.router_ratios), published=PMOD_PUBLISHED, cases=cases)


def image_tokens(sizes=IMAGE_SIZES) -> list[dict]:
  """(c): per model and image size, crops and tokens against its bucket's capacity."""
  out = []
  for model, spec in ((NEXT, anyres.AnyresSpec.llava_next()),
                      (OV, anyres.AnyresSpec.onevision())):
    for size in sizes:
      bucket = anyres.bucket_for([size], spec)
      crops, tokens = anyres.num_crops(size, spec), anyres.num_image_tokens(size, spec)
      out.append(dict(model=model, image_hw=list(size),
                      grid=list(anyres.grid_shape(size, spec.pinpoints, spec.crop_size)),
                      crops=crops, tokens=tokens, bucket_crops=bucket.num_crops,
                      bucket_capacity=bucket.capacity,
                      padded_tokens=bucket.capacity - tokens))
  return out


def parameter_count(cfg: LlavaConfig) -> dict[str, int]:
  """Parameters by part and in all, from abstract shapes (no memory)."""
  params = jax.eval_shape(lambda: llava.init_params(cfg, jax.random.key(0)))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  return {part: count(tree) for part, tree in params.items()} | dict(total=count(params))


def _f(x, digits=2) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def render(ov: dict, nx: dict, images: list[dict], params: dict, memory: dict) -> str:
  """The Markdown block."""
  lines = [f"(a) {ov['model']}, video of {ov['frames']} frames, {ov['text_tokens']} text "
           "tokens, batch 1. Visual tokens: per frame 729 → 196 (pooling) → the AIM merge, "
           "plus one newline after the video. LLM TFLOPs exact (the plan's exact counts, "
           "PageRank scorer included) and compiled (16-token buckets); KV cache in bfloat16.",
           "", "| method | visual tokens into LLM | equiv. visual tokens | **LLM TFLOPs** | "
           "LLM TFLOPs compiled | published LLM TFLOPs | vision + projector TFLOPs | "
           "KV cache MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in ov["rows"].items():
    lines.append(f"| {name} | {r['visual_into_llm']} | {r['equivalent_tokens']} | "
                 f"**{_f(r['llm_tflops'])}** | {_f(r['llm_tflops_compiled'])} | "
                 f"{_f(r['published'])} | {_f(r['vision_projector_tflops'])} | "
                 f"{_f(r['kv_mib'], 1)} |")
  lines += ["", "The official FLOPs script's convention (no newline token, no scorer, the "
            "schedule one layer earlier), and the steps from our count to it:", "",
            "| method | LLM TFLOPs, official convention | published |", "|---|---:|---:|"]
  lines += [f"| {name} | {_f(r['llm_tflops'])} | {_f(r['published'])} |"
            for name, r in ov["official_convention"].items()]
  lines += ["", "| aim-49, step | LLM TFLOPs |", "|---|---:|"]
  lines += [f"| {step} | {_f(v)} |" for step, v in ov["steps"]["aim-49"]]
  pub = nx["published"]
  lines += ["", f"(b) {nx['model']} with p-MoD's PRD routers (layers "
            f"{nx['routed_layers'][0]}-{nx['routed_layers'][-1]}), {nx['text_tokens']} text "
            "tokens, batch 1, each image in a packing of exactly its visual tokens (base crop, "
            "unpadded tiles, newlines). \"All matmuls\" is our count; \"linear only\" leaves "
            "out QKᵀ and probs·V, as the published figures do. KV: all cached tokens, and the "
            "visual ones only.", "",
            "| image (H×W) | visual tokens | method | **LLM TFLOPs, all matmuls** | LLM "
            "TFLOPs, linear only | published | vision + projector TFLOPs | KV cache MiB |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
  for i, case in enumerate(nx["cases"]):
    h, w = case["image_hw"]
    for name, r in case["rows"].items():
      published = pub[name] if i == 0 else None  # the figures are for the first image
      lines.append(f"| {h}×{w} | {case['visual_tokens']} | {name} | **{_f(r['llm_tflops'])}** "
                   f"| {_f(r['llm_tflops_linear'])} | {_f(published)} | "
                   f"{_f(r['vision_projector_tflops'])} | {_f(r['kv_mib'], 1)} |")
  lines += ["", "| image (H×W) | TFLOPs fraction, all matmuls | linear only | published | "
            "KV fraction, all tokens | visual tokens only | published |",
            "|---|---:|---:|---:|---:|---:|---:|"]
  for i, case in enumerate(nx["cases"]):
    h, w = case["image_hw"]
    flops, kv = (f"{pub[k]:.1%}" if i == 0 else "–" for k in ("flops_fraction", "kv_fraction"))
    lines.append(f"| {h}×{w} | {case['flops_fraction']:.1%} | "
                 f"{case['flops_fraction_linear']:.1%} | {flops} | "
                 f"{case['kv_fraction']:.1%} | {case['kv_fraction_visual']:.1%} | {kv} |")
  lines += ["", "(c) Visual tokens per image and the bucket each goes to (`io.anyres."
            "bucket_for` over `crop_buckets`): crops and packed-token capacity; padded = "
            "empty slots the compiled program still runs.", "",
            "| model | image (H×W) | tile grid | crops | tokens | bucket crops | bucket "
            "capacity | padded tokens |", "|---|---|---|---:|---:|---:|---:|---:|"]
  for r in images:
    (h, w), (gr, gc) = r["image_hw"], r["grid"]
    lines.append(f"| {r['model']} | {h}×{w} | {gr}×{gc} | {r['crops']} | {r['tokens']} | "
                 f"{r['bucket_crops']} | {r['bucket_capacity']} | {r['padded_tokens']} "
                 f"({r['padded_tokens'] / r['bucket_capacity']:.0%}) |")
  lines += ["", "(d) Parameters (`jax.eval_shape` of `models.llava.init_params`):", "",
            "| preset | vision | projector | LLM | image_newline | total | model card |",
            "|---|---:|---:|---:|---:|---:|---:|"]
  for name, p in params.items():
    lines.append(f"| {name} | {p['vision']:,} | {p['projector']:,} | {p['llm']:,} | "
                 f"{p.get('image_newline', 0):,} | {p['total']:,} | "
                 f"{PUBLISHED_PARAMS[name] / 1e9:.2f}B |")
  m, gb = memory, 1e9
  lines += ["", f"(e) AIM's PageRank scorer on one {m['tokens']}-token prompt of {m['model']} "
            f"({m['heads']} heads), compiled on {jax.default_backend().upper()}: XLA's "
            "temporary buffers (`memory_analysis().temp_size_in_bytes`).", "",
            "| one f32[H, T, T] matrix | full matrix path | query blocks | block rows |",
            "|---:|---:|---:|---:|",
            f"| {m['matrix_bytes'] / gb:.2f} GB | {m['full_bytes'] / gb:.2f} GB | "
            f"{m['blocked_bytes'] / gb:.2f} GB | {m['block_size']} |"]
  return "\n".join(lines)


def _parser():
  parser = outputs.ArgumentParser(prog="anyres_cost", description=__doc__.split("\n\n")[1])
  parser.add_argument("--ov-text", type=int, default=100,
                      help="text tokens of the OneVision video prompt (AIM's figure: 100)")
  parser.add_argument("--next-text", type=int, default=PMOD_TEXT,
                      help="text tokens of the NeXT prompt (default: the length that "
                      "reproduces p-MoD's TFLOPs)")
  parser.add_argument("--markdown", default=os.path.join(_ROOT, "BENCHMARKS.md"),
                      help="Markdown file whose anyres_cost block is replaced ('' skips it)")
  parser.add_argument("--json", default=os.path.join(_ROOT, "benchmarks", "anyres_cost.json"),
                      help="JSON file of every figure ('' skips it)")
  return parser


def main(argv: list[str] | None = None):
  args = _parser().parse_args(argv)
  try:
    for flag, value in (("--ov-text", args.ov_text), ("--next-text", args.next_text)):
      if value < 0:
        raise ValueError(f"{flag}={value}: give a count of text tokens >= 0.")
    if args.json:
      outputs.check_output("--json", args.json, (".json",))
    if args.markdown:
      outputs.check_block("--markdown", args.markdown, BLOCK)
  except ValueError as e:
    raise SystemExit(f"anyres_cost: {cli.one_line(e)}") from None
  ov, nx, images = onevision_video(args.ov_text), next_pmod(args.next_text), image_tokens()
  params = {name: parameter_count(presets.get(name)) for name in (NEXT, OV)}
  memory = pagerank_memory(ov["rows"]["none"]["visual_into_llm"] + args.ov_text)
  command = " ".join(["python -m benchmarks.anyres_cost"]
                     + (sys.argv[1:] if argv is None else argv))
  body = f"Command: `{command}`\n\n" + render(ov, nx, images, params, memory)
  results = dict(onevision_video=ov, next_pmod=nx, image_tokens=images, parameters=params,
                 pagerank_memory=memory)
  outputs.publish("anyres_cost", body, json_path=args.json,
                  json_text=json.dumps(results, indent=1) + "\n",
                  markdown_path=args.markdown, block=BLOCK)


if __name__ == "__main__":
  main()
