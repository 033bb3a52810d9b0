"""Human-readable cost tables for a request."""

from __future__ import annotations

from typing import Any


def _si(value: float, unit: str) -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3f} {prefix}{unit}"
  return f"{value:.0f} {unit}"


def cost_table(tokens: dict[str, int], cost: dict[str, Any],
               timings: dict[str, float] | None = None) -> str:
  """tokens: named token counts; cost: `Pipeline.cost` output; timings: seconds."""
  flops = cost["flops"]
  rows = [(name, str(count)) for name, count in tokens.items()]
  rows += [
      ("prefill FLOPs, vision tower", _si(flops.vision.total, "FLOP")),
      ("prefill FLOPs, projector", _si(flops.projector.total, "FLOP")),
      ("prefill FLOPs, LLM layers", _si(flops.llm.total, "FLOP")),
      ("prefill FLOPs, LM head", _si(flops.lm_head.total, "FLOP")),
      ("prefill FLOPs, total", _si(flops.total, "FLOP")),
      ("KV cache after generation", _si(cost["kv_bytes"].total, "B")),
  ]
  for name, seconds in (timings or {}).items():
    rows.append((name, f"{seconds * 1e3:.1f} ms"))
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
