"""SmoothQuant with a per-layer migration strength (`smoothquant_alpha: auto`).

ModelOpt's `smoothquant` applies one alpha to every layer. Following the SmoothQuant paper's strength
search, this driver collects the same statistics ModelOpt does (per-channel activation max via
`max_calibrate`), keeps a sample of each layer's real inputs, and picks per layer the alpha from a grid
that minimises the layer's output error under int8 weights (per channel) and int8 activations (per token
or per tensor, as the recipe says). The chosen smoothing is then applied with ModelOpt's own
`apply_pre_quant_scale_and_smooth`, so export and checking see exactly what ModelOpt's SmoothQuant writes.
"""

from __future__ import annotations

import torch

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SAMPLE_ROWS = 1024  # input rows kept per layer for the search (tokens x batch, from the first batches)


def _fake_int8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = amax.clamp(min=1e-8) / 127.0
    return (x / scale).round().clamp(-128, 127) * scale


def layer_error(x: torch.Tensor, w: torch.Tensor, act_amax: torch.Tensor, alpha: float, per_token: bool) -> float:
    """Mean squared output error of one linear under int8 SmoothQuant with strength `alpha`."""
    weight_max = w.abs().amax(dim=0)
    s = (weight_max.pow(1 - alpha) / act_amax.clamp(min=1e-8).pow(alpha)).clamp(1e-4, 1e4)  # ModelOpt's scale_a
    xs, ws = x * s, w / s
    wq = _fake_int8(ws, ws.abs().amax(dim=1, keepdim=True))
    xq = _fake_int8(xs, xs.abs().amax(dim=1, keepdim=True) if per_token else (act_amax * s).amax())
    return float((xq @ wq.T - x @ w.T).pow(2).mean())


@torch.no_grad()
def smoothquant_auto(model: torch.nn.Module, forward_loop, per_token: bool,
                     grid: tuple[float, ...] = ALPHA_GRID) -> dict[str, float]:
    """Calibrate and smooth `model` (already converted by mtq.quantize with algorithm None); return alphas."""
    from modelopt.torch.quantization.model_calib import max_calibrate
    from modelopt.torch.quantization.utils import is_quantized_linear
    from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback

    linears = {n: m for n, m in model.named_modules()
               if is_quantized_linear(m) and m.input_quantizer.is_enabled and m.input_quantizer.num_bits == 8}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in linears}

    def keep(name: str):
        def hook(_module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            have = sum(len(t) for t in samples[name])
            if have < SAMPLE_ROWS:
                samples[name].append(rows[: SAMPLE_ROWS - have].float().cpu())
        return hook

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in linears.items()]
    for m in linears.values():
        m.input_quantizer.axis = -1  # per-channel activation statistics, as ModelOpt's smoothquant does
    try:
        max_calibrate(model, forward_loop)
    finally:
        for h in handles:
            h.remove()

    chosen: dict[str, float] = {}
    name_to_module = dict(model.named_modules())
    for name, m in linears.items():
        # Offloaded (accelerate) layers keep their weights on meta between forwards: materialize, write back.
        with enable_weight_access_and_writeback(m, model, name_to_module):
            chosen[name] = _smooth_layer(m, samples.pop(name), grid, per_token)
    return chosen


def _smooth_layer(m: torch.nn.Module, rows: list[torch.Tensor], grid: tuple[float, ...], per_token: bool) -> float:
    """Pick this layer's alpha from its sampled inputs and smooth it (weights must be resident)."""
    from modelopt.torch.quantization.model_calib import apply_pre_quant_scale_and_smooth

    act_amax = m.input_quantizer.amax.float().flatten()
    w = m.weight.float()
    x = torch.cat(rows).to(w.device)
    errors = {a: layer_error(x, w, act_amax.to(w.device), a, per_token) for a in grid}
    alpha = min(errors, key=errors.get)
    # The rest mirrors modelopt.torch.quantization.model_calib.smoothquant's postprocess, with this alpha.
    scale = (w.abs().amax(dim=0, keepdim=True).pow(1 - alpha) / act_amax.pow(alpha)).squeeze()
    scale[act_amax <= 1.0 / (1 << 31)] = 1
    scale = scale.clamp(min=1e-4, max=1e4)
    q = m.input_quantizer
    q._amax_for_smoothing = act_amax.cpu()
    q.reset_amax()
    q.axis = None
    q.amax = act_amax.amax().to(dtype=m.weight.dtype, device=m.weight.device)
    apply_pre_quant_scale_and_smooth(m, scale)
    return alpha
