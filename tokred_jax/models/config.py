"""Model configurations: frozen dataclasses, hashable so they can be static jit args.

`LlavaConfig` composes a `VisionConfig` (CLIP or SigLIP tower), the projector settings
and a `TextConfig` (Llama or Qwen2 decoder). `from_hf_dict` reads a Hugging Face
`config.json`, including the sparse ones written by older transformers releases, which
leave out every field equal to the config class default.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any


# Defaults of the transformers config classes, for the fields a sparse config.json omits.
_VISION_DEFAULTS = {
    "clip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
        layer_norm_eps=1e-5),
    "siglip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6),
}
# LlavaConfig builds this CLIP tower when vision_config is missing altogether.
_LLAVA_DEFAULT_VISION = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, patch_size=14,
    image_size=336, num_hidden_layers=24, num_attention_heads=16)
_TEXT_DEFAULTS = {
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1,
        eos_token_id=2, head_dim=None),
    "qwen2": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=True, mlp_bias=False, bos_token_id=None,
        eos_token_id=None, head_dim=None),
}
# CLIP's normalisation constants (OpenAI); SigLIP uses 0.5 / 0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


ARCHS = {"llava": "LlavaForConditionalGeneration",
         "llava_next": "LlavaNextForConditionalGeneration",
         "llava_onevision": "LlavaOnevisionForConditionalGeneration"}
# transformers' defaults for the fields a LLaVA-NeXT / OneVision config.json may omit.
_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_OV_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
_OV_DEFAULT_VISION = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, patch_size=14,
    image_size=384, num_hidden_layers=26, num_attention_heads=16)


class ConfigError(ValueError):
  """A configuration that does not describe a model this library can build."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT image tower. `kind` is "clip" (CLS token, pre-LN) or "siglip" (neither)."""
  kind: str = "clip"
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  image_mean: tuple[float, ...] = CLIP_MEAN
  image_std: tuple[float, ...] = CLIP_STD
  # The original LLaVA-1.5's image_aspect_ratio "pad": images are padded to a square with
  # the mean colour before resizing, rather than centre-cropped.
  pad_to_square: bool = False

  def __post_init__(self):
    if self.kind not in ("clip", "siglip"):
      raise ConfigError(f"vision kind {self.kind!r} is not supported; use 'clip' or 'siglip'.")
    if self.image_size < self.patch_size:
      raise ConfigError(f"image_size {self.image_size} is smaller than patch_size "
                        f"{self.patch_size}.")
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by "
                        f"num_heads {self.num_heads}.")

  @property
  def has_cls(self) -> bool:
    return self.kind == "clip"

  @property
  def grid(self) -> int:
    """Patches per side; the patch convolution drops the rest (SigLIP-384: 27 of 14 px)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def seq_len(self) -> int:
    return self.num_patches + int(self.has_cls)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A decoder LLM: "llama" (no attention bias) or "qwen2" (q/k/v bias)."""
  kind: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  attention_bias: bool = False
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  # p-MoD: the layers with a router, and TanhNorm's scale (w = alpha·tanh(r) + 1).
  router_layers: tuple[int, ...] = ()
  router_alpha: float = 0.2
  # The per-layer kept ratios the routers were trained at (None: a dense layer); a
  # p-MoD plan with no schedule given uses them. (): not recorded.
  router_ratios: tuple[float | None, ...] = ()

  def __post_init__(self):
    if self.kind not in ("llama", "qwen2"):
      raise ConfigError(f"text kind {self.kind!r} is not supported; use 'llama' or 'qwen2'.")
    bad = [l for l in self.router_layers if not 0 <= l < self.num_layers]
    if bad:
      raise ConfigError(f"router_layers {bad} are outside the {self.num_layers}-layer LLM.")
    if self.router_ratios and len(self.router_ratios) != self.num_layers:
      raise ConfigError(f"router_ratios has {len(self.router_ratios)} entries for a "
                        f"{self.num_layers}-layer LLM; give one per layer (None: dense).")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                        f"{self.num_kv_heads}.")

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """LLaVA: vision tower -> 2-layer MLP projector -> decoder LLM.

  `vision_feature_layer` indexes the tower's hidden states as Hugging Face does (0 is the
  embedding output, -1 the last layer); "default" selection drops the CLS token.
  """
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 32000
  pad_token_id: int | None = None
  vision_feature_layer: int = -2
  vision_feature_select: str = "default"
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True
  # The chat template prompts and training data are written in (tokred_jax.io.templates,
  # which checks the name where it is used); config.json's "conversation_template".
  # None: not known (see checkpoint.read_config).
  template: str | None = None
  # "llava" (one crop per image), or the anyres models: "llava_next" (base image + tiles,
  # one image_newline per row) and "llava_onevision" (also multi-image and video).
  arch: str = "llava"
  # The (height, width) resolutions an anyres image is tiled at, in pixels.
  image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
  # OneVision's "anyres_max_9": tile grids over 9 crops' worth of tokens are downsampled.
  vision_aspect_ratio: str = "anyres"
  video_token_id: int | None = None

  def __post_init__(self):
    if self.vision_feature_select not in ("default", "full"):
      raise ConfigError(f"vision_feature_select_strategy {self.vision_feature_select!r} is not "
                        "supported; use 'default' (drop CLS) or 'full'.")
    n = self.vision.num_layers
    if not -n - 1 <= self.vision_feature_layer <= n:
      raise ConfigError(f"vision_feature_layer {self.vision_feature_layer} is outside the "
                        f"tower's {n} layers (valid: {-n - 1}..{n}).")
    if self.vision_feature_layer % (n + 1) == 0:
      raise ConfigError(f"vision_feature_layer {self.vision_feature_layer} selects the "
                        f"tower's embeddings, so none of its {n} layers would run; the "
                        "reductions act inside the tower: pick a layer from 1 (or -1).")
    if self.arch not in ARCHS:
      raise ConfigError(f"arch {self.arch!r} is not supported; use one of {sorted(ARCHS)}.")
    if self.arch != "llava" and not self.image_grid_pinpoints:
      raise ConfigError(f"{self.arch} needs image_grid_pinpoints (the tiling resolutions).")
    if self.vision_aspect_ratio != "anyres" and not re.fullmatch(
        r"anyres_max_\d+", self.vision_aspect_ratio):
      raise ConfigError(f"vision_aspect_ratio {self.vision_aspect_ratio!r} is not supported; "
                        "use 'anyres' or 'anyres_max_N' (e.g. anyres_max_9).")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ConfigError(f"image_token_id {self.image_token_id} is outside the vocabulary "
                        f"(size {self.text.vocab_size}).")

  @property
  def vision_layers_used(self) -> int:
    """How many tower layers must run to produce the selected hidden state."""
    return self.vision_feature_layer % (self.vision.num_layers + 1)

  @property
  def drops_cls(self) -> bool:
    """Whether the tower's CLS token is dropped before the projector ("default")."""
    return self.vision.has_cls and self.vision_feature_select == "default"

  @property
  def num_image_tokens(self) -> int:
    """Visual tokens per image (per crop, for the anyres models) handed to the LLM
    (before any reduction)."""
    return self.vision.seq_len - int(self.drops_cls)

  @property
  def max_crops(self) -> int | None:
    """anyres_max_N's N: tile grids larger than N crops are downsampled (None: never)."""
    if self.vision_aspect_ratio == "anyres":
      return None
    return int(self.vision_aspect_ratio[len("anyres_max_"):])


def _get(d: dict[str, Any], key: str, defaults: dict[str, Any]):
  value = d.get(key)
  return defaults.get(key) if value is None else value


def vision_from_hf(d: dict[str, Any]) -> VisionConfig:
  model_type = d.get("model_type", "clip_vision_model")
  if model_type not in _VISION_DEFAULTS:
    raise ConfigError(f"vision model_type {model_type!r} is not supported; expected one of "
                      f"{sorted(_VISION_DEFAULTS)}.")
  dflt = _VISION_DEFAULTS[model_type]
  kind = "clip" if model_type == "clip_vision_model" else "siglip"
  if kind == "siglip":
    mean_std = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
  else:
    mean_std = dict(image_mean=CLIP_MEAN, image_std=CLIP_STD)
  return VisionConfig(
      kind=kind,
      hidden_size=_get(d, "hidden_size", dflt),
      intermediate_size=_get(d, "intermediate_size", dflt),
      num_layers=_get(d, "num_hidden_layers", dflt),
      num_heads=_get(d, "num_attention_heads", dflt),
      image_size=_get(d, "image_size", dflt),
      patch_size=_get(d, "patch_size", dflt),
      num_channels=_get(d, "num_channels", dflt),
      layer_norm_eps=float(_get(d, "layer_norm_eps", dflt)),
      hidden_act=_get(d, "hidden_act", dflt),
      **mean_std)


def text_from_hf(d: dict[str, Any]) -> TextConfig:
  model_type = d.get("model_type", "llama")
  if model_type not in _TEXT_DEFAULTS:
    raise ConfigError(f"text model_type {model_type!r} is not supported; expected one of "
                      f"{sorted(_TEXT_DEFAULTS)}.")
  dflt = _TEXT_DEFAULTS[model_type]
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ConfigError(f"rope type {rope_type!r} is not supported (only plain RoPE).")
  theta = rope.get("rope_theta", d.get("rope_theta", dflt["rope_theta"]))
  if _get(d, "hidden_act", dflt) != "silu":
    raise ConfigError(f"text hidden_act {d['hidden_act']!r} is not supported (only silu).")
  if d.get("mlp_bias"):
    raise ConfigError("mlp_bias=True is not supported.")
  hidden = _get(d, "hidden_size", dflt)
  heads = _get(d, "num_attention_heads", dflt)
  kv_heads = _get(d, "num_key_value_heads", dflt) or heads
  eos = _get(d, "eos_token_id", dflt)
  return TextConfig(
      kind=model_type,
      vocab_size=_get(d, "vocab_size", dflt),
      hidden_size=hidden,
      intermediate_size=_get(d, "intermediate_size", dflt),
      num_layers=_get(d, "num_hidden_layers", dflt),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=_get(d, "head_dim", dflt) or hidden // heads,
      rms_norm_eps=float(_get(d, "rms_norm_eps", dflt)),
      rope_theta=float(theta),
      max_position_embeddings=_get(d, "max_position_embeddings", dflt),
      attention_bias=bool(_get(d, "attention_bias", dflt)),
      tie_word_embeddings=bool(_get(d, "tie_word_embeddings", dflt)),
      bos_token_id=_get(d, "bos_token_id", dflt),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      router_layers=tuple(d.get("mod_router_layers", ())),
      router_alpha=float(d.get("mod_router_alpha", 0.2)),
      router_ratios=tuple(d.get("mod_router_ratios", ())))


def from_hf_dict(d: dict[str, Any]) -> LlavaConfig:
  """Reads a Hugging Face LLaVA, LLaVA-NeXT or LLaVA-OneVision `config.json` (sparse
  4.36-style or dense 5.x-style)."""
  arch = d.get("model_type", "llava")
  if arch not in ARCHS:
    raise ConfigError(f"model_type {arch!r} is not a LLaVA checkpoint; this loader reads "
                      f"{', '.join(ARCHS.values())} directories.")
  ov = arch == "llava_onevision"
  layer = d.get("vision_feature_layer", -1 if ov else -2)
  if not isinstance(layer, int):
    raise ConfigError(f"vision_feature_layer {layer!r}: only a single layer index is supported.")
  vision_d = d.get("vision_config") or (_OV_DEFAULT_VISION if ov else _LLAVA_DEFAULT_VISION)
  text_d = dict(d.get("text_config") or {"model_type": "qwen2" if ov else "llama"})
  # Older configs keep the vocabulary size and tie flag at the top level.
  for key in ("vocab_size", "tie_word_embeddings"):
    if key not in text_d and key in d:
      text_d[key] = d[key]
  pinpoints = d.get("image_grid_pinpoints") or {
      "llava": (), "llava_next": _NEXT_PINPOINTS, "llava_onevision": _OV_PINPOINTS}[arch]
  image_token = 151646 if ov else 32000
  return LlavaConfig(
      vision=vision_from_hf(vision_d),
      text=text_from_hf(text_d),
      image_token_id=d.get("image_token_index", d.get("image_token_id", image_token)),
      pad_token_id=d.get("pad_token_id"),
      vision_feature_layer=layer,
      vision_feature_select=d.get("vision_feature_select_strategy",
                                  "full" if ov else "default"),
      projector_hidden_act=d.get("projector_hidden_act", "gelu"),
      projector_bias=d.get("multimodal_projector_bias", True),
      template=d.get("conversation_template"),
      arch=arch,
      image_grid_pinpoints=tuple(tuple(p) for p in pinpoints),
      vision_aspect_ratio=d.get("vision_aspect_ratio", "anyres_max_9" if ov else "anyres"),
      video_token_id=d.get("video_token_index", d.get("video_token_id", 151647 if ov else None)))


def to_hf_dict(cfg: LlavaConfig) -> dict[str, Any]:
  """A dense transformers-5 style `config.json` for `cfg`."""
  v, t = cfg.vision, cfg.text
  vision = dict(
      model_type="clip_vision_model" if v.kind == "clip" else "siglip_vision_model",
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
      num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
      image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
      layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
  if v.kind == "siglip":
    vision["vision_use_head"] = False
  text = dict(
      model_type=t.kind, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
      intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
      num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
      head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, hidden_act="silu",
      rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta),
      max_position_embeddings=t.max_position_embeddings,
      tie_word_embeddings=t.tie_word_embeddings,
      bos_token_id=t.bos_token_id,
      eos_token_id=list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id)
  if t.kind == "llama":
    text["attention_bias"] = t.attention_bias
  if t.router_layers:  # p-MoD; transformers keeps unknown fields and ignores them
    text["mod_router_layers"] = list(t.router_layers)
    text["mod_router_alpha"] = t.router_alpha
    if t.router_ratios:
      text["mod_router_ratios"] = list(t.router_ratios)
  extra = {} if cfg.template is None else {"conversation_template": cfg.template}
  if cfg.arch != "llava":
    extra["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
  if cfg.arch == "llava_onevision":
    extra.update(vision_aspect_ratio=cfg.vision_aspect_ratio,
                 video_token_index=cfg.video_token_id)
  return dict(
      architectures=[ARCHS[cfg.arch]], model_type=cfg.arch,
      vision_config=vision, text_config=text,
      image_token_index=cfg.image_token_id, pad_token_id=cfg.pad_token_id,
      vision_feature_layer=cfg.vision_feature_layer,
      vision_feature_select_strategy=cfg.vision_feature_select,
      projector_hidden_act=cfg.projector_hidden_act,
      multimodal_projector_bias=cfg.projector_bias,
      image_seq_length=cfg.num_image_tokens,
      tie_word_embeddings=t.tie_word_embeddings, **extra)
