"""Sharding by logical axis names (DESIGN.md, principle 6).

Every parameter gets one logical axis name per dimension from a declarative table keyed
on its path (`PARAM_AXES`). Rules (`DEFAULT_RULES`) map logical names to mesh axes; they
are plain data, a tuple of (logical name, mesh axes) pairs, so a config can override
them. Lookup takes the first pair naming an axis, so prepending a pair overrides the
default, e.g. `(("embed", None),) + DEFAULT_RULES` turns FSDP off.

A dimension whose size its mesh axes do not divide is sharded over the longest prefix of
those axes that does divide it (often none: replicated), for that parameter only, with a
debug log naming it. So 2 KV heads on a 4-way tensor axis keep k/v whole while q, the
MLP and the vocabulary stay split.

  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  shardings = param_shardings(params, mesh)  # Also takes jax.eval_shape's output.
  params = shard_params(params, mesh)
  forward = sharded_apply(Llava(cfg), mesh, DEFAULT_RULES, shardings)
  logits = forward(params, input_ids, pixel_values, attention_mask, positions)

Every sharding here is a NamedSharding that carries its mesh, so no mesh context is
needed; all of it works inside `with jax.set_mesh(mesh):` too.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokred_jax.core.suggest import closest

log = logging.getLogger(__name__)

# Logical name -> mesh axes: a name, a tuple of names (sharded over their product) or
# None (replicated). Mesh axes the mesh lacks are skipped, so these rules also serve a
# mesh with fewer axes.
Rules = Sequence[tuple[str, str | Sequence[str] | None]]
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("norm", None),
)

# The mesh axes DEFAULT_RULES map to.
MESH_AXES = ("data", "fsdp", "tensor")

# Parameter path (keys joined by "/", full match) -> logical axes, first match wins. The
# vision tower shares the LLM's names: its heads and MLP split over the same tensor axis.
# The projector is a two-layer MLP and is split like one (column- then row-parallel).
# Norm scales and biases are small, so they stay replicated ("norm").
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # Grouped-query attention: k/v have their own head count, so their own logical name.
    (r"llm/layers_\d+/attn/q/kernel", ("embed", "heads", "head_dim")),
    (r"llm/layers_\d+/attn/[kv]/kernel", ("embed", "kv_heads", "head_dim")),
    (r"llm/layers_\d+/attn/q/bias", ("heads", "head_dim")),
    (r"llm/layers_\d+/attn/[kv]/bias", ("kv_heads", "head_dim")),
    (r".*/attn/[qkv]/kernel", ("embed", "heads", "head_dim")),
    (r".*/attn/[qkv]/bias", ("heads", "head_dim")),
    (r".*/attn/o/kernel", ("heads", "head_dim", "embed")),
    (r".*/attn/o/bias", ("embed",)),
    (r".*/mlp/(gate|up|fc1)/kernel", ("embed", "mlp")),
    (r".*/mlp/fc1/bias", ("mlp",)),
    (r".*/mlp/(down|fc2)/kernel", ("mlp", "embed")),
    (r".*/mlp/fc2/bias", ("embed",)),
    (r"projector/linear_1/kernel", ("embed", "mlp")),
    (r"projector/linear_1/bias", ("mlp",)),
    (r"projector/linear_2/kernel", ("mlp", "embed")),
    (r"projector/linear_2/bias", ("embed",)),
    (r"llm/embed/embedding", ("vocab", "embed")),
    (r"llm/lm_head/kernel", ("embed", "vocab")),
    # p-MoD routers, Linear(D -> 1): tiny, split on embed like the stream.
    (r"llm/layers_\d+/router/kernel", ("embed", None)),
    (r"llm/layers_\d+/router/bias", (None,)),
    (r"vision/patch_embed/kernel", ("patch", "embed")),
    (r"vision/patch_embed/bias", ("embed",)),
    (r"vision/pos_embed", ("length", "embed")),
    (r"vision/cls", ("embed",)),
    # LLaVA-NeXT / OneVision's newline token, one D vector spliced into the stream.
    (r"image_newline", ("embed",)),
    (r".*(norm|ln\d?)/(scale|bias)", ("norm",)),
)


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A mesh with the axes of `mesh_shape`, in its order, e.g. {"data": 2, "tensor": 4}.

  One size may be -1: it takes all the devices the others leave. Axes are `Auto`, so
  the partitioner places what the shardings given to `jax.jit` leave open.
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = tuple(mesh_shape), [int(s) for s in mesh_shape.values()]
  if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"mesh shape {dict(mesh_shape)}: sizes must be positive, with at most "
                     "one -1 (all remaining devices).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh shape {dict(mesh_shape)}: the fixed axes ({known} devices) "
                       f"do not divide the {len(devices)} devices.")
    sizes[sizes.index(-1)] = len(devices) // known
  elif known != len(devices):
    raise ValueError(f"mesh shape {dict(mesh_shape)} needs {known} devices, but there are "
                     f"{len(devices)}; make the product of the sizes {len(devices)} or "
                     "set one size to -1.")
  return jax.make_mesh(tuple(sizes), names,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def parse_mesh(text: str, axes: Sequence[str] = MESH_AXES) -> dict[str, int] | None:
  """"data=2,fsdp=1,tensor=4" -> {"data": 2, "fsdp": 1, "tensor": 4}; "" -> None.

  Every name must be one of `axes` (a misspelt axis would match no rule and leave
  everything replicated), at most once; sizes are positive or -1 (the rest).
  """
  if not text.strip():
    return None
  example = "write it as name=size pairs, e.g. 'data=2,fsdp=1,tensor=4'"
  shape = {}
  for item in text.split(","):
    name, _, text_size = (part.strip() for part in item.partition("="))
    try:
      size = int(text_size)
    except ValueError:
      raise ValueError(f"mesh {text!r}: {example}.") from None
    if name not in axes:
      raise ValueError(f"mesh {text!r}: unknown axis {name!r}{closest(name, axes)}; the "
                       f"axes are {', '.join(axes)}.")
    if name in shape:
      raise ValueError(f"mesh {text!r}: axis {name!r} is given twice; {example}.")
    if size < 1 and size != -1:
      raise ValueError(f"mesh {text!r}: {name}={size}; a size is positive, or -1 "
                       "for all the devices the other axes leave.")
    shape[name] = size
  if list(shape.values()).count(-1) > 1:
    raise ValueError(f"mesh {text!r}: at most one axis may be -1.")
  return shape


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _param_axes(path: str, ndim: int, table) -> tuple[str | None, ...]:
  for pattern, names in table:
    if re.fullmatch(pattern, path):
      if len(names) != ndim:
        raise ValueError(f"parameter {path} has {ndim} dimensions but its logical axes "
                         f"{names} (pattern {pattern!r}) name {len(names)}.")
      return tuple(names)
  raise ValueError(f"no logical-axis pattern matches parameter {path}; add one to the "
                   "table (sharding.PARAM_AXES).")


def logical_axes(params, table=PARAM_AXES):
  """The logical axis names of every parameter: the same tree, each leaf a tuple.

  `params` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
  Raises ValueError for a parameter no pattern of `table` matches.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _param_axes(_path_str(p), len(x.shape), table), params)


def _mesh_axes(name: str, rules: Rules) -> tuple[str, ...]:
  for logical, axes in rules:
    if logical == name:
      if axes is None:
        return ()
      return (axes,) if isinstance(axes, str) else tuple(axes)
  return ()  # No rule: replicated, as in MaxText.


def logical_to_spec(names: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    shape: Sequence[int | None] | None = None, what: str = "array"
                    ) -> PartitionSpec:
  """The PartitionSpec for an array whose dimensions have logical `names`.

  With `shape` (None entries: unknown), a dimension the mesh axes do not divide keeps
  only the longest prefix of them that does, and a debug log names `what`. A mesh axis
  shards at most one dimension; a later dimension asking for it again does without.
  """
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    axes = () if name is None else _mesh_axes(name, rules)
    axes = tuple(a for a in axes if a in mesh.shape and a not in used)
    size = None if shape is None else shape[dim]
    if size is not None:
      wanted = axes
      while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
      if axes != wanted:
        log.debug("%s: dimension %d (%s, size %d) is not divisible by mesh axes %s "
                  "(size %d); %s.", what, dim, name, size, wanted,
                  math.prod(mesh.shape[a] for a in wanted),
                  f"sharded over {axes} only" if axes else "replicated")
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def logical_sharding(names: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                     shape: Sequence[int | None] | None = None, what: str = "array"
                     ) -> NamedSharding:
  """`logical_to_spec` as a NamedSharding on `mesh`."""
  return NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape, what))


def param_shardings(params_or_shapes, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    table=PARAM_AXES):
  """A NamedSharding for every parameter (arrays or ShapeDtypeStructs): the same tree."""
  def one(path, x):
    name = _path_str(path)
    axes = _param_axes(name, len(x.shape), table)
    return logical_sharding(axes, mesh, rules, x.shape, what=name)
  return jax.tree_util.tree_map_with_path(one, params_or_shapes)


def shard_params(params, mesh: Mesh, rules: Rules = DEFAULT_RULES, table=PARAM_AXES):
  """`params` moved onto the devices of `mesh`, each split as `param_shardings` says."""
  return jax.device_put(params, param_shardings(params, mesh, rules, table))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Inputs of rank `ndim` split on their leading (batch) axis, the rest replicated.

  The batch size must be a multiple of the batch mesh axes' product (data x fsdp by
  default); `jax.jit` rejects other inputs.
  """
  return logical_sharding(("batch",) + (None,) * (ndim - 1), mesh, rules)


# The logical axes of the residual stream f32[B, T, D], for `constrain`. Under FSDP the
# batch claims the fsdp axis first, so the stream's embed dimension stays whole.
STREAM = ("batch", "length", "embed")

# (mesh, rules) while `activation_sharding` is entered; read by `constrain` at trace time.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "tokred_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """While tracing inside it, `constrain` pins activation layouts on `mesh`."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`x` laid out by its logical axis `names` inside `activation_sharding`, else `x`.

  Model code calls this on the residual stream. Without it the partitioner may copy the
  parameters' layout onto activations: under FSDP the stream came out split on embed
  with the whole batch on every device. Outside a sharded run it returns `x` untouched,
  so the unsharded model is unchanged bit for bit.
  """
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, logical_sharding(names, mesh, rules, x.shape, what=f"activation {tuple(names)}"))


def sharded_apply(model: nn.Module, mesh: Mesh, rules: Rules,
                  params_shardings) -> Callable[..., jax.Array]:
  """The jitted LLaVA forward with parameters and inputs placed as given.

  Returns fn(params, input_ids i32[B, T], pixel_values f32[B, S, S, C],
  attention_mask bool[B, T], positions i32[B, T]) -> logits f32[B, T, V], split on batch
  (and on vocab over the tensor axis, so the LM head needs no gather). `model` is a
  `llava.Llava`; `params_shardings` comes from `param_shardings`.
  """
  def forward(params, input_ids, pixel_values, attention_mask, positions):
    with activation_sharding(mesh, rules):
      return model.apply({"params": params}, input_ids, pixel_values, attention_mask,
                         positions)

  tokens = batch_sharding(mesh, 2, rules)
  logits = logical_sharding(("batch", "length", "vocab"), mesh, rules,
                            shape=(None, None, model.cfg.text.vocab_size), what="logits")
  return jax.jit(
      forward,
      in_shardings=(params_shardings, tokens, batch_sharding(mesh, 4, rules), tokens,
                    tokens),
      out_shardings=logits)
