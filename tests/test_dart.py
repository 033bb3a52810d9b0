"""DART's duplication scorer against a torch restatement of the official rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import faults
from tokred_jax import dart
from tokred_jax.config import ConfigError


def official_kept(h, keys, image_pos, text_pos, n_img, n_txt, per_pivot, weight, eps=1e-5):
  """One sample, restating `get_retained_image_token` (ZichenWen1/DART,
  llava/model/language_model/modeling_llama_self.py) step by step, in float64.

  h: [T, D] layer K−1 output; keys: [T, K, h] its rotated keys; image_pos / text_pos:
  sequence positions of the image tokens and of the text after the image; per_pivot:
  TOKEN_TOPK; weight: the final RMSNorm's scale. Two deliberate deviations, both
  documented in tokred_jax/dart.py: pivots are visited in the order they are listed
  (image, then text, each by descending norm) instead of a Python set's hash order,
  and ties go to the lower position instead of torch.topk's arbitrary choice.
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
  for pivot in image_pivots + text_pivots:
    cos = F.cosine_similarity(normed[pivot][None], normed[pool], dim=-1)
    least = torch.sort(cos, stable=True).indices[:per_pivot].tolist()
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
  faults.record("dart.duplication_scores", case, str(e.value), before="compile")
