"""DART against a torch restatement of the official rule: the scorer on its own, and
the method end to end in a small random model (kept set, counts, fast vs reference,
FLOPs, presets)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import faults
from tests.test_reduction import CFG, MID, MODEL, text_logits, xla_prefill_flops
from tokred_jax import methods
from tokred_jax.engine import cost
from tokred_jax.methods import dart
from tokred_jax.methods.base import Recipe
from tokred_jax.models import llava, presets
from tokred_jax.models.config import ConfigError


def official_kept(h, keys, image_pos, text_pos, n_img, n_txt, per_pivot, weight, eps=1e-5):
  """One sample, restating `get_retained_image_token` (ZichenWen1/DART,
  llava/model/language_model/modeling_llama_self.py) step by step, in float64.

  h: [T, D] layer K−1 output; keys: [T, K, h] its rotated keys; image_pos / text_pos:
  sequence positions of the image tokens and of the text after the image; per_pivot:
  TOKEN_TOPK, or one quota per pivot (our extension for counts the official code cannot
  produce: the remainder goes to the first pivots); weight: the final RMSNorm's scale.
  Two deliberate deviations, both documented in tokred_jax/methods/dart.py: pivots are
  visited in the order they are listed (image, then text, each by descending norm)
  instead of a Python set's hash order, and ties go to the lower position instead of
  torch.topk's arbitrary choice.
  """
  h = torch.as_tensor(np.asarray(h, np.float64))
  keys = torch.as_tensor(np.asarray(keys, np.float64))
  # The model's final norm on the layer's output, learned scale included.
  normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * torch.as_tensor(weight)
  flat = keys.reshape(keys.shape[0], -1)  # all heads in one vector per token
  img, txt = torch.as_tensor(image_pos), torch.as_tensor(text_pos)
  by_norm = lambda pos: pos[torch.sort(-torch.norm(flat[pos], p=1, dim=-1), stable=True)
                            .indices].tolist()
  image_pivots = by_norm(img)[:n_img]
  text_pivots = by_norm(txt)[:n_txt] if n_txt else []
  kept = set(image_pivots + text_pivots)
  pool = [p for p in image_pos if p not in image_pivots]
  pivots = image_pivots + text_pivots
  quotas = [per_pivot] * len(pivots) if isinstance(per_pivot, int) else per_pivot
  for pivot, quota in zip(pivots, quotas):
    cos = F.cosine_similarity(normed[pivot][None], normed[pool], dim=-1)
    least = torch.sort(cos, stable=True).indices[:quota].tolist()
    picked = [pool[i] for i in least]
    kept.update(picked)
    pool = [p for p in pool if p not in picked]
  kept.difference_update(text_pivots)
  return sorted(kept)


def _sample(rng, b, dim, kv, hd, n_vis, dup=0):
  """Rows laid out [left pad][system][visual, with holes][question][right pad].

  Returns x, k, visual, valid and, per row, (image positions, text-after positions).
  `dup` visual tokens copy another visual token's x and k exactly (ties).
  """
  pads = rng.integers(0, 4, size=b)
  sys_len, q_len, holes = 3, 6, 3
  t = 4 + sys_len + n_vis + q_len + 3
  x = rng.normal(size=(b, t, dim)).astype(np.float32)
  k = rng.normal(size=(b, t, kv, hd)).astype(np.float32)
  visual = np.zeros((b, t), bool)
  valid = np.zeros((b, t), bool)
  layout = []
  for i, pad in enumerate(pads):
    start = pad + sys_len
    end = start + n_vis
    valid[i, pad:end + q_len] = True
    visual[i, start:end] = True
    hole = rng.choice(np.arange(start, end), size=holes, replace=False)
    valid[i, hole] = False
    vis = [p for p in range(start, end) if valid[i, p]]
    for src, dst in rng.choice(vis, size=(dup, 2), replace=False):
      x[i, dst], k[i, dst] = x[i, src], k[i, src]
    layout.append((vis, list(range(end, end + q_len))))
  return x, k, visual, valid, layout


def _kept_sets(index, kept):
  return [sorted(np.asarray(index[i])[np.asarray(kept[i])].tolist())
          for i in range(index.shape[0])]


@pytest.mark.parametrize("seed,n_img,n_txt,budget,dup", [
    (0, 4, 4, 16, 0), (1, 4, 4, 24, 4), (2, 2, 3, 10, 6), (3, 1, 0, 7, 3), (4, 0, 2, 12, 2)])
def test_kept_set_matches_the_official_rule(seed, n_img, n_txt, budget, dup):
  rng = np.random.default_rng(seed)
  b, n_vis = 3, 40
  x, k, visual, valid, layout = _sample(rng, b, dim=16, kv=2, hd=4, n_vis=n_vis, dup=dup)
  weight = rng.normal(size=16).astype(np.float32)
  count = dart.official_keep_count(budget, n_img, n_txt)
  per_pivot = budget // (n_img + n_txt)
  kw = dict(num_image_pivots=n_img, num_text_pivots=n_txt, norm_scale=jnp.asarray(weight))
  index, kept = dart.duplication_keep(x, k, visual, valid, capacity=count + 5, count=count,
                                      **kw)
  want = [official_kept(x[i], k[i], *layout[i], n_img, n_txt, per_pivot, weight)
          for i in range(b)]
  assert all(len(w) == count for w in want)
  assert _kept_sets(index, kept) == want
  # What a generic pruning stage does with the scores (lax.top_k) gives the same set.
  scores = dart.duplication_scores(x, k, visual, valid, count, **kw)
  top = np.asarray(jax.lax.top_k(scores, count)[1])
  assert [sorted(r.tolist()) for r in top] == want


def test_duplicates_of_a_pivot_go_first():
  # One image pivot (largest key norm) at slot 0; slots 1-3 point the same way, slots
  # 4-7 at growing angles from it. Keeping 1 + 3 keeps the pivot and the farthest three.
  angles = np.array([0, 0, 0, 0, 20, 60, 100, 170]) * np.pi / 180
  x = np.stack([np.cos(angles), np.sin(angles)], -1)[None].astype(np.float32)
  x[0, 1:4] *= np.array([[0.5], [2.0], [3.0]], np.float32)  # scale does not hide duplicates
  k = np.ones((1, 8, 1, 2), np.float32)
  k[0, 0] = 5.0
  visual = valid = np.ones((1, 8), bool)
  index, kept = dart.duplication_keep(x, k, visual, valid, capacity=4, num_image_pivots=1,
                                      num_text_pivots=0)
  assert _kept_sets(index, kept) == [[0, 5, 6, 7]]
  # A text pivot's duplicates go too, and the text pivot itself is not counted.
  x2 = np.concatenate([x, x[:, 5:6]], axis=1)  # slot 8: text, same direction as slot 5
  k2 = np.concatenate([k, np.ones((1, 1, 1, 2), np.float32)], axis=1)
  vis2 = np.array([[True] * 8 + [False]])
  index, kept = dart.duplication_keep(x2, k2, vis2, np.ones((1, 9), bool), capacity=3,
                                      num_image_pivots=0, num_text_pivots=1)
  # Least like slot 5 (60°): slot 7 (170°), then 0-3 (0°, tied: lower slots first).
  assert _kept_sets(index, kept) == [[0, 1, 7]]


def test_invalid_slots_do_not_matter():
  rng = np.random.default_rng(7)
  x, k, visual, valid, _ = _sample(rng, 3, dim=16, kv=2, hd=4, n_vis=30, dup=2)
  base = dart.duplication_scores(x, k, visual, valid, 13)
  for fill in (np.nan, 1e30, -1e30):
    xf = np.where(valid[..., None], x, fill).astype(np.float32)
    kf = np.where(valid[..., None, None], k, fill).astype(np.float32)
    np.testing.assert_array_equal(dart.duplication_scores(xf, kf, visual, valid, 13), base)
  base = np.asarray(base)
  assert np.all(np.isneginf(base[~(visual & valid)]))
  assert np.all(np.isfinite(base[visual & valid]))


def test_traced_counts_compile_once_and_keep_exactly_count():
  rng = np.random.default_rng(3)
  x, k, visual, valid, _ = _sample(rng, 3, dim=16, kv=2, hd=4, n_vis=30)
  traces = []

  @jax.jit
  def keep(count):
    traces.append(1)
    return dart.duplication_keep(x, k, visual, valid, capacity=20, count=count)

  # Counts of any form, one per row: below the image pivots, not P_img + P·m, capacity.
  for count in ([2, 2, 2], [9, 13, 20], [0, 5, 17]):
    index, kept = keep(jnp.asarray(count, jnp.int32))
    np.testing.assert_array_equal(np.sum(kept, 1), count)
  assert len(traces) == 1
  # Fewer than the image pivots: the top ones by key norm.
  norms = np.abs(k).sum((2, 3))
  index, kept = keep(jnp.full(3, 2, jnp.int32))
  for i in range(3):
    live = np.flatnonzero(visual[i] & valid[i])
    top2 = sorted(live[np.argsort(-norms[i, live], kind="stable")[:2]].tolist())
    assert _kept_sets(index, kept)[i] == top2


def test_official_keep_counts():
  assert [dart.official_keep_count(n) for n in sorted(dart.DART_BUDGETS)] == [68, 132, 196]
  assert dart.official_keep_count(10, 2, 3) == 2 + 5 * 2
  for budget, ratio in dart.DART_BUDGETS.items():
    assert round(1 - budget / dart.DART_VISUAL_TOKENS, 3) == ratio


@pytest.mark.parametrize("case,call,match", [
    ("num_image_pivots=-1",
     lambda a: dart.duplication_scores(*a, 4, num_image_pivots=-1), "num_image_pivots"),
    ("num_text_pivots=2.0",
     lambda a: dart.duplication_scores(*a, 4, num_text_pivots=2.0), "num_text_pivots"),
    ("no pivots at all",
     lambda a: dart.duplication_scores(*a, 4, num_image_pivots=0, num_text_pivots=0),
     "at least one pivot"),
    ("count=-1", lambda a: dart.duplication_scores(*a, -1), "count"),
    ("norm_scale of the wrong width",
     lambda a: dart.duplication_scores(*a, 4, norm_scale=jnp.ones(3)), "norm_scale"),
    ("keys of another length",
     lambda a: dart.duplication_scores(a[0], a[1][:, :-1], a[2], a[3], 4), "keys"),
    ("budget=True", lambda a: dart.official_keep_count(True), "budget"),
])
def test_bad_static_arguments(case, call, match):
  rng = np.random.default_rng(0)
  x, k, visual, valid, _ = _sample(rng, 2, dim=8, kv=1, hd=4, n_vis=12)
  with pytest.raises(ConfigError, match=match) as e:
    call((x, k, visual, valid))
  faults.record("methods.dart.duplication_scores", case, str(e.value), before="compile")


# --- The method in the model ------------------------------------------------------------

@pytest.fixture(scope="module")
def params():
  p = llava.init_params(CFG, jax.random.PRNGKey(0))
  p = jax.tree_util.tree_map(lambda a: a * 3 if a.ndim > 1 else a, p)
  # A final-norm scale far from ones, so that reading it (or not) shows in the kept set.
  scale = jax.random.uniform(jax.random.PRNGKey(1), (CFG.text.hidden_size,), minval=0.1,
                             maxval=3.0)
  return {**p, "llm": {**p["llm"], "final_norm": {"scale": scale}}}


def make_batch(plan, text_lengths=(5, 11), after=6, bucket=96, seed=0):
  """Left-padded prompts: `n` system tokens, the image slots, `after` question tokens."""
  rng = np.random.default_rng(seed)
  b = len(text_lengths)
  ids = np.zeros((b, bucket), np.int32)
  mask = np.zeros((b, bucket), bool)
  for i, n in enumerate(text_lengths):
    row = np.concatenate([rng.integers(3, 120, n), np.full(plan.num_visual, 127),
                          rng.integers(3, 120, after)])
    ids[i, bucket - len(row):] = row
    mask[i, bucket - len(row):] = True
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
  pixels = rng.normal(size=(b, 112, 112, 3)).astype(np.float32)
  return dict(input_ids=ids, attention_mask=mask, positions=pos, pixel_values=pixels)


def forward(params, batch, plan):
  return MODEL.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                     batch["attention_mask"], batch["positions"], plan=plan,
                     counts=plan.counts(), return_aux=True)


def plain_layers(params, batch, k):
  """The plain model's output of layer k−1 f32[B, T, D] and that layer's rotated keys
  f32[B, T, K, h], from layers 0..k−1 with no plan."""
  def run(m, ids, pixels, mask, pos):
    r = m.run()
    visual = m.visual_tokens(m.tower(pixels, r), r)
    stream = m.splice(ids, visual, mask, pos)
    r.num_visual = r.visual_slots = visual.valid.shape[1]
    stream, caches, _ = m.run_layers(stream, r, 0, k)
    return stream.x, caches[-1][0].k
  return MODEL.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                     batch["attention_mask"], batch["positions"], method=run)


def quotas(count, n_img, n_txt):
  """Each pivot's picks for `count` kept tokens (the remainder to the first pivots)."""
  rest, pivots = count - n_img, n_img + n_txt
  return [rest // pivots + (p < rest % pivots) for p in range(pivots)]


@pytest.mark.parametrize("kw", [dict(budget=16), dict(retention=0.5),
                                dict(budget=12, k=3, num_image_pivots=2, num_text_pivots=3)])
def test_kept_set_in_the_model_is_the_official_rule(params, kw):
  recipe = methods.get("dart", CFG, **kw)
  plan = methods.make_plan(recipe, CFG)
  k = kw.get("k", dart.DART_K)
  stage = recipe.find(dart.Duplication)
  n_img, n_txt = stage.num_image_pivots, stage.num_text_pivots
  count = plan.exact.llm_visual[k]
  assert plan.score_layers == (k - 1,) and plan.exact.llm_visual[:k] == (64,) * k
  batch = make_batch(plan)
  _, aux = forward(params, batch, plan)
  x, keys = (np.asarray(a) for a in plain_layers(params, batch, k))
  weight = np.array(params["llm"]["final_norm"]["scale"])
  live = np.asarray(aux["live"])
  for i in range(2):
    image_pos = np.flatnonzero(batch["input_ids"][i] == CFG.image_token_id).tolist()
    text_pos = list(range(image_pos[-1] + 1, batch["input_ids"].shape[1]))
    want = official_kept(x[i], keys[i], image_pos, text_pos, n_img, n_txt,
                         quotas(count, n_img, n_txt), weight)
    assert len(want) == count
    assert np.flatnonzero(live[k, i]).tolist() == [image_pos.index(p) for p in want]
  # The counts every layer processed, per sample, are the plan's.
  np.testing.assert_array_equal(np.asarray(aux["visual_per_layer"]).T,
                                [plan.visual_per_layer] * 2)
  if "budget" in kw:
    assert count == dart.official_keep_count(kw["budget"], n_img, n_txt)


def test_the_final_norm_scale_matters(params):
  """Without the learned scale the kept set differs (so the scorer reads it)."""
  plan = methods.make_plan(methods.get("dart", CFG, budget=16), CFG)
  batch = make_batch(plan)
  ones = {**params, "llm": {**params["llm"], "final_norm": {"scale": jnp.ones(64)}}}
  live = [np.asarray(forward(p, batch, plan)[1]["live"][2]) for p in (params, ones)]
  assert not np.array_equal(*live)


def test_fast_equals_reference_on_text(params):
  fast = methods.make_plan(methods.get("dart", CFG, 0.5), CFG)
  ref = methods.make_plan(methods.get("dart", CFG, 0.5, mode="reference"), CFG)
  batch = make_batch(fast)
  (lf, af), (lr, ar) = forward(params, batch, fast), forward(params, batch, ref)
  np.testing.assert_array_equal(np.asarray(af["live"]), np.asarray(ar["live"]))
  np.testing.assert_allclose(text_logits(lf, batch), text_logits(lr, batch), atol=2e-5,
                             rtol=1e-5)


def test_counts_are_traced_into_the_scorer(params):
  """Keeping 20 or 21 tokens (one bucket) is one plan and one compiled program, and
  each run keeps its own count."""
  a = methods.make_plan(methods.get("dart", CFG, budget=16), CFG)
  b = methods.make_plan(methods.get("dart", CFG, 0.5), CFG)
  assert a == b and a.exact.llm_visual[2] == 20 and b.exact.llm_visual[2] == 21
  traces = []

  @jax.jit
  def live(counts, batch):
    traces.append(1)
    return MODEL.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                       batch["attention_mask"], batch["positions"], plan=a, counts=counts,
                       return_aux=True)[1]["visual_per_layer"]

  batch = make_batch(a)
  assert np.asarray(live(a.counts(), batch))[2].tolist() == [20, 20]
  assert np.asarray(live(b.counts(), batch))[2].tolist() == [21, 21]
  assert len(traces) == 1


@pytest.mark.parametrize("kw", [dict(budget=64), dict(retention=0.5)])
def test_flops_match_xla_and_fall_as_planned(kw):
  """Analytic matmul FLOPs of the compiled prefill agree with XLA's count within 2%."""
  plan = methods.make_plan(methods.get("dart", MID, **kw), MID)
  xla = xla_prefill_flops(plan)
  analytic = cost.plan_cost(MID, plan, 32)["flops"].total
  assert abs(xla / analytic - 1) < 0.02, (kw, xla, analytic)
  assert analytic < cost.plan_cost(MID, methods.make_plan(Recipe(), MID), 32)["flops"].total
  scorer = plan.find(dart.DuplicationPlan).scorer_flops(MID, 32 + 256)
  assert scorer == 2 * 8 * (32 + 256) * MID.text.hidden_size


def test_presets_keep_the_official_counts_on_llava15_7b():
  cfg = presets.LLAVA15_7B
  for name, kept in (("dart-192", 196), ("dart-128", 132), ("dart-64", 68)):
    plan = methods.make_plan(methods.get(name, cfg), cfg)
    assert plan.exact.llm_visual == (576, 576) + (kept,) * 30, name
    assert plan.score_layers == (1,)
    stage = plan.find(dart.DuplicationPlan)
    assert (stage.num_image_pivots, stage.num_text_pivots) == (4, 4)
  # The default budget is the 128 preset.
  assert methods.get("dart", cfg).stages == methods.get("dart-128", cfg).stages


CONFIG_MISTAKES = {  # as a user writes them -> the call
    'methods.get("dart", cfg, retention=0.5, budget=64)':
        lambda: methods.get("dart", CFG, retention=0.5, budget=64),
    'methods.get("dart", cfg, retention=0.2)': lambda: methods.get("dart", CFG, retention=0.2),
    'methods.get("dart", cfg, budget=128)  # 132 > 64 visual tokens':
        lambda: methods.get("dart", CFG, budget=128),
    'methods.get("dart", cfg, k=8)': lambda: methods.get("dart", CFG, k=8),
    'methods.get("dart", cfg, num_text_pivots=-1)':
        lambda: methods.get("dart", CFG, num_text_pivots=-1),
    "dart.Duplication((1.0,) * 2 + (0.25,) * 6, 0, 0)":
        lambda: methods.make_plan(Recipe((dart.Duplication((1.0,) * 2 + (0.25,) * 6, 0, 0),)),
                                  CFG),
}


@pytest.mark.parametrize("case", CONFIG_MISTAKES)
def test_config_mistakes_are_named(case):
  with pytest.raises(ConfigError) as e:
    CONFIG_MISTAKES[case]()
  faults.record("methods", case, f"ConfigError: {e.value}", before="compile")
