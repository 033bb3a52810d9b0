r"""Answer a question about an image with a LLaVA model, and print what it cost.

  python infer.py                                     # embedded model, sample image
  python infer.py --image=photo.jpg --prompt="What is on the table?"
  python infer.py --checkpoint=/path/to/llava-1.5-7b-hf --config.dtype=bfloat16

Options not given as flags come from --config (default: configs/default.py), each
overridable as --config.NAME=VALUE.
"""

import os

import jax
import numpy as np
from absl import flags

import tokred_jax
from tokred_jax import cli, pipeline, processing, report, sharding, visualize

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = cli.define_config(
    "config", os.path.join(_HERE, "configs", "default.py"), "Inference config file.")
_IMAGE = flags.DEFINE_string("image", None, "Image path (default: the bundled sample).")
_PROMPT = flags.DEFINE_string("prompt", None, "Question about the image.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Hugging Face LLaVA directory (overrides the config).")


def main(argv):
  del argv
  config = _CONFIG.value
  checkpoint = _CHECKPOINT.value or config.checkpoint or tokred_jax.DEFAULT_CHECKPOINT
  image = _IMAGE.value or os.path.join(tokred_jax.DEFAULT_CHECKPOINT, "sample.png")
  prompt = _PROMPT.value or pipeline.default_prompt(checkpoint)
  sampling = tokred_jax.SamplingConfig(config.max_new_tokens, config.temperature, config.top_p)

  if config.get("preset") and not (_CHECKPOINT.value or config.checkpoint):
    raise SystemExit(f"infer.py: the {config.preset!r} preset has no weights here; pass "
                     "--checkpoint=DIR with a Hugging Face LLaVA directory.")
  try:
    pipe = tokred_jax.Pipeline.load(checkpoint, dtype=config.dtype,
                                    mesh_shape=sharding.parse_mesh(config.get("mesh", "")),
                                    template=config.get("template") or None)
    plan = pipe.plan(config.method, config.retention, config.mode)
    batch = pipe.prepare([image], [prompt], sampling.max_new_tokens, plan=plan)
  except ValueError as e:  # bad checkpoint, image or prompt: the message says what to fix
    raise SystemExit(f"infer.py: {e}") from None
  rng = jax.random.PRNGKey(config.seed)
  if config.warmup:
    pipe.generate_tokens(batch, sampling, rng, plan)
  tokens, timings = pipe.generate_tokens(batch, sampling, rng, plan)

  print(f"checkpoint: {checkpoint}\nimage: {image}\nprompt: {prompt}\n"
        f"method: {plan.reduction.name} ({plan.reduction.mode} mode)")
  print(f"answer: {pipe.tokenizer.decode(tokens[0]).strip()}\n")
  if config.plot:
    _, aux = pipe.forward(batch, plan, return_aux=True)
    pixels = np.asarray(processing.preprocess_images([image], pipe.cfg.vision))[0]
    shown = pixels * np.asarray(pipe.cfg.vision.image_std) + np.asarray(pipe.cfg.vision.image_mean)
    visualize.survival_figure(shown, np.asarray(aux["sources"][0]),
                              np.asarray(aux["live"][:, 0]), config.plot,
                              f"{plan.reduction.name} ({plan.reduction.mode})")
    print(f"kept patches per stage: {config.plot}")
  counts = pipe.token_counts(batch, plan, timings.new_tokens)
  print(report.cost_table(counts, pipe.cost(batch, plan, timings.new_tokens), {
      "prefill latency": timings.prefill_s,
      "decode latency per token": timings.decode_s / max(timings.new_tokens, 1)}))


if __name__ == "__main__":
  cli.run(main)
