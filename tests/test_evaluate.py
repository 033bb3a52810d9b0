r"""The accuracy-vs-cost evaluation on glyph_vqa's small test split, with a random 96 px
LLaVA (144 visual tokens, the default model's tower shape).

`make_glyph_checkpoint` also builds a development checkpoint:

  python -c "from tests.test_evaluate import make_glyph_checkpoint as m; \
      m('/tmp/glyph-random', vision_layers=4, text_layers=6, width=96)"
"""

import json
import os
import tempfile

import jax
import numpy as np
import pytest

from benchmarks import evaluate as bench
from benchmarks import outputs
from tests import faults
from tokred_jax import methods
from tokred_jax.data import glyph_vqa, glyphs
from tokred_jax.engine import budget
from tokred_jax.engine.pipeline import Pipeline
from tokred_jax.eval import evaluate
from tokred_jax.io import checkpoint, processing
from tokred_jax.methods import aim
from tokred_jax.models import llava
from tokred_jax.models.config import ConfigError, LlavaConfig, TextConfig, VisionConfig

LIMIT = 16
WEIGHT_STD = 0.1  # O(1) activations, so answers differ between prompts


def make_glyph_checkpoint(out_dir: str, vision_layers: int = 3, text_layers: int = 4,
                          width: int = 64, seed: int = 0) -> str:
  """A random-weight LLaVA with the glyph tokenizer: a CLIP-style tower at 96 px with
  8 px patches (12 x 12 = 144 visual tokens), a Llama LLM `width` wide. Norm scales 1,
  biases 0, other weights ~N(0, WEIGHT_STD)."""
  tmp_tok = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
  ids = processing.train_tokenizer(glyphs.corpus(), 512, tmp_tok)
  cfg = LlavaConfig(
      vision=VisionConfig(kind="clip", hidden_size=width // 2, intermediate_size=width,
                          num_layers=vision_layers, num_heads=2, image_size=96,
                          patch_size=8),
      text=TextConfig(kind="llama", vocab_size=512, hidden_size=width,
                      intermediate_size=2 * width, num_layers=text_layers, num_heads=4,
                      num_kv_heads=2, head_dim=width // 4, max_position_embeddings=512,
                      bos_token_id=ids["<s>"], eos_token_id=ids["</s>"]),
      image_token_id=ids["<image>"], pad_token_id=ids["<pad>"])
  # Drawn with numpy on the init's shapes: the model's own init traces a whole forward,
  # whose compile would take most of this file's time budget.
  shapes = jax.eval_shape(lambda: llava.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    fill = {"scale": np.ones, "bias": np.zeros}.get(path[-1].key)
    if fill:
      return fill(leaf.shape, np.float32)
    return (WEIGHT_STD * rng.standard_normal(leaf.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  checkpoint.save_checkpoint(out_dir, cfg, params, tokenizer_json_path=tmp_tok)
  os.remove(tmp_tok)
  return out_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  glyph_vqa.build(path, "small")
  return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_glyph_checkpoint(str(tmp_path_factory.mktemp("glyph_ckpt")))


@pytest.fixture(scope="module")
def pipe(ckpt):
  return Pipeline.load(ckpt)


@pytest.fixture(scope="module")
def examples(data_dir):
  return evaluate.load_examples("glyph_vqa/small", data_dir, limit=LIMIT)


@pytest.fixture(scope="module")
def runs(pipe, examples):
  settings = evaluate.parse_settings("none,random@0.25,pooling@0.25,fastv@0.25")
  # Batches of 6: the last one holds 4 examples and 2 repeats, which must not count.
  return [evaluate.evaluate(pipe, examples, settings, batch_size=6, max_new_tokens=3)
          for _ in range(2)]


def test_normalize_and_score():
  assert evaluate.normalize("  Red.\n") == "red"
  assert evaluate.normalize("YES") == "yes"
  assert evaluate.normalize("3 .") == "3"
  assert evaluate.is_correct(" Blue. ", "blue")
  assert not evaluate.is_correct("blue green", "blue")
  assert not evaluate.is_correct("7", "1")
  assert not evaluate.is_correct("", "no")


def test_examples_in_index_order(examples):
  assert [e.id for e in examples] == [f"test-{i}" for i in range(LIMIT)]
  assert [e.question_type for e in examples] == list(glyphs.QUESTION_TYPES) * (LIMIT // 4)
  assert all(e.image.shape == (96, 96, 3) and e.prompt.startswith("<image>\n")
             for e in examples)


def test_scores_costs_and_determinism(pipe, examples, runs):
  assert pipe.cfg.num_image_tokens == 144
  first, second = runs
  dense, random, pooling, fastv = first.results
  assert fastv.skipped and "FastV" in fastv.skipped and fastv.accuracy is None
  for r in (dense, random, pooling):
    assert r.skipped is None
    assert sum(r.total_by_type.values()) == LIMIT == len(r.predictions)
    assert r.total_by_type == dict.fromkeys(glyphs.QUESTION_TYPES, LIMIT // 4)
    assert 0 <= r.accuracy <= 1 and all(0 <= a <= 1 for a in r.accuracy_by_type.values())
    correct = [evaluate.is_correct(p, e.answer) for p, e in zip(r.predictions, examples)]
    assert r.accuracy == sum(correct) / LIMIT
    assert r.latency_s > 0 and r.flops_compiled >= r.flops
  assert dense.equivalent_visual_tokens == 144
  assert random.equivalent_visual_tokens == pooling.equivalent_visual_tokens == 36
  # The official MustDrop count is MustDrop's alone.
  assert all(r.equivalent_visual_tokens_official is None for r in first.results)
  for r in (random, pooling):
    assert r.flops < 0.6 * dense.flops and r.kv_bytes < 0.6 * dense.kv_bytes
  for a, b in zip(first.results, second.results):
    assert (a.accuracy, a.predictions, a.correct_by_type) == (
        b.accuracy, b.predictions, b.correct_by_type)
  json.dumps(first.to_dict())  # serialisable as is


@pytest.mark.parametrize("spec, match", [
    ("aim@0", "retention must be in"), ("random@1.5", "retention must be in"),
    ("foo", "unknown method"), ("aim@half", "METHOD@FRACTION"),
    ("fastv@0.25:k", "METHOD@FRACTION"),
    ("aim-252@0.5", "preset"), ("none@0.5", "keeps every token"), (" , ", "no settings"),
])
def test_bad_setting_is_rejected_before_model_work(tmp_path, spec, match):
  with pytest.raises(ConfigError, match=match):
    evaluate.parse_settings(spec)
  # The command checks settings before it reads the (here missing) checkpoint or data.
  with pytest.raises(SystemExit, match=match) as e:
    bench.main([f"--checkpoint={tmp_path}/none", f"--data_dir={tmp_path}/none",
                f"--settings={spec}"])
  faults.record("benchmarks.evaluate", f"--settings={spec}", str(e.value.code),
                before="config read")


def test_options_reach_the_method_and_the_label(pipe):
  setting, = evaluate.parse_settings("fastv@0.5:k=1")
  assert setting.options == (("k", 1),) and setting.label == "fastv@0.5:k=1"
  # The default sweep gives FastV k = 1 where its k = 2 cannot reach the level.
  sweep = {s.label for s in evaluate.default_settings(pipe.cfg)}
  assert {"fastv@0.5", "fastv@0.25:k=1", "fastv@0.125:k=1"} <= sweep
  # AIM's schedule as two numeric options.
  default, chosen = (pipe.plan(s.method, s.retention, **dict(s.options)).recipe
                     for s in evaluate.parse_settings("aim@0.25,aim@0.25:l1=0:l2=2"))
  assert chosen == methods.get("aim", pipe.cfg, 0.25, schedule=(0, 2))
  assert chosen.find(aim.PageRank).ratios != default.find(aim.PageRank).ratios


def test_baselines_are_always_in_the_table():
  got = evaluate.with_baselines(evaluate.parse_settings("aim@0.5,aim@0.125,aim-72,none@1"))
  assert [s.label for s in got] == ["none", "aim@0.5", "aim@0.125", "aim-72", "random@0.5",
                                    "random@0.125", "pooling-2x2"]


def test_report_table_and_plot(tmp_path, runs):
  md, png = tmp_path / "BENCH.md", tmp_path / "eval.png"
  md.write_text("# Benchmarks\n\nHand-written text.\n")
  run = runs[0]
  history = [dict(command="python -m benchmarks.evaluate --limit=16", machine="CPU",
                  date="2026-01-01", minutes=0.5)]
  body = bench.report(run, history, "glyph_vqa/small, test split", "/tmp/ckpt", png.name)
  outputs.write_block(str(md), "evaluate glyph_vqa/small", body)
  bench.plot(run, str(png), "title")
  text = md.read_text()
  assert "Hand-written text." in text and "<!-- END evaluate glyph_vqa/small -->" in text
  assert bench.header(glyphs.QUESTION_TYPES) in text
  rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
  assert [row.split(" | ")[0][2:] for row in rows] == ["none", "random", "pooling", "fastv"]
  assert "skipped" in rows[-1] and "| 1.00× |" in rows[0]
  assert f"]({png.name})" in text
  assert png.stat().st_size > 1000


def test_add_runs_only_the_new_rows_and_keeps_the_old(tmp_path, ckpt, data_dir):
  out = {"json": tmp_path / "e.json", "markdown": tmp_path / "B.md", "plot": tmp_path / "e.png"}
  common = [f"--checkpoint={ckpt}", f"--data_dir={data_dir}", "--dataset=glyph_vqa/small",
            "--limit=8", "--batch=4", "--max_new_tokens=3", "--variants=",
            *(f"--{k}={v}" for k, v in out.items())]
  bench.main(common + ["--settings=none"])
  first = json.loads(out["json"].read_text())
  assert [r["label"] for r in first["results"]] == ["none", "random@0.25", "pooling-2x2"]
  # Two rows more, one of them replacing the random row (same label, same predictions).
  bench.main(common + ["--add", "--settings=random@0.25,fastv@0.5"])
  added = json.loads(out["json"].read_text())
  assert [r["label"] for r in added["results"]] == ["none", "pooling-2x2", "random@0.25",
                                                    "fastv@0.5"]
  assert added["results"][0] == first["results"][0]
  assert added["results"][2]["predictions"] == first["results"][1]["predictions"]
  assert [h["command"].split()[-1] for h in added["runs"]] == [
      "--settings=none", "--settings=random@0.25,fastv@0.5"]
  text = out["markdown"].read_text()
  assert "each later one added rows" in text and text.count("| fastv |") == 1
  # A run over other questions, or with nothing to add, is refused before any model work.
  for extra, match in [(["--limit=4"], "limit"), (["--split=validation"], "split"),
                       ([], "needs --settings or --variants")]:
    with pytest.raises(SystemExit, match=match):
      bench.main(common + ["--add", *extra] + (["--settings=none"] if extra else []))
  assert json.loads(out["json"].read_text()) == added  # and leaves the results alone


def test_settings_are_checked_against_the_config_alone(ckpt, data_dir):
  cfg = checkpoint.read_config(ckpt)
  fine = evaluate.parse_settings("none,aim@0.25:l1=0:l2=2,mustdrop-64,random@0.5")
  evaluate.check_settings(cfg, fine)
  assert evaluate.setting_plan(cfg, fine[1]).num_visual < cfg.num_image_tokens
  with pytest.raises(ConfigError, match=r"cannot run mustdrop@0.25 \(.*preset.*\); "
                     r"fastv@0.25:j=1 \(fastv has no option 'j'; its options are k, r\)"):
    evaluate.check_settings(cfg, evaluate.parse_settings("aim@0.25,mustdrop@0.25,"
                                                         "fastv@0.25:j=1"))
  for split, limit, match in [("test", 129, "more than the 128 examples"),
                              ("bogus", None, "has no split 'bogus': Unknown split")]:
    with pytest.raises(ValueError, match=match) as e:
      evaluate.load_examples("glyph_vqa/small", data_dir, split, limit)
    faults.record("evaluate.load_examples", f"split={split!r}, limit={limit} (built copy)",
                  str(e.value), before="weights load")


def test_budget_settings_run_and_plot(tmp_path, pipe, examples):
  """Methods at an equal FLOPs budget: solved at the examples' median prompt length, each
  row's FLOPs (at every prompt's own length) near the budget, in the table and the plot."""
  few = examples[:2]
  settings = evaluate.parse_settings("none,aim@flops=0.8,random@flops=0.8")
  run = evaluate.evaluate(pipe, few, settings, batch_size=2, max_new_tokens=2)
  dense, aim, random = run.results
  text = evaluate.median_text_tokens(pipe, few)
  lengths = [int(pipe.prepare([e.image], [e.prompt], plan=pipe.plan("none"))
                 ["attention_mask"].sum()) - 144 for e in few]
  assert text == int(np.median(lengths))
  for r, method in ((aim, "aim"), (random, "random")):
    assert r.skipped is None and (r.budget, r.measure) == (0.8, "flops")
    assert r.flops / dense.flops == pytest.approx(0.8, rel=0.03)
    solved = budget.solve(pipe.cfg, method, 0.8, num_text_tokens=text)
    assert r.equivalent_visual_tokens == pytest.approx(np.mean(solved.plan.visual_per_layer))
  rows = bench.table(run).splitlines()
  assert rows[3].startswith("| aim | flops=0.8 |") and rows[4].startswith("| random | flops=0.8")
  bench.plot(run, str(tmp_path / "b.png"), "title")
  assert (tmp_path / "b.png").stat().st_size > 1000
  # --budgets sweeps the methods at each budget; a bad one is refused before model work.
  args = bench._parser().parse_args([f"--checkpoint={pipe.path}", "--budgets=0.8,0.6",
                                     "--settings=none", "--data_dir=", "--limit=2",
                                     "--dataset=glyph_vqa/small", "--json=", "--plot=",
                                     "--markdown=", "--variants="])
  args.data_dir = None
  labels = [s.label for s in bench._check_args(args)[0]]
  assert labels == ["none"] + [f"{m}@flops={b}" for b in (0.8, 0.6)
                               for m in evaluate.SWEPT_METHODS]
  for spec, match in [("--budgets=half", "write fractions"), ("--budgets=1.5", r"\(0, 1\]"),
                      ("--budgets=0.5", "not the published sweep")]:
    with pytest.raises(SystemExit, match=match) as e:
      bench.main([f"--checkpoint={tmp_path}/none", spec])
    faults.record("benchmarks.evaluate", spec, str(e.value.code), before="config read")
