"""Rematerialisation (`Llava(remat=True)`, `config.model.remat`): the same loss and
gradients as without it, for dense and p-MoD routed layers, the same parameter names,
and a training step that runs with it."""

import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from configs import train_pmod_llava15, train_tiny
from tokred_jax import methods
from tokred_jax.core import sharding
from tokred_jax.methods import pmod
from tokred_jax.methods.base import Recipe
from tokred_jax.models import llava
from tokred_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from tokred_jax.train import setup as train_setup, trainer

# Layer 0 dense, layers 1 and 2 routed (p-MoD calls their attention block and MLP branch
# on the routed tokens only); 16 visual tokens.
CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        image_size=28, patch_size=7),
    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                    num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64,
                    router_layers=(1, 2)),
    image_token_id=63, pad_token_id=0)
PLAN = methods.make_plan(Recipe((pmod.Route((None, 0.5, 0.25)),), "pmod"), CFG)


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  p = jax.tree.map(lambda x: rng.normal(0, 1.0 if x.ndim == 1 else x.shape[0] ** -0.5,
                                        x.shape).astype(np.float32), trainer.param_shapes(CFG))
  # Random routers, so that tokens get different weights; small, so that tanh does not
  # saturate (it would leave the routers no gradient).
  for l in CFG.text.router_layers:
    p["llm"][f"layers_{l}"]["router"]["kernel"] *= 1e-2
  return p


@pytest.fixture(scope="module")
def batch():
  return next(train_setup.synthetic_dataset(CFG, CFG.num_image_tokens, 2, 28, seed=0))


def loss_fn(remat, batch):
  model = llava.Llava(CFG, remat=remat)

  def loss(params):
    logits = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                         batch["attention_mask"], batch["positions"], plan=PLAN,
                         counts=PLAN.counts())
    total, count = trainer.token_loss(logits, batch["labels"], batch["loss_mask"])
    return total / count
  return loss


def remat_ops(jaxpr) -> int:
  """jax.checkpoint regions in a jaxpr (the primitive is "remat2" or "checkpoint")."""
  return sum(e.primitive.name in ("remat2", "checkpoint") for e in jaxpr.jaxpr.eqns)


def value_and_grad(remat, batch):
  return jax.value_and_grad(loss_fn(remat, batch))


@pytest.fixture(scope="module")
def without_remat(params, batch):
  """(loss, gradients) of the plain model."""
  return jax.jit(value_and_grad(False, batch))(params)


def test_remat_gives_the_same_loss_and_gradients(params, batch, without_remat):
  # The whole forward is rematerialised layer by layer: the dense layer's call, and each
  # routed layer's attention block and MLP branch.
  assert remat_ops(jax.make_jaxpr(value_and_grad(False, batch))(params)) == 0
  assert remat_ops(jax.make_jaxpr(value_and_grad(True, batch))(params)) == 1 + 2 * 2
  (loss, grads), (loss_remat, grads_remat) = without_remat, jax.jit(
      value_and_grad(True, batch))(params)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  flat = dict(jax.tree_util.tree_leaves_with_path(grads))
  flat_remat = dict(jax.tree_util.tree_leaves_with_path(grads_remat))
  assert flat.keys() == flat_remat.keys()
  for key, g in flat.items():
    np.testing.assert_allclose(flat_remat[key], g, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(key))
  # The routed path is really differentiated (layer 1's weights reach the text through
  # layer 2; the last layer's only reach visual positions, where no loss is taken).
  assert np.abs(grads["llm"]["layers_1"]["router"]["kernel"]).max() > 1e-4


def test_remat_stores_no_attention_probabilities(params, batch):
  """What the backward keeps from the forward (jax's saved residuals, before XLA): the
  LLM's attention probabilities f32[..., T, S] are recomputed with remat, stored without.
  (XLA:CPU's memory analysis shows no saving for jax.checkpoint even on a toy chain, so
  the saving is checked here, where it is decided.)"""
  seq = batch["input_ids"].shape[1]
  vision_seq = CFG.vision.seq_len  # the tower is not rematerialised

  def llm_probs(remat):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # one residual a line: "f32[2,4,28,28] output of"
      jax.ad_checkpoint.print_saved_residuals(loss_fn(remat, batch), params)
    shapes = [tuple(map(int, m.group(1).split(",")))
              for m in re.finditer(r"^f32\[([\d,]+)\]", out.getvalue(), re.M)]
    # Self-attention probabilities: [..., T, T] (T_sub in a routed layer), not the tower's.
    return [s for s in shapes if len(s) >= 4 and s[-1] == s[-2] != vision_seq and s[-1] <= seq]
  assert len(llm_probs(False)) >= CFG.text.num_layers  # one or more per layer
  assert llm_probs(True) == []


def test_remat_keeps_parameter_names():
  init = lambda remat: jax.eval_shape(
      lambda r: llava.Llava(CFG, remat=remat).init(
          r, jnp.full((1, 16), 63, jnp.int32), jnp.zeros((1, 28, 28, 3)),
          jnp.ones((1, 16), bool), jnp.arange(16)[None])["params"], jax.random.key(0))
  assert (jax.tree.map(lambda x: x.shape, init(True))
          == jax.tree.map(lambda x: x.shape, init(False)))


def test_train_step_with_remat(params, batch, without_remat):
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  optim = train_tiny.get_config().optim
  tx, schedule = trainer.make_optimizer(optim, 10)
  state, shardings = trainer.init_state(params, tx, 0, optim.freeze, mesh)
  config = train_tiny.get_config("synthetic")
  config.model.remat = True
  step = trainer.make_train_step(trainer.make_model(config, CFG), tx, schedule, shardings,
                                 mesh, freeze=optim.freeze, plan=PLAN)
  _, metrics = step(state, trainer.put_batch(batch, mesh))
  np.testing.assert_allclose(metrics["loss"], without_remat[0], rtol=1e-6)
  assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0


def test_remat_switch():
  assert train_pmod_llava15.get_config().model.remat  # the 7B recipe
  assert not train_tiny.get_config().model.remat
  config = train_tiny.get_config()
  assert not trainer.make_model(config, CFG).remat
  config.model.remat = True
  assert trainer.make_model(config, CFG).remat
