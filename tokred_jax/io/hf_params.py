"""The declarative map between Hugging Face LLaVA tensors and our parameter tree.

One table (`_TOP_RULES`, `_VISION_LAYER_RULES`, `_TEXT_LAYER_RULES`, `_ROUTER_RULES`)
maps each Hugging Face tensor to a leaf of our parameter tree; loading and saving
(checkpoint.py) both read it. A rule names the HF tensor and our path, both shapes in
symbolic dimensions, and the axis permutation taking the HF tensor to ours (followed by
a reshape). For example HF's `q_proj.weight` f32[H*dh, D] becomes our `attn/q/kernel`
f32[D, H, dh] by permuting (1, 0) and reshaping; saving runs the same rule backwards.

Dimension letters are listed in `_DIM_NAMES`.

Three weight-name layouts are normalised (`canonical_name`) to the one transformers 5
writes:
  (a) transformers 4.36 / published llava-hf: `vision_tower.vision_model.*`,
      `language_model.model.*`, `language_model.lm_head.weight`;
  (b) transformers 5: `vision_tower.*`, `language_model.model.*`, ...;
  (c) transformers 4.5x in-memory names: `model.vision_tower.vision_model.*`,
      `model.language_model.*`, `model.multi_modal_projector.*`, `lm_head.weight`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from tokred_jax.models.config import LlavaConfig

Params = dict[str, Any]


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read or written; the message says how to fix it."""


def _always(cfg: LlavaConfig) -> bool:
  del cfg
  return True


def _clip(cfg: LlavaConfig) -> bool:
  return cfg.vision.kind == "clip"


def _siglip(cfg: LlavaConfig) -> bool:
  return cfg.vision.kind == "siglip"


def _projector_bias(cfg: LlavaConfig) -> bool:
  return cfg.projector_bias


def _qkv_bias(cfg: LlavaConfig) -> bool:
  return cfg.text.attention_bias


def _untied(cfg: LlavaConfig) -> bool:
  return not cfg.text.tie_word_embeddings


def _anyres(cfg: LlavaConfig) -> bool:
  return cfg.arch != "llava"


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor <-> one leaf of our tree. "{i}" in names stands for a layer index."""
  hf: str
  ours: str  # "/"-separated path
  hf_shape: tuple[str, ...]
  our_shape: tuple[str, ...]
  perm: tuple[int, ...] | None = None  # HF axes in our order, applied before the reshape
  when: Callable[[LlavaConfig], bool] = _always


def _r(hf, ours, hf_shape, our_shape=None, perm=None, when=_always) -> Rule:
  """Shorthand: shapes are space-separated dimension expressions, e.g. "H*dh D"."""
  our_shape = hf_shape if our_shape is None else our_shape
  return Rule(hf, ours, tuple(hf_shape.split()), tuple(our_shape.split()), perm, when)


_T = (1, 0)  # HF Linear weight [out, in] -> our kernel [in, out].
_CONV = (2, 3, 1, 0)  # HF conv [Dv, C, p, p] -> [p, p, C, Dv]: patches flatten as (p1 p2 c).

_TOP_RULES = (
    _r("vision_tower.embeddings.patch_embedding.weight", "vision/patch_embed/kernel",
       "Dv C p p", "p*p*C Dv", _CONV),
    _r("vision_tower.embeddings.patch_embedding.bias", "vision/patch_embed/bias", "Dv",
       when=_siglip),
    _r("vision_tower.embeddings.class_embedding", "vision/cls", "Dv", when=_clip),
    _r("vision_tower.embeddings.position_embedding.weight", "vision/pos_embed", "Sv Dv"),
    _r("vision_tower.pre_layrnorm.weight", "vision/pre_ln/scale", "Dv", when=_clip),
    _r("vision_tower.pre_layrnorm.bias", "vision/pre_ln/bias", "Dv", when=_clip),
    _r("vision_tower.post_layernorm.weight", "vision/post_ln/scale", "Dv"),
    _r("vision_tower.post_layernorm.bias", "vision/post_ln/bias", "Dv"),
    _r("multi_modal_projector.linear_1.weight", "projector/linear_1/kernel", "D Dv", "Dv D",
       _T),
    _r("multi_modal_projector.linear_1.bias", "projector/linear_1/bias", "D",
       when=_projector_bias),
    _r("multi_modal_projector.linear_2.weight", "projector/linear_2/kernel", "D D", "D D", _T),
    _r("multi_modal_projector.linear_2.bias", "projector/linear_2/bias", "D",
       when=_projector_bias),
    _r("image_newline", "image_newline", "D", when=_anyres),
    _r("language_model.model.embed_tokens.weight", "llm/embed/embedding", "V D"),
    _r("language_model.model.norm.weight", "llm/final_norm/scale", "D"),
    _r("language_model.lm_head.weight", "llm/lm_head/kernel", "V D", "D V", _T, when=_untied),
)

_VISION_LAYER_RULES = tuple(
    dataclasses.replace(rule, hf="vision_tower.encoder.layers.{i}." + rule.hf,
                        ours="vision/layers_{i}/" + rule.ours) for rule in (
        _r("layer_norm1.weight", "ln1/scale", "Dv"),
        _r("layer_norm1.bias", "ln1/bias", "Dv"),
        _r("self_attn.q_proj.weight", "attn/q/kernel", "Hv*dv Dv", "Dv Hv dv", _T),
        _r("self_attn.q_proj.bias", "attn/q/bias", "Hv*dv", "Hv dv"),
        _r("self_attn.k_proj.weight", "attn/k/kernel", "Hv*dv Dv", "Dv Hv dv", _T),
        _r("self_attn.k_proj.bias", "attn/k/bias", "Hv*dv", "Hv dv"),
        _r("self_attn.v_proj.weight", "attn/v/kernel", "Hv*dv Dv", "Dv Hv dv", _T),
        _r("self_attn.v_proj.bias", "attn/v/bias", "Hv*dv", "Hv dv"),
        _r("self_attn.out_proj.weight", "attn/o/kernel", "Dv Hv*dv", "Hv dv Dv", _T),
        _r("self_attn.out_proj.bias", "attn/o/bias", "Dv"),
        _r("layer_norm2.weight", "ln2/scale", "Dv"),
        _r("layer_norm2.bias", "ln2/bias", "Dv"),
        _r("mlp.fc1.weight", "mlp/fc1/kernel", "Fv Dv", "Dv Fv", _T),
        _r("mlp.fc1.bias", "mlp/fc1/bias", "Fv"),
        _r("mlp.fc2.weight", "mlp/fc2/kernel", "Dv Fv", "Fv Dv", _T),
        _r("mlp.fc2.bias", "mlp/fc2/bias", "Dv"),
    ))

_TEXT_LAYER_RULES = tuple(
    dataclasses.replace(rule, hf="language_model.model.layers.{i}." + rule.hf,
                        ours="llm/layers_{i}/" + rule.ours) for rule in (
        _r("input_layernorm.weight", "attn_norm/scale", "D"),
        _r("self_attn.q_proj.weight", "attn/q/kernel", "H*dh D", "D H dh", _T),
        _r("self_attn.q_proj.bias", "attn/q/bias", "H*dh", "H dh", when=_qkv_bias),
        _r("self_attn.k_proj.weight", "attn/k/kernel", "K*dh D", "D K dh", _T),
        _r("self_attn.k_proj.bias", "attn/k/bias", "K*dh", "K dh", when=_qkv_bias),
        _r("self_attn.v_proj.weight", "attn/v/kernel", "K*dh D", "D K dh", _T),
        _r("self_attn.v_proj.bias", "attn/v/bias", "K*dh", "K dh", when=_qkv_bias),
        _r("self_attn.o_proj.weight", "attn/o/kernel", "D H*dh", "H dh D", _T),
        _r("post_attention_layernorm.weight", "mlp_norm/scale", "D"),
        _r("mlp.gate_proj.weight", "mlp/gate/kernel", "F D", "D F", _T),
        _r("mlp.up_proj.weight", "mlp/up/kernel", "F D", "D F", _T),
        _r("mlp.down_proj.weight", "mlp/down/kernel", "D F", "F D", _T),
    ))

# p-MoD routers, in the layers `TextConfig.router_layers` names. transformers does not
# know them: it loads such a checkpoint as the dense model and reports them as unused.
_ROUTER_RULES = (
    _r("language_model.model.layers.{i}.router.weight", "llm/layers_{i}/router/kernel",
       "1 D", "D 1", _T),
    _r("language_model.model.layers.{i}.router.bias", "llm/layers_{i}/router/bias", "1"),
)

# Older layouts -> the transformers 5 names above; applied in order, each at most once.
RENAMES = (
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^model\.image_newline$"), "image_newline"),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
)
# Tensors LLaVA never uses: SigLIP's attention-pooling head and buffers that old
# transformers versions saved alongside the weights.
IGNORED = re.compile(
    r"^vision_tower\.head\.|rotary_emb\.inv_freq$|^vision_tower\.embeddings\.position_ids$")


# What each dimension letter of the table stands for, as config.json names it.
_DIM_NAMES = dict(
    Dv="vision hidden_size", Fv="vision intermediate_size", Hv="vision num_attention_heads",
    dv="vision head size", C="num_channels", p="patch_size",
    Sv="vision positions (patches, +1 for CLIP's CLS)", D="text hidden_size",
    F="text intermediate_size", H="text num_attention_heads", K="num_key_value_heads",
    dh="text head_dim", V="vocab_size", **{"1": "one router output"})


def dim_sizes(cfg: LlavaConfig) -> dict[str, int]:
  v, t = cfg.vision, cfg.text
  return {"Dv": v.hidden_size, "Fv": v.intermediate_size, "Hv": v.num_heads,
          "dv": v.head_dim, "C": v.num_channels, "p": v.patch_size, "Sv": v.seq_len,
          "D": t.hidden_size, "F": t.intermediate_size, "H": t.num_heads,
          "K": t.num_kv_heads, "dh": t.head_dim, "V": t.vocab_size, "1": 1}


def size_of(spec: tuple[str, ...], dims: dict[str, int]) -> tuple[int, ...]:
  return tuple(math.prod(dims[name] for name in expr.split("*")) for expr in spec)


def describe(spec: tuple[str, ...]) -> str:
  """E.g. ("H*dh", "D") -> "text num_attention_heads*text head_dim, text hidden_size"."""
  return ", ".join("*".join(_DIM_NAMES[name] for name in expr.split("*")) for expr in spec)


def table(cfg: LlavaConfig) -> list[Rule]:
  """The concrete rules for `cfg`: conditions applied, "{i}" expanded per layer."""
  if cfg.text.kind == "llama" and cfg.text.attention_bias:
    # Llama's attention_bias also adds an o_proj bias, which our tree has no place for.
    raise CheckpointError("Llama with attention_bias=True (biased o_proj) is not supported.")
  rules = [rule for rule in _TOP_RULES if rule.when(cfg)]
  for layer_rules, layers in ((_VISION_LAYER_RULES, range(cfg.vision.num_layers)),
                              (_TEXT_LAYER_RULES, range(cfg.text.num_layers)),
                              (_ROUTER_RULES, cfg.text.router_layers)):
    for i in layers:
      rules.extend(
          dataclasses.replace(rule, hf=rule.hf.format(i=i), ours=rule.ours.format(i=i))
          for rule in layer_rules if rule.when(cfg))
  return rules


def param_shapes(cfg: LlavaConfig) -> Params:
  """The shape of every leaf of our parameter tree for `cfg`, as nested dicts of tuples."""
  dims = dim_sizes(cfg)
  shapes: Params = {}
  for rule in table(cfg):
    set_leaf(shapes, rule.ours, size_of(rule.our_shape, dims))
  return shapes


def to_ours(rule: Rule, x: np.ndarray, dims: dict[str, int]) -> np.ndarray:
  if rule.perm is not None:
    x = np.transpose(x, rule.perm)
  return x.reshape(size_of(rule.our_shape, dims))


def to_hf(rule: Rule, x: np.ndarray, dims: dict[str, int]) -> np.ndarray:
  hf_shape = size_of(rule.hf_shape, dims)
  if rule.perm is None:
    return x.reshape(hf_shape)
  permuted = tuple(hf_shape[axis] for axis in rule.perm)
  return np.transpose(x.reshape(permuted), np.argsort(rule.perm))


def canonical_name(name: str) -> str:
  """The transformers 5 name of a tensor saved under any of the supported layouts."""
  for pattern, replacement in RENAMES:
    name = pattern.sub(replacement, name, count=1)
  return name


def set_leaf(tree: Params, path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value
