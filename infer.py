r"""Answer a question about an image with a LLaVA model, and print what it cost.

  python infer.py                                     # embedded model, sample image
  python infer.py --image=photo.jpg --prompt="What is on the table?"
  python infer.py --checkpoint=/path/to/llava-1.5-7b-hf --config.dtype=bfloat16
  python infer.py --config.method=aim --config.budget=0.5   # AIM at half the dense FLOPs
  python infer.py --config.method=tome+fastv --config.budget=0.3   # a composed recipe
  python infer.py --checkpoint=/path/to/llava-onevision-qwen2-7b-ov-hf \
      --video=clip.mp4 --config.method=aim-49 --prompt="What happens?"   # 32 frames
  python infer.py --checkpoint=/path/to/llava-v1.6-vicuna-7b-hf --image=a.jpg,b.jpg

Options not given as flags come from --config (default: configs/default.py), each
overridable as --config.NAME=VALUE. Every option, the image and the prompt are checked
before the weights are read.

Run on every host of a pod slice (--distributed=auto, or --coordinator_address,
--num_processes and --process_id), each host answers on a copy of the model over its
own devices (--config.mesh splits it there) and process 0 prints and plots.
"""

import contextlib
import math
import os

import jax
import numpy as np
from absl import flags
from matplotlib.figure import Figure

import tokred_jax
from tokred_jax import cli, methods
from tokred_jax.core import distributed, sharding
from tokred_jax.core.suggest import closest
from tokred_jax.engine import pipeline, report
from tokred_jax.eval import visualize

_HERE = os.path.dirname(os.path.abspath(__file__))


def _define_flags():
  """The command line; only when run as a script, so tests can import `infer` in a
  process that also holds other entry points' flags (train.py's --config)."""
  cli.define_config("config", os.path.join(_HERE, "configs", "default.py"),
                    "Inference config file.")
  flags.DEFINE_string("image", None, "Image path (default: the bundled sample); several, "
                      "comma-separated, for a LLaVA-NeXT or OneVision checkpoint.")
  flags.DEFINE_string("video", None, "Video file for a LLaVA-OneVision checkpoint "
                      "(--config.num_frames sampled uniformly), instead of an image.")
  flags.DEFINE_string("prompt", None, "Question about the image (default: the one stored "
                      "beside the checkpoint's sample image).")
  flags.DEFINE_string("checkpoint", None,
                      "Hugging Face LLaVA directory (overrides the config).")
  cli.define_distributed_flags()


def check_output(path: str, option: str):
  """Refuses a file the run could not write at its end: a missing folder, a directory, a
  format matplotlib cannot save, no write permission. Leaves an existing file as it is."""
  formats = Figure().canvas.get_supported_filetypes()
  extension = os.path.splitext(path)[1].lower().lstrip(".")
  if os.path.isdir(path):
    raise ValueError(f"{option}={path} is a directory; name a .png file.")
  if extension not in formats:
    raise ValueError(f"{option}={path}: name a .png file (matplotlib writes "
                     f"{', '.join(sorted(formats))}).")
  folder = os.path.dirname(path) or "."
  if not os.path.isdir(folder):
    raise ValueError(f"{option}={path}: the folder {folder} does not exist; create it "
                     "or choose another path.")
  existed = os.path.exists(path)
  try:
    with open(path, "ab"):  # Appends nothing: an existing file keeps its bytes.
      pass
  except OSError as e:
    raise ValueError(f"{option}={path} cannot be written ({e.strerror}); choose another "
                     "path.") from None
  if not existed:
    os.remove(path)


def _check_method(name: str):
  """An unknown method name (or part of a composed one), with the nearest suggested."""
  names = methods.METHODS + tuple(methods.PRESETS)
  if "+" not in name:
    if name not in names:
      raise ValueError(f"--config.method={name!r} is not a method"
                       f"{closest(name, names)}; choose from {', '.join(names)}.")
    return
  parts = names + tuple(methods.PARTS)
  for part in name.split("+"):
    if part not in parts:
      raise ValueError(f"--config.method={name!r}: {part!r} is not a method"
                       f"{closest(part, parts)}; join methods, presets and the parts "
                       f"{', '.join(methods.PARTS)} with '+'.")


def _solve_budget(pipe, config, prepare):
  """The budget's solution at this prompt's text length and input bucket (None without
  a budget)."""
  if config.get("budget") is None:
    return None
  if config.retention is not None:
    raise ValueError("give --config.retention or --config.budget, not both: the budget sets "
                     "the retention.")
  dense = prepare("none")
  plan = pipe.batch_plan(dense, "none")
  text = int(dense["attention_mask"][0].sum()) - plan.num_visual
  return pipe.solve(config.method, config.budget, config.get("budget_measure", "flops"), text,
                    config.mode, packing=plan.packing, **_options(config))


def _options(config) -> dict:
  """The method's builder options (`config.options`; per part for a composed recipe)."""
  options = config.get("options")
  return {} if options is None else options.to_dict()


def infer(config, checkpoint=None, image=None, prompt=None, video=None):
  """Answers `prompt` about `image` (several comma-separated, or a `video`) with the
  config's model and method and prints the answer and its cost. Checks everything
  (options, inputs, prompt, mesh, output path) before the weights are read; raises
  ValueError for any of them."""
  if config.get("preset") and not (checkpoint or config.checkpoint):
    raise ValueError(f"the {config.preset!r} preset has no weights here; pass "
                     "--checkpoint=DIR with a Hugging Face LLaVA directory.")
  checkpoint = checkpoint or config.checkpoint or tokred_jax.DEFAULT_CHECKPOINT
  image = image or os.path.join(tokred_jax.DEFAULT_CHECKPOINT, "sample.png")
  if prompt is None:
    prompt = pipeline.default_prompt(checkpoint)
  elif not prompt.strip():
    raise ValueError("--prompt is empty; ask a question about the image, or leave --prompt "
                     "out for the checkpoint's sample question.")
  sampling = tokred_jax.SamplingConfig(config.max_new_tokens, config.temperature,
                                       config.top_p)
  _check_method(config.method)
  if config.plot:
    check_output(config.plot, "--config.plot")
  pipe = tokred_jax.Pipeline.load(checkpoint, dtype=config.dtype, weights=False,
                                  mesh_shape=sharding.parse_mesh(config.get("mesh", "")),
                                  template=config.get("template") or None)
  images = image.split(",")
  if pipe.anyres and config.plot:
    raise ValueError("--config.plot draws the kept patches of one-crop (LLaVA-1.5) models; "
                     "leave it out for this anyres checkpoint.")
  if not pipe.anyres and (len(images) > 1 or video):
    raise ValueError(f"this {pipe.cfg.arch} checkpoint takes one image per prompt; give one "
                     "--image (several images and videos need LLaVA-NeXT / OneVision).")
  inputs = dict(videos=[video], images=None) if video else dict(
      images=[images if len(images) > 1 else images[0]])
  prepare = lambda plan: pipe.prepare(prompts=[prompt], max_new_tokens=sampling.max_new_tokens,
                                      plan=plan, num_frames=config.num_frames,
                                      **inputs)
  solution = _solve_budget(pipe, config, prepare)
  method = solution.plan if solution else pipe.recipe(config.method, config.retention,
                                                      config.mode, **_options(config))
  batch = prepare(method)
  plan = pipe.batch_plan(batch, method)
  # A mesh splits the batch over data x fsdp: the one prompt is repeated to fill it.
  copies = 1 if pipe.mesh is None else math.prod(
      pipe.mesh.shape[a] for a in ("data", "fsdp") if a in pipe.mesh.shape)
  run_batch = jax.tree_util.tree_map(lambda v: np.repeat(v, copies, axis=0), batch)

  pipe.load_weights()
  rng = jax.random.PRNGKey(config.seed)
  if config.warmup:
    pipe.generate_tokens(run_batch, sampling, rng, plan)
  tokens, timings = pipe.generate_tokens(run_batch, sampling, rng, plan)

  print(f"checkpoint: {checkpoint}\n{'video' if video else 'image'}: {video or image}\n"
        f"prompt: {prompt}\n"
        f"method: {plan.name} ({plan.mode} mode)")
  if solution:
    print(f"budget: {solution.note}")
  if copies > 1:
    print(f"batch: {copies} copies of the prompt, one per data x fsdp shard; costs are "
          "for one")
  print(f"answer: {pipe.tokenizer.decode(tokens[0]).strip()}\n")
  if config.plot and distributed.is_main():
    _, aux = pipe.forward(run_batch, plan, return_aux=True)
    vision = pipe.cfg.vision
    shown = (batch["pixel_values"][0] * np.asarray(vision.image_std)
             + np.asarray(vision.image_mean))
    visualize.survival_figure(shown, np.asarray(aux["sources"][0]),
                              np.asarray(aux["live"][:, 0]), config.plot,
                              f"{plan.name} ({plan.mode})")
    print(f"kept patches per stage: {config.plot}")
  counts = pipe.token_counts(batch, plan, timings.new_tokens)
  print(report.cost_table(counts, pipe.cost(batch, plan, timings.new_tokens), {
      "prefill latency": timings.prefill_s,
      "decode latency per token": timings.decode_s / max(timings.new_tokens, 1)}))


def main(argv):
  del argv
  values = flags.FLAGS
  with contextlib.ExitStack() as quiet:
    if not distributed.is_main():  # the other hosts compute the same answer silently
      devnull = quiet.enter_context(open(os.devnull, "w", encoding="utf-8"))
      quiet.enter_context(contextlib.redirect_stdout(devnull))
    infer(values.config, values.checkpoint, values.image, values.prompt, values.video)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
