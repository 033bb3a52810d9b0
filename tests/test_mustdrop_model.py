"""MustDrop inside the model: window merge in the tower, the filter in prefill, the
output-aware KV cache, the segmented prefill (one program at learned capacities or on a
capacity ladder, or with host reads between segments): compile counts, host reads, cost,
and the mesh."""

import collections
import math

import jax
import numpy as np
import pytest

from tests import faults
from tokred_jax import methods
from tokred_jax.core import sharding, tokens
from tokred_jax.engine import cost, generate, segmented
from tokred_jax.methods import mustdrop
from tokred_jax.methods.base import SIZINGS, LADDER, Recipe
from tokred_jax.models import llava
from tokred_jax.models.config import ConfigError, LlavaConfig, TextConfig, VisionConfig

# A 9x9 patch grid (3x3 windows tile it); filter layers (1, 3) of a 6-layer LLM.
CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        image_size=126, patch_size=14),
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=6,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                    bos_token_id=1, eos_token_id=2),
    image_token_id=127, pad_token_id=0)
MODEL = llava.Llava(CFG)
N_V = CFG.num_image_tokens  # 81
FILTERS = (1, 3)


@pytest.fixture(scope="module")
def params():
  p = llava.init_params(CFG, jax.random.PRNGKey(0))
  p = jax.tree_util.tree_map(lambda a: a * 3 if a.ndim > 1 else a, p)
  # No position embedding: identical patches then have identical tower states.
  p["vision"]["pos_embed"] = np.zeros_like(p["vision"]["pos_embed"])
  return p


def plan_for(mode="fast", bucket=16, **kw):
  kw = {"filter_layers": FILTERS, **kw}
  return methods.make_plan(methods.get("mustdrop", CFG, mode=mode, token_bucket=bucket,
                                       **kw), CFG)


def images(uniform_windows, seed=0):
  """One image per entry: its first k 3x3-patch windows are one flat colour each, the
  rest noise."""
  rng = np.random.default_rng(seed)
  out = rng.normal(size=(len(uniform_windows), 126, 126, 3)).astype(np.float32)
  for i, k in enumerate(uniform_windows):
    for w in range(k):
      r, c = divmod(w, 3)
      out[i, 42 * r:42 * r + 42, 42 * c:42 * c + 42] = rng.normal(size=3)
  return out


def make_batch(pixels, text_lengths=None, bucket=104, seed=0):
  rng = np.random.default_rng(seed)
  b = len(pixels)
  text_lengths = text_lengths or [5 + 3 * (i % 3) for i in range(b)]
  ids, mask = np.zeros((b, bucket), np.int32), np.zeros((b, bucket), bool)
  for i, n in enumerate(text_lengths):
    row = np.concatenate([rng.integers(3, 120, n), np.full(N_V, 127),
                          rng.integers(3, 120, 4)])
    ids[i, bucket - len(row):], mask[i, bucket - len(row):] = row, True
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
  return dict(input_ids=ids, attention_mask=mask, positions=pos, pixel_values=pixels)


def segments(plan, params, batch, **kw):
  """The segmented prefill of `plan`; with learned capacities its one program's result
  (the first call of a prompt shape runs on the host path to learn them)."""
  run = segmented.SegmentedPrefill(MODEL, plan)
  if plan.sizing == "learned":
    run(params, batch, **kw)
  out = run(params, batch, **kw)
  assert run.trace_counts["segments"] == (plan.sizing != "host")
  return out


def forward(params, batch, plan=None):
  return MODEL.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                     batch["attention_mask"], batch["positions"], plan=plan, return_aux=True)


def test_uniform_window_merges_into_its_mean_with_its_size(params):
  plan = plan_for()
  pixels = images([2, 0])
  # The tower up to the window merge (after layer 0), CLS dropped: the merged patches.
  ts = MODEL.apply({"params": params}, method=lambda m: tokens.drop_first(
      m.tower(pixels, m.run(plan), stop=1)))
  np.testing.assert_array_equal(np.asarray(ts.valid).sum(1), [N_V - 2 * 8, N_V])
  sizes = np.asarray(ts.sizes)
  np.testing.assert_array_equal(sizes[0, :2], [9, 9])  # merged windows come first
  # The merged token is the mean of its members' layer-0 states.
  hidden = MODEL.apply({"params": params}, pixels[:1],
                       method=lambda m, x: m.vision.layers[0](m.vision.embed(x)))[0, 1:]
  members = np.asarray(ts.sources)[0]
  for slot in (0, 1):
    np.testing.assert_allclose(np.asarray(ts.features)[0, slot],
                               np.asarray(hidden)[members == slot].mean(0), atol=1e-4)


def test_keeping_everything_is_the_plain_model_bit_for_bit(params):
  noop = plan_for(threshold=math.inf, gamma=0.0, alpha=0.0)
  batch = make_batch(images([3, 0]))
  plain, _ = forward(params, batch)
  kept, aux = forward(params, batch, noop)
  real = batch["attention_mask"]
  np.testing.assert_array_equal(np.asarray(kept)[real], np.asarray(plain)[real])
  assert (np.asarray(aux["equivalent_tokens"]) == N_V).all()
  out = segmented.SegmentedPrefill(MODEL, noop)(params, batch)
  assert out["capacities"] == (N_V,) * (len(FILTERS) + 1)
  # Split into programs, XLA fuses differently: equal to float32 rounding.
  np.testing.assert_allclose(np.asarray(out["logits"])[real], np.asarray(plain)[real],
                             atol=1e-4, rtol=1e-4)


def test_unattended_visual_tokens_go_unless_key(params):
  """gamma = alpha = 1: no visual token passes either test, so exactly the key set
  (ceil(0.08 n') tokens) survives the first filter."""
  plan = plan_for(gamma=1.0, alpha=1.0)
  batch = make_batch(images([4, 0]))
  _, aux = forward(params, batch, plan)
  counts = np.asarray(aux["visual_per_layer"])
  merged = np.array([N_V - 4 * 8, N_V])
  np.testing.assert_array_equal(counts[0], merged)
  keys = [math.ceil(0.08 * n) for n in merged]
  np.testing.assert_array_equal(counts[FILTERS[0] + 1], keys)
  out = segmented.SegmentedPrefill(MODEL, plan)(params, batch)
  np.testing.assert_array_equal(np.asarray(out["aux"]["visual_per_layer"]), counts)
  # Layers 0-1 run the merged tokens, 2-5 the key set. Filter layer 1 counts its
  # pre-filter tokens as it ran, its post-filter ones (the key set) as the official
  # script does; filter layer 3 keeps the key set, so it counts the same either way.
  for a in (aux, out["aux"]):
    np.testing.assert_allclose(np.asarray(a["equivalent_tokens"]),
                               (2 * merged + 4 * np.array(keys)) / 6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(a["equivalent_tokens_official"]),
                               (merged + 5 * np.array(keys)) / 6, rtol=1e-6)
  # The cost helper reports both from the same counts.
  c = cost.request_cost(CFG, plan, 9, int(out["aux"]["vision_tokens"][0]), counts[:, 0])
  assert c["equivalent_tokens"] == pytest.approx((2 * merged[0] + 4 * keys[0]) / 6)
  assert c["equivalent_tokens_official"] == pytest.approx((merged[0] + 5 * keys[0]) / 6)


def decision_margins(monkeypatch, run, threshold):
  """Runs `run()` (eagerly: the values are concrete) and measures how far each of
  MustDrop's data-dependent decisions sits from its threshold, relatively: every
  window score from the merge threshold, the key set's boundary (the last key's CLS
  score from the next one's), and every filter's drop test on each live non-key visual
  token (|max(log(g / (gamma Σg)), log(m / alpha))|: kept iff one ratio >= 1).
  Returns (run's result, {decision: smallest margin})."""
  margins = collections.defaultdict(lambda: math.inf)
  note = lambda name, value: margins.__setitem__(name, min(margins[name], float(value)))
  window_scores, key_tokens = mustdrop.window_scores, mustdrop.key_tokens
  drop = mustdrop.dual_attention_drop

  def scores(*args, **kwargs):
    out = window_scores(*args, **kwargs)
    note("window merge", np.min(np.abs(np.asarray(out) - threshold)) / threshold)
    return out

  def keys(attention, valid, ratio=mustdrop.KEY_RATIO):
    ranked = np.asarray(attention).mean(1)
    for row, ok in zip(ranked, np.asarray(valid)):
      k, ordered = math.ceil(ratio * ok.sum()), np.sort(row[ok])[::-1]
      if k < len(ordered):
        note("key set", (ordered[k - 1] - ordered[k]) / ordered[k - 1])
    return key_tokens(attention, valid, ratio)

  def dual(q, k, text_query, visual_alive, key_valid, key_token, gamma, alpha,
           text_capacity=None):
    g, m = map(np.asarray, mustdrop.dual_attention_stats(q, k, text_query, visual_alive,
                                                         key_valid, text_capacity))
    live = np.asarray(visual_alive & key_valid)
    for b in range(g.shape[0]):
      total = g[b][live[b]].sum()
      tested = live[b] & ~np.asarray(key_token)[b]
      with np.errstate(divide="ignore"):
        worst = np.maximum(np.log(g[b][tested] / (gamma * total)),
                           np.log(m[b][tested] / alpha))
      note("filter", np.min(np.abs(worst), initial=math.inf))
    return drop(q, k, text_query, visual_alive, key_valid, key_token, gamma, alpha,
                text_capacity)

  monkeypatch.setattr(mustdrop, "window_scores", scores)
  monkeypatch.setattr(mustdrop, "key_tokens", keys)
  monkeypatch.setattr(mustdrop, "dual_attention_drop", dual)
  out = run()
  monkeypatch.undo()
  return out, dict(margins)


@pytest.mark.parametrize("sizing", SIZINGS)
def test_fast_segments_equal_one_masked_program(params, monkeypatch, sizing):
  """Fast mode compacts between segments; the one-program run only masks. Same
  positions, so the same logits wherever both have a token. The two runs' floats
  differ by rounding (XLA fuses split programs differently), so the inputs are ones
  whose every threshold decision sits clearly away from its threshold."""
  plan = plan_for(threshold=0.9, gamma=0.03, alpha=0.05, sizing=sizing)
  batch = make_batch(images([5, 1, 0]))
  (masked, aux), margins = decision_margins(monkeypatch, lambda: forward(params, batch, plan),
                                            threshold=0.9)
  # float32 rounding (~1e-6 relative) cannot move a decision 1% from its threshold.
  assert set(margins) == {"window merge", "key set", "filter"}
  assert min(margins.values()) > 0.01, margins
  # The filters drop some tokens, and differently per sample.
  per_layer = np.asarray(aux["visual_per_layer"])
  assert (per_layer[-1] < per_layer[FILTERS[0]]).all() and len(set(per_layer[-1])) > 1
  out = segments(plan, params, batch)
  np.testing.assert_array_equal(np.asarray(out["aux"]["visual_per_layer"]),
                                np.asarray(aux["visual_per_layer"]))
  np.testing.assert_allclose(np.asarray(out["aux"]["equivalent_tokens"]),
                             np.asarray(aux["equivalent_tokens"]))
  text = batch["attention_mask"] & (batch["input_ids"] != 127)
  np.testing.assert_allclose(np.asarray(out["logits"])[text], np.asarray(masked)[text],
                             atol=1e-4, rtol=1e-4)
  # Reference mode renumbers positions after each filter: the first filter still sees
  # the same stream, so it keeps the same tokens.
  _, ref = forward(params, batch, plan_for("reference", threshold=0.9, gamma=0.03,
                                           alpha=0.05))
  after = FILTERS[0] + 1
  np.testing.assert_array_equal(np.asarray(ref["live"])[after], np.asarray(aux["live"])[after])


def varied_batches():
  """30 images of varied redundancy, 3 per batch: (batch, merged windows per image)."""
  for start in range(0, 30, 3):
    ks = [(start + j) % 10 for j in range(3)]
    yield make_batch(images(ks, seed=start)), ks


def test_varied_images_compile_once_per_bucket(params):
  """Host path: each segment compiles at most once per capacity bucket it meets, and
  samples in one batch keep their own counts."""
  plan = plan_for(bucket=32, threshold=0.9, gamma=0.02, alpha=0.02, sizing="host")
  gen = generate.Generator(MODEL, generate.SamplingConfig(max_new_tokens=2), plan=plan)
  seen, buckets = [], 3  # capacities 32, 64, 81
  for batch, ks in varied_batches():
    out = gen._segmented(params, batch, max_new_tokens=2)
    merged = np.asarray(out["aux"]["vision_tokens"])
    np.testing.assert_array_equal(merged, [N_V - 8 * k for k in ks])
    seen.append(out["capacities"])
  assert len({c[0] for c in seen}) > 1
  for name in ("merge", "segment0", "segment1", "segment2"):
    assert 1 <= gen.trace_counts[name] <= (1 if name == "merge" else buckets), (
        name, gen.trace_counts)
  assert sum(gen.trace_counts.values()) < 30
  tokens = gen(params, make_batch(images([9, 0, 2])))
  assert tokens.shape == (3, 2)


def test_ladder_is_one_program_per_prompt_shape(params):
  """The ladder on the same 30 images: one prefill program for the prompt shape
  whatever the counts, each cut's capacity the smallest ladder step above the batch's
  largest count (so it follows the batch), and one small cache program per pair of
  capacities the decode caches take; the tokens equal the host path's."""
  plan = plan_for(bucket=16, threshold=0.9, gamma=0.02, alpha=0.02, sizing="ladder")
  steps = segmented.ladder_steps(N_V, LADDER, 16)
  assert steps == (16, 32, 48, 81)
  sampling = generate.SamplingConfig(max_new_tokens=2)
  gen = generate.Generator(MODEL, sampling, plan=plan)
  host = generate.Generator(MODEL, sampling, plan=plan_for(
      bucket=16, threshold=0.9, gamma=0.02, alpha=0.02, sizing="host"))
  seen = set()
  for batch, ks in varied_batches():
    out = gen._segmented(params, batch, max_new_tokens=2)
    np.testing.assert_array_equal(np.asarray(out["aux"]["vision_tokens"]),
                                  [N_V - 8 * k for k in ks])
    per_layer = np.asarray(out["aux"]["visual_per_layer"]).max(axis=1)
    largest = [N_V - 8 * min(ks)] + [per_layer[f + 1] for f in FILTERS]
    assert out["capacities"] == tuple(min(s for s in steps if s >= n) for n in largest)
    seen.add(out["capacities"])
  assert len({c[0] for c in seen}) > 1
  assert gen.trace_counts["segments"] == 1
  assert 1 <= gen.trace_counts["segment_caches"] <= len({(c[0], c[-1]) for c in seen})
  batch = make_batch(images([9, 0, 2]))
  np.testing.assert_array_equal(gen(params, batch), host(params, batch))


def test_learned_capacities_grow_only_when_a_prompt_overflows(params):
  """The default path: the first batch of the shape runs on the host path and its
  capacities are learned; a batch whose counts fit runs the one program
  at them; one that overflows is redone exactly and the capacities grow to hold it,
  so the programs compiled are one per growth, and every answer equals the host
  path's."""
  plan = plan_for(bucket=16, threshold=0.9, gamma=0.02, alpha=0.02)
  assert plan.sizing == "learned"
  run = segmented.SegmentedPrefill(MODEL, plan)
  host = segmented.SegmentedPrefill(MODEL, plan_for(bucket=16, threshold=0.9, gamma=0.02,
                                                    alpha=0.02, sizing="host"))
  learned, growths = None, 0
  # The first batch merges the most windows, so later ones overflow what it taught.
  for batch in [make_batch(images([9, 8, 9]))] + [b for b, _ in varied_batches()]:
    out, want = run(params, batch, max_new_tokens=2), host(params, batch, max_new_tokens=2)
    for key in ("vision_tokens", "visual_per_layer"):
      np.testing.assert_array_equal(np.asarray(out["aux"][key]), np.asarray(want["aux"][key]))
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(want["logits"]),
                               atol=1e-4, rtol=1e-4)
    (now,) = run.learned.values()
    if learned is None:
      assert now == want["capacities"]  # learned from the host run
    elif now != learned:  # an overflow: redone on the host path, then grown to hold it
      growths += 1
      assert out["capacities"] == want["capacities"]
      assert now == tuple(map(max, learned, want["capacities"]))
    else:  # it fit: the one program at the learned capacities
      assert out["capacities"] == now
      assert all(c >= n for c, n in zip(now, want["capacities"]))
    learned = now
  assert 0 < growths < 10
  assert 1 <= run.trace_counts["segments"] <= growths + 1


def count_host_reads(monkeypatch):
  """Counts every read of a device array's value on the host (`int(x)`, `float(x)`,
  `jax.device_get(x)` all go through the private `ArrayImpl._value`)."""
  from jax._src import array
  reads, value = [], array.ArrayImpl._value
  monkeypatch.setattr(array.ArrayImpl, "_value", property(
      lambda self: reads.append(self.shape) or value.fget(self)))
  return reads


def test_one_program_prefill_reads_nothing_from_the_host(params, monkeypatch):
  """The learned and the ladder prefill each trace as one program (a host read inside
  would fail on an abstract value, as the host path does), and a prefill with its
  decode caches reads the host once, after that program; the host path reads once per
  cut."""
  batch = make_batch(images([5, 1, 0]))
  run = {sizing: segmented.SegmentedPrefill(MODEL, plan_for(threshold=0.9, gamma=0.03,
                                                          alpha=0.05, sizing=sizing))
         for sizing in SIZINGS}
  for sizing in SIZINGS:  # compiled (and learned), so the counts below see no compile's reads
    run[sizing](params, batch, max_new_tokens=2)
  (learned,) = run["learned"].learned.values()
  for sizing, fixed, switches in (("learned", learned, 0), ("ladder", None, 1 + len(FILTERS))):
    jaxpr = jax.make_jaxpr(lambda p, b: run[sizing].launch(p, b, None, 2, fixed))(params, batch)
    (program,) = jaxpr.jaxpr.eqns  # one jitted program (a switch per cut on the ladder)
    assert program.primitive.name in ("jit", "pjit")
    conds = [e for e in program.params["jaxpr"].jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == switches
  with pytest.raises(jax.errors.ConcretizationTypeError):
    jax.make_jaxpr(lambda p, b: run["host"](p, b, max_new_tokens=2))(params, batch)
  reads = count_host_reads(monkeypatch)
  for sizing, want in (("learned", 1), ("ladder", 1), ("host", 1 + len(FILTERS))):
    reads.clear()
    out = run[sizing](params, batch, max_new_tokens=2)
    assert len(reads) == want and out["state"] is not None, sizing


def test_kv_cache_holds_only_the_kept_tokens(params):
  """Host path, bucket 1, one sample: each layer's cache is exactly text + its kept
  visual tokens (layers before the first filter: the post-merge count; later: the last
  survivors)."""
  plan = plan_for(bucket=1, threshold=0.9, gamma=0.02, alpha=0.02, sizing="host")
  batch = make_batch(images([6]), text_lengths=[9])
  new = 3
  out = segmented.SegmentedPrefill(MODEL, plan)(params, batch, max_new_tokens=new)
  per_layer = np.asarray(out["aux"]["visual_per_layer"])[:, 0]
  text = batch["input_ids"].shape[1] - N_V
  t = CFG.text
  kept = [per_layer[0] if l < FILTERS[0] else per_layer[-1] for l in range(t.num_layers)]
  expected = tuple((text + int(k) + new) * 2 * t.num_kv_heads * t.head_dim * 4 for k in kept)
  got = segmented.kv_cache_bytes(out["state"])
  assert got == expected
  plain = (text + N_V + new) * 2 * t.num_kv_heads * t.head_dim * 4 * t.num_layers
  assert sum(got) / plain <= sum(text + k + new for k in kept) / (
      (text + N_V + new) * t.num_layers) + 1e-9
  assert sum(got) < 0.8 * plain
  # The cost helper predicts the same bytes from the counts the request got.
  c = cost.request_cost(CFG, plan, text, int(out["aux"]["vision_tokens"][0]), per_layer,
                        new_tokens=new, bytes_per_element=4)
  assert c["kv_bytes"].per_layer == got
  full = cost.plan_cost(CFG, methods.make_plan(Recipe(), CFG), text)
  assert c["flops"].llm.total < full["flops"].llm.total
  assert c["flops"].total < full["flops"].total
  assert c["equivalent_tokens"] == pytest.approx(float(out["aux"]["equivalent_tokens"][0]))
  # Decoding runs on the per-layer caches.
  gen = generate.Generator(MODEL, generate.SamplingConfig(max_new_tokens=new), plan=plan)
  assert gen(params, batch).shape == (1, new)
  # Learned capacities (of this very prompt): the same bytes in the one program.
  learned = segments(plan_for(bucket=1, threshold=0.9, gamma=0.02, alpha=0.02), params,
                     batch, max_new_tokens=new)
  assert segmented.kv_cache_bytes(learned["state"]) == expected
  # The ladder: each cache holds text + the ladder step its segment ran at, the same
  # tokens live in it, and the same first logits (to rounding: other widths fuse
  # differently).
  ladder = plan_for(bucket=1, threshold=0.9, gamma=0.02, alpha=0.02, sizing="ladder")
  got = segmented.SegmentedPrefill(MODEL, ladder)(params, batch, max_new_tokens=new)
  steps = segmented.ladder_steps(N_V, LADDER, 1)
  step = lambda n: min(s for s in steps if s >= n)
  assert got["capacities"] == tuple(step(n) for n in [kept[0]] + [per_layer[f + 1]
                                                                  for f in FILTERS])
  slots = [text + step(k) + new for k in kept]
  assert segmented.kv_cache_bytes(got["state"]) == tuple(
      n * 2 * t.num_kv_heads * t.head_dim * 4 for n in slots)
  np.testing.assert_array_equal([np.asarray(v).sum() for v in got["state"].valid],
                                [np.asarray(v).sum() for v in out["state"].valid])
  np.testing.assert_allclose(np.asarray(got["logits"]), np.asarray(out["logits"]),
                             atol=1e-4, rtol=1e-4)


def test_on_a_mesh_equal_one_device(params):
  # The tiny model's attention is near uniform (weights ~ 1/T), so thresholds near 1/T
  # would flip on float32 rounding; gamma = alpha = 1 keeps exactly the key set.
  # Flat windows all score 1 up to rounding, and merged windows are ordered by score
  # (the official order), so several per image could swap places on another layout.
  plan = plan_for(threshold=0.9, gamma=1.0, alpha=1.0)
  batch = make_batch(images([0, 1, 1, 0, 1, 0, 1, 1]))
  logits, aux = forward(params, batch, plan)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  sharded = sharding.shard_params(params, mesh)
  put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))
  fn = jax.jit(lambda p, b: MODEL.apply({"params": p}, b["input_ids"], b["pixel_values"],
                                        b["attention_mask"], b["positions"], plan=plan,
                                        return_aux=True))
  with sharding.activation_sharding(mesh):
    got, got_aux = fn(sharded, {k: put(v) for k, v in batch.items()})
  np.testing.assert_array_equal(np.asarray(got_aux["visual_per_layer"]),
                                np.asarray(aux["visual_per_layer"]))
  text = batch["attention_mask"] & (batch["input_ids"] != 127)
  # As for the plain model on this mesh: float32 rounding of the scaled weights.
  np.testing.assert_allclose(np.asarray(got)[text], np.asarray(logits)[text], atol=1e-3,
                             rtol=1e-3)


@pytest.mark.parametrize("sizing", SIZINGS)
def test_segmented_prefill_on_a_mesh_equal_one_device(params, sizing):
  """The fast path on the 8-device mesh: the one program (at learned capacities or with
  the ladder's switches), or the host reads and cuts between segments, act on sharded
  arrays and give the one-device counts, capacities and logits. Inputs as in the
  one-program mesh test above (no ties that another layout could reorder)."""
  plan = plan_for(threshold=0.9, gamma=1.0, alpha=1.0, sizing=sizing)
  batch = make_batch(images([0, 1, 1, 0, 1, 0, 1, 1]))
  want = segments(plan, params, batch)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  sharded = sharding.shard_params(params, mesh)
  put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))
  with sharding.activation_sharding(mesh):
    got = segments(plan, sharded, {k: put(v) for k, v in batch.items()})
  assert got["capacities"] == want["capacities"]
  for key in ("vision_tokens", "visual_per_layer", "equivalent_tokens"):
    np.testing.assert_array_equal(np.asarray(got["aux"][key]), np.asarray(want["aux"][key]))
  text = batch["attention_mask"] & (batch["input_ids"] != 127)
  np.testing.assert_allclose(np.asarray(got["logits"])[text], np.asarray(want["logits"])[text],
                             atol=1e-3, rtol=1e-3)


def test_presets_and_config_errors():
  red = methods.get("mustdrop-64", CFG).find(mustdrop.KeyFilter)
  assert (red.gamma, red.alpha) == (0.011, 0.01)
  assert methods.get("mustdrop", CFG, gamma=0.3, alpha=0.2).find(mustdrop.KeyFilter).gamma \
      == 0.3
  assert mustdrop.filter_layers_for(32) == (2, 6, 10, 14)
  for case, call, match in [
      ('methods.get("mustdrop", cfg, retention=0.5)',
       lambda: methods.get("mustdrop", CFG, retention=0.5), "retention"),
      ('methods.get("mustdrop", cfg, window=2) on a 9x9 grid',
       lambda: methods.make_plan(methods.get("mustdrop", CFG, window=2), CFG), "divide"),
      ('methods.get("mustdrop", cfg, filter_layers=(5,)) on 6 layers',
       lambda: methods.make_plan(methods.get("mustdrop", CFG, filter_layers=(5,)), CFG),
       "outside"),
      ('methods.get("mustdrop", cfg, sizing="exact")',
       lambda: methods.get("mustdrop", CFG, sizing="exact"), "not one of"),
      ('methods.get("mustdrop", cfg, sizing="ladder", ladder=1.5)',
       lambda: methods.get("mustdrop", CFG, sizing="ladder", ladder=1.5), r"\(0, 1\)")]:
    with pytest.raises(ConfigError, match=match) as e:
      call()
    faults.record("methods / make_plan", case, f"ConfigError: {e.value}", before="compile")


def _step(params, token, state):
  return MODEL.apply({"params": params}, token, state, method="decode")


def _shared_position_step(params, token, state):
  """The decode step as it was before per-layer positions: one position for every
  layer, the whole stack through Decoder.__call__."""
  def run(m):
    x = m.llm.embed_tokens(token[:, None])
    valid = tuple(v.at[:, n].set(True) for v, n in zip(state.valid, state.lengths))
    x, _ = m.llm(x, state.positions[0][:, None], [v[:, None, :] for v in valid],
                 state.caches, state.lengths)
    return m.llm.logits(x)[:, 0]
  return MODEL.apply({"params": params}, method=run)


def _official_decode(params, logits, state, steps):
  """A restatement of the official decode loop at batch size 1: each layer's cache
  holds only its kept tokens (index_select, here: the valid slots taken out), and the
  new token's position in layer l is that cache's length. Returns (greedy tokens [n],
  the logits of each step after the first [n - 1, V])."""
  caches = []
  for c, v, n in zip(state.caches, state.valid, state.lengths):
    keep = np.asarray(v[0, :int(n)])
    c = c.layer_cache(CFG.text.num_kv_heads)
    caches.append((np.asarray(c.k)[:, :int(n)][:, keep], np.asarray(c.v)[:, :int(n)][:, keep]))
  tokens, step_logits = [int(np.argmax(logits[0]))], []
  for _ in range(steps - 1):
    def run(m, token=tokens[-1], caches=tuple(caches)):
      x = m.llm.embed_tokens(np.array([[token]], np.int32))
      grown = []
      for layer, (k, v) in zip(m.llm.layers, caches):
        s = k.shape[1]
        pad = lambda a: np.concatenate([a, np.zeros_like(a[:, :1])], axis=1)
        x, cache, _ = layer(x, np.array([[s]], np.int32), np.ones((1, 1, s + 1), bool),
                            llava.DecodeCache.of(llava.LayerCache(pad(k), pad(v))), s)
        grown.append(cache.layer_cache(CFG.text.num_kv_heads))
      return m.llm.logits(x)[:, 0], grown
    out, grown = MODEL.apply({"params": params}, method=run)
    caches = [(np.asarray(k), np.asarray(v)) for k, v in grown]
    step_logits.append(np.asarray(out)[0])
    tokens.append(int(np.argmax(out[0])))
  return tokens, np.stack(step_logits)


def test_reference_decoding_takes_each_layers_own_position(params):
  """Reference mode decodes as the official loop: layers before the first filter
  continue from the whole prompt, the later ones from the last filter's survivors
  (gamma = alpha = 1: the filters keep exactly the key set, no threshold coincidence)."""
  plan = plan_for("reference", threshold=0.9, gamma=1.0, alpha=1.0)
  batch = make_batch(images([2]), text_lengths=[6])
  new = 5
  gen = generate.Generator(MODEL, generate.SamplingConfig(max_new_tokens=new), eos_ids=(),
                           plan=plan)
  logits, state = gen.prefill(params, batch)
  tokens = gen.decode(params, logits, state)
  want_tokens, want_logits = _official_decode(params, np.asarray(logits), state, new)
  np.testing.assert_array_equal(tokens[0], want_tokens)
  # The positions really differ between layers, as the cache lengths do.
  prompt = int(batch["attention_mask"].sum()) - 2 * 8  # two windows merged
  survivors = prompt - (N_V - 2 * 8) + math.ceil(0.08 * (N_V - 2 * 8))
  positions = [int(p[0]) for p in state.positions]
  assert positions == [prompt] * FILTERS[0] + [survivors] * (6 - FILTERS[0])
  # Step by step, our masked caches give the official logits.
  got, shared = [], []
  for token in want_tokens[:-1]:
    token = np.array([token], np.int32)
    shared.append(np.asarray(_shared_position_step(params, token, state))[0])
    out, state = _step(params, token, state)
    got.append(np.asarray(out)[0])
  # float32 sums in another order (the restatement is plain jnp, ours the model's
  # layers) differ by up to ~1.3e-5 under jax 0.10; a wrong position differs by 1e-3.
  np.testing.assert_allclose(np.stack(got), want_logits, atol=5e-5, rtol=1e-5)
  # The shared position of the old rule gives other logits: the test would see it.
  assert np.max(np.abs(np.stack(shared) - want_logits)) > 1e-3


@pytest.mark.parametrize("name", ["none", "fastv", "mustdrop-fast"])
def test_other_plans_decode_bit_identical_to_one_shared_position(params, name):
  """Every plan but MustDrop's reference mode: each layer gets the prompt's last
  position + 1 (fast MustDrop keeps original positions), and a step equals, bit for
  bit, the whole stack run with that one position."""
  plan = (None if name == "none" else
          methods.make_plan(methods.get("fastv", CFG, retention=0.5), CFG) if name == "fastv"
          else plan_for(threshold=0.9, gamma=1.0, alpha=1.0))
  batch = make_batch(images([3, 0]))
  gen = generate.Generator(MODEL, generate.SamplingConfig(max_new_tokens=3), eos_ids=(),
                           plan=plan)
  logits, state = gen.prefill(params, batch)
  merged = np.array([3 * 8, 0]) if name == "mustdrop-fast" else 0
  want = batch["positions"][:, -1] + 1 - merged
  for p in state.positions:
    np.testing.assert_array_equal(np.asarray(p), want)
  token = np.asarray(jax.numpy.argmax(logits, -1), np.int32)
  step = jax.jit(_step)
  shared = jax.jit(_shared_position_step)
  for _ in range(2):
    out, new_state = step(params, token, state)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(shared(params, token, state)))
    state, token = new_state, np.asarray(jax.numpy.argmax(out, -1), np.int32)
