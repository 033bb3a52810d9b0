"""The glyph_vqa_lmms task's functions: the stored prompt as the question, its image, and
tokred_jax's own exact match as the metric."""

from PIL import Image

from tokred_jax.eval import evaluate


def doc_to_visual(doc):
  with Image.open(doc["image"]) as image:
    return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
  del lmms_eval_specific_kwargs
  return doc["prompt"]  # "<image>\nQ", as evaluate hands it to Pipeline.prepare


def process_results(doc, results):
  return {"exact_match": float(evaluate.is_correct(results[0], doc["answer"]))}
