"""Evaluation of accuracy against cost, and pictures of what each stage keeps."""


def lmms_manifest():
  """lmms-eval's entry point for the model "tokred_jax" (tokred_jax/eval/lmms.py). It lives
  here, not there: lmms-eval loads entry points while `lmms_eval.models` is first
  imported, which that module itself does, so it would be found half made."""
  from lmms_eval.models.registry_v2 import ModelManifest  # pylint: disable=g-import-not-at-top
  return ModelManifest("tokred_jax", simple_class_path="tokred_jax.eval.lmms.TokredJax")
