"""The embedded default model and its p-MoD variant load and answer glyph_vqa questions."""

import pytest

import tokred_jax
from tokred_jax import methods
from tokred_jax.engine import cost
from tokred_jax.eval import evaluate
from tokred_jax.io import checkpoint
from tokred_jax.methods import pmod
from tokred_jax.models.config import ConfigError, from_hf_dict, to_hf_dict
from configs import glyph_llava

NUM_QUESTIONS = 32  # 8 of each type; the full test split is in BENCHMARKS.md


@pytest.fixture(scope="module")
def examples():
  return evaluate.load_examples("glyph_vqa/default", None, "test", NUM_QUESTIONS)


@pytest.mark.parametrize("path,setting,least", [
    (tokred_jax.DEFAULT_CHECKPOINT, "none", 0.9),
    (tokred_jax.PMOD_CHECKPOINT, "pmod", 0.8),
    (tokred_jax.PMOD_QUARTER_CHECKPOINT, "pmod", 0.9)])
def test_embedded_models_answer_test_questions(examples, path, setting, least):
  pipe = tokred_jax.Pipeline.load(path)
  assert pipe.cfg.num_image_tokens == 144 and pipe.cfg.vision.has_cls
  run = evaluate.evaluate(pipe, examples, [evaluate.Setting(setting)], batch_size=16)
  result, = run.results
  assert result.skipped is None
  assert result.accuracy >= least, result.predictions
  assert set(result.total_by_type.values()) == {NUM_QUESTIONS // 4}


def test_pmod_variant_records_the_ratios_it_was_trained_at():
  cfg, _ = checkpoint.load_checkpoint(tokred_jax.PMOD_CHECKPOINT)
  assert cfg.text.router_layers == glyph_llava.PMOD_LAYERS
  ratios = cfg.text.router_ratios
  assert pmod.mean_kept_ratio(cfg.num_image_tokens, ratios) == pytest.approx(
      glyph_llava.PMOD_RETENTION, abs=0.01)
  assert methods.get("pmod", cfg).find(pmod.Route).ratios == ratios  # the default p-MoD plan
  assert methods.get("pmod", cfg, 0.6).find(pmod.Route).ratios != ratios  # a retention refits
  assert from_hf_dict(to_hf_dict(cfg)).text.router_ratios == ratios
  with pytest.raises(ConfigError, match="one per layer"):
    from_hf_dict(dict(to_hf_dict(cfg), text_config=dict(
        to_hf_dict(cfg)["text_config"], mod_router_ratios=[0.5])))


def test_quarter_variant_keeps_36_tokens_in_every_layer():
  pipe = tokred_jax.Pipeline.load(tokred_jax.PMOD_QUARTER_CHECKPOINT)
  plan = pipe.plan("pmod")
  assert pipe.cfg.text.router_layers == tuple(range(glyph_llava.NUM_LAYERS))
  assert pmod.kept_counts(144, pmod.trained_ratios(plan)) == (36,) * 6
  costs = [cost.plan_cost(pipe.cfg, p, 20, exact=True)
           for p in (plan, pipe.plan("none"))]
  assert costs[0]["equivalent_tokens"] == 36 and costs[1]["equivalent_tokens"] == 144
  assert costs[0]["flops"].llm.total < 0.5 * costs[1]["flops"].llm.total


def test_ablation_schedules_route_the_same_layers_at_the_same_mean():
  from tokred_jax.train import trainer  # pylint: disable=g-import-not-at-top
  plans = {}
  for schedule in ("cosine", "linear", "constant"):
    config = glyph_llava.get_config(f"pmod-{schedule}")
    config.model.checkpoint = tokred_jax.DEFAULT_CHECKPOINT
    cfg = trainer.model_config(config)
    assert cfg.text.router_layers == glyph_llava.PMOD_LAYERS
    plans[schedule] = pmod.trained_ratios(trainer.make_plan(config, cfg))
    assert pmod.mean_kept_ratio(144, plans[schedule]) == pytest.approx(0.5, abs=0.01)
  assert len(set(plans.values())) == 3
  assert len({r for r in plans["constant"] if r is not None}) == 1
  # A schedule that cannot reach the mean with valid ratios says so.
  with pytest.raises(ValueError, match="cannot keep"):
    pmod.fit_mean("constant", 6, (2, 3, 4), 144, 0.5)


def test_a_mean_below_what_layers_2_to_5_reach_routes_every_layer():
  from tokred_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = glyph_llava.get_config("pmod-constant@0.25")
  config.model.checkpoint = tokred_jax.DEFAULT_CHECKPOINT
  cfg = trainer.model_config(config)
  assert cfg.text.router_layers == tuple(range(glyph_llava.NUM_LAYERS))
  ratios = pmod.trained_ratios(trainer.make_plan(config, cfg))
  assert pmod.kept_counts(144, ratios) == (36,) * 6
  assert glyph_llava.get_config("pmod-linear@0.4").model.router_layers == glyph_llava.PMOD_LAYERS
  for bad, match in [("pmod-constant@half", "as a number"), ("instruct@0.25", "unknown"),
                     ("pmod-constant@0", "in \\(0, 1\\]")]:
    with pytest.raises(ValueError, match=match):
      glyph_llava.get_config(bad)
