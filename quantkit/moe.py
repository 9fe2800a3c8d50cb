"""Mixture of experts: how many calibration tokens each expert saw.

An expert the router never picks during calibration gets no activation statistics (its scales fall back to the
weights alone, or to the other experts' shared input scale) and no AWQ search: its quantization is untested by
the data. ModelOpt's hf_ptq example reports the same count (`expert_token_count`,
`modelopt.torch.export.moe_utils.save_expert_token_count_table`). The router is named by the family file
(`moe_router`); its picks are read from its output, as ModelOpt's `_QuantSparseSequentialMoe._gate_forward_hook`
does: transformers 5 routers return (logits, scores, indices), older ones the logits (top-k taken here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantkit.archs import family

log = logging.getLogger(__name__)


def find_routers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    suffix = family(getattr(model.config, "model_type", "")).moe_router
    if suffix is None:
        return {}
    return {n: m for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)}


def _num_experts(router: torch.nn.Module) -> int:
    for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
        if isinstance(getattr(router, attr, None), int):
            return getattr(router, attr)
    return int(router.weight.shape[0])  # a plain nn.Linear router: one output per expert


class ExpertTokenCounter:
    """Counts router picks per expert over the first calibration pass (AWQ and SmoothQuant's search run the
    loop again over the same data; counting once keeps the numbers in tokens)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = find_routers(model)
        self.counts = {n: torch.zeros(_num_experts(r), dtype=torch.long) for n, r in self.routers.items()}
        self._passes = 0

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, tuple) and len(output) >= 3:
                indices = output[2]
            else:
                logits = output[0] if isinstance(output, tuple) else output
                top_k = getattr(module, "top_k", None) or getattr(module, "num_experts_per_tok", 1)
                indices = logits.float().topk(top_k, dim=-1).indices
            counts = torch.bincount(indices.reshape(-1).cpu(), minlength=self.counts[name].numel())
            self.counts[name] += counts[: self.counts[name].numel()]
        return hook

    def wrap(self, forward_loop: Callable[[torch.nn.Module], None]) -> Callable[[torch.nn.Module], None]:
        def loop(model: torch.nn.Module) -> None:
            self._passes += 1
            if self._passes > 1 or not self.routers:
                return forward_loop(model)
            # hooks go on at run time: ModelOpt has converted the modules by then
            mods = dict(model.named_modules())
            hooks = [mods[n].register_forward_hook(self._hook(n)) for n in self.routers]
            try:
                forward_loop(model)
            finally:
                for h in hooks:
                    h.remove()
        return loop


def coverage(counts: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Summary for the quantize manifest entry (empty for a dense model)."""
    if not counts:
        return {}
    starved = {n: [i for i, c in enumerate(t.tolist()) if c == 0] for n, t in counts.items()}
    starved = {n: idx for n, idx in starved.items() if idx}
    total = sum(t.numel() for t in counts.values())
    n_starved = sum(len(v) for v in starved.values())
    return {
        "moe_layers": len(counts),
        "experts": total,
        "experts_with_calibration_tokens": total - n_starved,
        "expert_tokens_min": min(int(t.min()) for t in counts.values()),
        "experts_without_calibration_tokens": starved,
        "expert_token_counts": {n: t.tolist() for n, t in counts.items()},
    }


def record_expert_coverage(model: torch.nn.Module, run_quantize_dir: Path | None = None) -> dict[str, Any]:
    """What the pipeline writes into the quantize entry; warns when some experts saw no calibration token.
    The per-expert table goes to quantize/expert_tokens.json when a folder is given (it can be large)."""
    from quantkit.runfolder import atomic_write_json

    info = coverage(getattr(model, "quantkit_expert_tokens", {}))
    if not info:
        return {}
    if info["experts_without_calibration_tokens"]:
        log.warning("%d of %d experts saw no calibration token (%s): their quantization is not calibrated on "
                    "data; use more or longer calibration samples (calibration.n_samples / seq_len)",
                    info["experts"] - info["experts_with_calibration_tokens"], info["experts"],
                    ", ".join(f"{n}: {v}" for n, v in list(info["experts_without_calibration_tokens"].items())[:3]))
    if run_quantize_dir is not None:
        atomic_write_json(run_quantize_dir / "expert_tokens.json", info.pop("expert_token_counts"))
        info["expert_token_counts"] = "quantize/expert_tokens.json"
    return info
