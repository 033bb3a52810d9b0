"""p-MoD: schedules, routing semantics, exactness at init, router gradients, caches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.testing import WITH_ROUTERS, make_batch
from tokred_jax import methods
from tokred_jax.engine import cost, generate
from tokred_jax.methods import pmod
from tokred_jax.methods.base import Recipe
from tokred_jax.models import llava, presets
from tokred_jax.models.config import ConfigError

CFG = WITH_ROUTERS
MODEL = llava.Llava(CFG)
PRD = pmod.on_layers(pmod.prd_cosine(8, dense_above=2.0), CFG.text.router_layers)


@pytest.fixture(scope="module")
def params():
  p = llava.init_params(CFG, jax.random.PRNGKey(0))
  p = jax.tree_util.tree_map(lambda a: a * 3 if a.ndim > 1 else a, p)
  # Trained-looking routers: random, so tokens get different weights; small, because the
  # scaled-up hidden states are large and tanh would saturate (no gradient at all).
  keys = jax.random.split(jax.random.PRNGKey(1), 8)
  for l in CFG.text.router_layers:
    p["llm"][f"layers_{l}"]["router"]["kernel"] = jax.random.normal(keys[l], (64, 1)) * 1e-3
  return p


def forward(params, batch, plan, aux=False):
  return MODEL.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                     batch["attention_mask"], batch["positions"], plan=plan,
                     counts=plan.counts(), return_aux=aux)


def test_prd_schedule_matches_the_paper():
  ratios = pmod.prd_cosine(32)
  assert pmod.router_layers(ratios) == tuple(range(8, 32))
  assert pmod.kept_counts(576, ratios) == (576,) * 8 + (
      486, 464, 440, 414, 388, 360, 331, 302, 273, 244, 215, 187, 161, 135, 111, 89) + (86,) * 8
  assert round(pmod.mean_kept_ratio(576, ratios), 4) == 0.5369
  assert round(sum(1 if r is None else r for r in ratios) / 32, 4) == 0.5375


def test_kv_bytes_of_the_7b_prd_plan():
  cfg = presets.get("llava-1.5-7b")
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(
      cfg.text, router_layers=pmod.router_layers(pmod.prd_cosine(32))))
  plan = methods.make_plan(methods.get("pmod", cfg), cfg)
  counts = pmod.kept_counts(576, pmod.prd_cosine(32))
  kv = cost.plan_cost(cfg, plan, 64, exact=True)["kv_bytes"]
  per_token = 2 * 32 * 128 * 2  # k and v, 32 heads of 128, bfloat16
  assert kv.per_layer == tuple((64 + k) * per_token for k in counts)
  dense = cost.kv_cache_bytes(cfg, 64 + 576)
  assert abs(kv.total / dense.total - (64 + 576 * 0.5369) / 640) < 1e-3


def test_all_ratios_one_at_init_is_the_dense_model(params):
  fresh = llava.init_params(CFG, jax.random.PRNGKey(0))  # routers zero: w = 1
  plain = methods.make_plan(Recipe(), CFG)
  routed = methods.make_plan(Recipe(
      (pmod.Route(pmod.on_layers((1.0,) * 8, CFG.text.router_layers)),), "pmod"), CFG)
  batch = make_batch(plain.num_visual)
  mask = batch["attention_mask"]
  dense = np.asarray(forward(fresh, batch, plain))[mask]
  np.testing.assert_array_equal(np.asarray(forward(fresh, batch, routed))[mask], dense)


def test_routing_keeps_the_planned_counts_per_sample(params):
  plan = methods.make_plan(Recipe((pmod.Route(PRD),), "pmod"), CFG)
  batch = make_batch(plan.num_visual)
  _, aux = forward(params, batch, plan, True)
  live = np.asarray(aux["live"])  # [L, B, N_v]
  for l in range(8):
    want = 64 if plan.exact.mod_visual[l] is None else plan.exact.mod_visual[l]
    assert (live[l].sum(-1) == want).all(), l
  deep = plan.exact.mod_visual.index(min(k for k in plan.exact.mod_visual if k is not None))
  assert not np.array_equal(live[deep, 0], live[deep, 1])  # each sample routes its own


def test_router_learns_from_kept_and_skipped_tokens(params):
  """STRing: skipped tokens leave the layer as w·x, so the router's gradient has a
  path through them too. Loss on the last layer's skipped (or kept) visual outputs
  reaches that layer's router through that path alone."""
  plan = methods.make_plan(Recipe((pmod.Route(PRD),), "pmod"), CFG)
  batch = make_batch(plan.num_visual)
  _, aux = forward(params, batch, plan, True)
  routed_last = np.asarray(aux["live"])[-1]  # [B, N_v] visual slots layer 7 processed
  slots = np.cumsum(batch["input_ids"] == 127, 1) - 1
  visual = batch["input_ids"] == 127

  @jax.jit  # one program for both selections
  def router_grad(p, positions):
    def loss(p):
      logits = forward(p, batch, plan)
      return jnp.sum(jnp.where(positions[..., None], logits, 0.0) ** 2)
    return jax.grad(loss)(p)["llm"]["layers_7"]["router"]["kernel"]

  def grad_through(select):
    positions = visual & np.take_along_axis(select, np.maximum(slots, 0), 1)
    return jnp.abs(router_grad(params, positions)).sum()

  assert grad_through(routed_last) > 0
  assert grad_through(~routed_last) > 0


def test_cached_decoding_equals_full_recompute(params):
  plan = methods.make_plan(Recipe((pmod.Route(PRD),), "pmod"), CFG)
  batch = make_batch(plan.num_visual, text_lengths=(4, 9))
  gen = generate.Generator(MODEL, generate.SamplingConfig(max_new_tokens=5), eos_ids=(),
                           plan=plan)
  tokens = gen(params, batch)
  logits, state = MODEL.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                              batch["attention_mask"], batch["positions"], method="prefill",
                              max_new_tokens=5, plan=plan)
  lengths = [c.k.shape[-1] - 5 for c in state.caches]
  text = 96 - plan.num_visual
  assert lengths == [text + (64 if k is None else k) for k in plan.mod_visual]
  ids = np.concatenate([batch["input_ids"], tokens[:, :-1]], 1)
  mask = np.concatenate([batch["attention_mask"], np.ones((2, 4), bool)], 1)
  full = dict(batch, input_ids=ids, attention_mask=mask,
              positions=np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32))
  expected = np.argmax(np.asarray(forward(params, full, plan))[:, 95:], -1)
  np.testing.assert_array_equal(tokens, expected)


def test_add_routers_then_plan(params):
  plain_cfg = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, router_layers=()))
  dense = llava.init_params(plain_cfg, jax.random.PRNGKey(0))
  with pytest.raises(ConfigError, match="no p-MoD routers"):
    methods.get("pmod", plain_cfg)
  cfg, p = pmod.add_routers(plain_cfg, dense, (4, 5, 6, 7))
  assert p["llm"]["layers_4"]["router"]["kernel"].shape == (64, 1)
  assert "router" not in dense["llm"]["layers_4"]
  plan = methods.make_plan(methods.get("pmod", cfg, retention=0.6), cfg)
  assert plan.mod_visual[:4] == (None,) * 4
  with pytest.raises(ConfigError, match="no p-MoD router"):
    methods.make_plan(Recipe((pmod.Route((0.5,) * 8),)), cfg)


@pytest.mark.parametrize("name", pmod.SCHEDULES)
def test_schedules_are_non_increasing_where_they_decay(name):
  ratios = pmod.schedule(name, 32)
  assert len(ratios) == 32 and any(r is not None for r in ratios)
  if name in ("cosine", "linear", "stepped"):
    values = [1.0 if r is None else r for r in ratios]
    assert values == sorted(values, reverse=True)
