"""The token-reduction methods by name, at their published presets or at a retention level.

  red = methods.get("aim", cfg)                  # AIM's preset for the model
  red = methods.get("fastv", cfg, retention=0.25)  # FastV keeping 25% on average
  plan = reduction.make_plan(red, cfg)

A retention level ρ asks for ρ·N_v "equivalent tokens": the mean number of visual
tokens over the LLM layers, the field's measure (METHODS.md section 5). Every method
can be asked for any ρ in (0, 1]; pooling only for ρ = 1/s² with s dividing the grid.
"""

from __future__ import annotations

import math

from tokred_jax.methods import aim, fastv, mustdrop, pmod
from tokred_jax.methods.reduction import Reduction
from tokred_jax.models.config import ConfigError, LlavaConfig

METHODS = ("none", "aim", "fastv", "tome", "random", "pooling", "pmod", "mustdrop")
# Presets by name: (method, keyword arguments of the method's builder).
PRESETS = {
    "aim-252": ("aim", dict(merge_r=aim.LLAVA15_MERGE_252)),
    "aim-72": ("aim", dict(merge_r=aim.LLAVA15_MERGE_72)),
    "fastv-k2-r50": ("fastv", dict(k=fastv.FASTV_K, r=fastv.FASTV_R)),
    "pooling-2x2": ("pooling", dict(stride=2)),
    **{f"mustdrop-{label}": ("mustdrop", dict(gamma=g, alpha=a))
       for label, (g, a) in mustdrop.PRESETS.items()},
}


def _check_retention(retention: float):
  if not 0 < retention <= 1:
    raise ConfigError(f"retention must be in (0, 1] (the fraction of visual tokens kept "
                      f"on average), got {retention}.")


def aim_schedule(num_layers: int) -> tuple[int, int]:
  """AIM's (l1, l2): the published ones for 32 and 28 layers, scaled for other depths."""
  published = {32: aim.SCHEDULE_LLAMA_32, 28: aim.SCHEDULE_QWEN2_28}
  if num_layers in published:
    return published[num_layers]
  l1 = max(0, round(num_layers * 13 / 32))
  return l1, max(l1 + 1, round(num_layers * 21 / 32))


def _merge_steps(num_visual: int, target: int) -> tuple[int, ...]:
  """Bipartite steps that take num_visual tokens down to target, each as large as it
  can be (a step merges at most the ceil(n/2) even-slot tokens)."""
  steps, n = [], num_visual
  while n > target:
    r = min(n - target, (n + 1) // 2 if n > 1 else 0)
    if r == 0:
      break
    steps.append(r)
    n -= r
  return tuple(steps)


def build_aim(cfg: LlavaConfig, retention: float | None = None,
        merge_r: tuple[int, ...] = aim.LLAVA15_MERGE_252, schedule=None,
        mode: str = "fast", l1: int | None = None, l2: int | None = None) -> Reduction:
  """AIM: merge before the LLM, then PageRank pruning on the (l1, l2) schedule
  (`schedule`, or `l1` and `l2` given one by one, e.g. as evaluation options; default
  `aim_schedule`).

  With `retention`, the merge target M is chosen so that M times the schedule's mean
  ratio gives retention·N_v; if that needs no merging at all (retention above the
  schedule's mean), the schedule is relaxed instead: v ← 1 − (1 − v)(1 − ρ)/(1 − mean).
  """
  n_layers = cfg.text.num_layers
  if (l1 is None) != (l2 is None):
    raise ConfigError(f"AIM's schedule needs both l1 and l2; got l1={l1}, l2={l2}.")
  if l1 is not None:
    schedule = (l1, l2)
  l1, l2 = schedule or aim_schedule(n_layers)
  ratios = aim.layer_ratios(n_layers, l1, l2)
  n_v = cfg.num_image_tokens
  if retention is not None:
    _check_retention(retention)
    mean = sum(ratios) / n_layers
    if retention >= mean:
      merge_r = ()
      ratios = tuple(1 - (1 - v) * (1 - retention) / (1 - mean) for v in ratios)
    else:
      merge_r = _merge_steps(n_v, max(1, round(retention * n_v / mean)))
  elif sum(merge_r) >= n_v:
    raise ConfigError(f"AIM merge steps {merge_r} remove {sum(merge_r)} of the model's "
                      f"{n_v} visual tokens.")
  return Reduction(name="aim", mode=mode, merge_r=tuple(merge_r), merge_metric=(
      "keys" if cfg.vision_feature_layer % (cfg.vision.num_layers + 1)
      == cfg.vision.num_layers - 1 else "features"),
                   scorer="pagerank", layer_ratios=ratios)


def build_fastv(cfg: LlavaConfig, retention: float | None = None, k: int = fastv.FASTV_K,
                 r: float = fastv.FASTV_R, mode: str = "fast") -> Reduction:
  """FastV: layers 0..k−1 see every visual token; layer k−1's last-token attention
  drops the fraction r for the rest. With `retention`, r is solved from
  (k + (L − k)(1 − r)) / L = retention."""
  n_layers = cfg.text.num_layers
  if retention is not None:
    _check_retention(retention)
    r = 1 - (retention * n_layers - k) / (n_layers - k)
    if r > 1:
      raise ConfigError(f"FastV with k={k} keeps every visual token in its first {k} of "
                        f"{n_layers} layers, so it cannot retain less than "
                        f"{k / n_layers:.3f} on average; ask for more or lower k.")
    r = max(r, 0.0)
  return Reduction(name="fastv", mode=mode, scorer="fastv",
                   layer_ratios=fastv.layer_ratios(n_layers, k, r))


def build_tome(cfg: LlavaConfig, retention: float | None = None, r: int | None = None,
         mode: str = "fast") -> Reduction:
  """ToMe in the vision tower: r merges per layer run (or enough to reach retention)."""
  layers_run = cfg.vision_layers_used
  if retention is not None:
    _check_retention(retention)
    total = cfg.num_image_tokens - max(1, math.floor(retention * cfg.num_image_tokens))
    # An even spread if the layers allow it (a layer merges at most half its tokens),
    # else as many as possible as early as possible.
    movable = cfg.vision.seq_len - int(cfg.vision.has_cls)
    even = [total // layers_run + (i < total % layers_run) for i in range(layers_run)]
    tome_r = _spread(movable, even) or _spread(movable, [total] + [0] * (layers_run - 1),
                                               greedy=True)
    if sum(tome_r) < total:
      raise ConfigError(f"ToMe over {layers_run} tower layers cannot merge down to "
                        f"{retention} of the tokens (each layer merges at most half).")
    tome_r = tuple(tome_r)
  else:
    tome_r = (r if r is not None else 0,) * layers_run
  return Reduction(name="tome", mode=mode, tome_r=tome_r)


def build_pmod(cfg: LlavaConfig, retention: float | None = None, schedule: str | None = None,
               mode: str = "fast", **schedule_args) -> Reduction:
  """p-MoD routing on the model's router layers with a schedule from pmod.SCHEDULES
  (default: PRD's shifted cosine). With `retention`, the schedule is shifted so that the
  mean kept ratio over all layers matches it (the paper's ablations compare schedules
  at the same mean). With neither, the ratios the checkpoint was trained at, if it
  records them (`TextConfig.router_ratios`)."""
  layers = cfg.text.router_layers
  if not layers:
    raise ConfigError("this model has no p-MoD routers; add them with pmod.add_routers and "
                      "fine-tune (train.py), or load a p-MoD checkpoint.")
  if schedule is None and retention is None and not schedule_args and cfg.text.router_ratios:
    return Reduction(name="pmod", mode=mode, mod_ratios=cfg.text.router_ratios)
  schedule = schedule or "cosine"
  n_layers = cfg.text.num_layers
  try:
    if retention is not None:
      _check_retention(retention)
      ratios = pmod.fit_mean(schedule, n_layers, layers, cfg.num_image_tokens, retention,
                             **schedule_args)
    else:
      ratios = pmod.on_layers(pmod.schedule(schedule, n_layers, **schedule_args), layers)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return Reduction(name="pmod", mode=mode, mod_ratios=ratios)


def mustdrop_filter_layers(num_layers: int) -> tuple[int, ...]:
  """MustDrop's filter layers: the official (2, 6, 10, 14) for 32 layers, scaled to
  other depths (distinct, each with a later layer)."""
  if num_layers == 32:
    return mustdrop.FILTER_LAYERS
  scaled = {min(num_layers - 2, max(1, round(f * num_layers / 32)))
            for f in mustdrop.FILTER_LAYERS}
  return tuple(sorted(l for l in scaled if l >= 0))


def build_mustdrop(cfg: LlavaConfig, retention: float | None = None,
                   gamma: float = mustdrop.PRESETS["192"][0],
                   alpha: float = mustdrop.PRESETS["192"][1], window: int = mustdrop.WINDOW,
                   threshold: float = mustdrop.MERGE_THRESHOLD,
                   key_ratio: float = mustdrop.KEY_RATIO,
                   filter_layers: tuple[int, ...] | None = None, token_bucket: int = 16,
                   mode: str = "fast") -> Reduction:
  """MustDrop (mustdrop.py): window merge in the tower (window 0: none), the key set,
  the dual-attention filter with (gamma, alpha) after `filter_layers` (default: the
  official ones, scaled to the depth) and the output-aware KV cache. Its counts are
  data-dependent, so it takes thresholds, not a retention level; each request's real
  equivalent-token count is in the forward's aux (`equivalent_tokens`)."""
  if retention is not None:
    raise ConfigError("MustDrop's token counts depend on the image and the question; ask "
                      "for a preset (mustdrop-192, -128, -64) or gamma and alpha instead "
                      "of a retention level.")
  if filter_layers is None:
    filter_layers = mustdrop_filter_layers(cfg.text.num_layers)
  return Reduction(name="mustdrop", mode=mode, window=window, merge_threshold=threshold,
                   key_ratio=key_ratio, filter_layers=tuple(filter_layers), gamma=gamma,
                   alpha=alpha, token_bucket=token_bucket)


def _spread(movable: int, wanted: list[int], greedy: bool = False) -> list[int] | None:
  """Per-layer merge counts: `wanted` if each fits (at most half the tokens left), else
  None; with greedy, each layer merges as much of what is left as it can."""
  out, n, left = [], movable, sum(wanted)
  for r in wanted:
    r = min(n // 2, left) if greedy else r
    if r > n // 2:
      return None
    out.append(r)
    n, left = n - r, left - r
  return out


def build_random(cfg: LlavaConfig, retention: float = 0.25, seed: int = 0,
                mode: str = "fast") -> Reduction:
  """A seeded uniformly random subset of visual tokens, before the projector."""
  _check_retention(retention)
  keep = max(1, math.floor(retention * cfg.num_image_tokens))
  return Reduction(name="random", mode=mode, keep_visual=keep, seed=seed)


def build_pooling(cfg: LlavaConfig, retention: float | None = None, stride: int = 2,
            mode: str = "fast") -> Reduction:
  """s×s average pooling of the visual grid after the projector (retention = 1/s²)."""
  if retention is not None:
    _check_retention(retention)
    stride = round(retention ** -0.5)
    if abs(stride ** -2 - retention) > 1e-6:
      raise ConfigError(f"pooling retains 1/s² of the tokens (1, 0.25, 0.111, 0.0625, ...); "
                        f"{retention} is none of these.")
  return Reduction(name="pooling", mode=mode, pool_stride=stride)


_BUILDERS = {"aim": build_aim, "fastv": build_fastv, "tome": build_tome,
             "random": build_random, "pooling": build_pooling, "pmod": build_pmod,
             "mustdrop": build_mustdrop}


def get(name: str, cfg: LlavaConfig, retention: float | None = None, mode: str = "fast",
        **kwargs) -> Reduction:
  """A method (see METHODS) or a preset (see PRESETS), optionally at a retention level."""
  if name in PRESETS:
    name, preset = PRESETS[name]
    kwargs = {**preset, **kwargs}
  if name == "none":
    if retention not in (None, 1, 1.0):
      raise ConfigError("method 'none' keeps every token; pick a method to reduce them.")
    return Reduction(mode=mode)
  if name not in _BUILDERS:
    raise ConfigError(f"unknown method {name!r}; choose from {METHODS} or the presets "
                      f"{sorted(PRESETS)}.")
  if retention is not None:
    kwargs["retention"] = retention
  return _BUILDERS[name](cfg, mode=mode, **kwargs)
