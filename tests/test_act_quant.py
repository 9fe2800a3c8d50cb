"""Per-token int8 activation quantization in one Triton kernel (kernels/triton_act_quant.py, int8_sq at M <= 16).

Ground truth is the torch arithmetic the reference path and ModelOpt's dynamic quantizer use
(runtime.per_token_scale + runtime.quantize_int8): the kernel must give the same int8 values and the same fp32
scales bit for bit, in Triton's interpreter on CPU and (QUANTKIT_TEST_DEVICE=cuda) compiled on the GPU at the
Llama-3.1-8B widths, on rows with ties (x / scale = n + 0.5 rounds to even), all-zero rows and strided input; the
plan takes it only for per-token layers, and under torch.compile it returns what it returns eagerly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

_SCRIPT = r"""
import json, os, torch
from quantkit import runtime
from quantkit.kernels import triton_act_quant as aq
g = torch.Generator().manual_seed(0)
out = []
runtime_rel_err = lambda got, ref: ((got - ref).norm() / ref.norm()).item()
dev = torch.device(os.environ.get("QK_DEV", "cpu"))
widths = [int(k) for k in os.environ.get("QK_WIDTHS", "16,688,4096,14336").split(",")]
for k in widths:
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(4, k, generator=g) * torch.rand(4, 1, generator=g) * 20
        x[1] = 0.0  # an all-zero row: scale 1, zeros
        x[2] = torch.arange(k).remainder(11).sub(5).mul(0.5)  # halves ...
        x[2, 0] = 127.0  # ... with scale 1: every half is a tie
        x = x.to(dt)
        wide = torch.cat([x, x], dim=1)[:, k // 2: k // 2 + k]  # strided rows (a slice of a wider tensor)
        for name, inp in (("contiguous", x), ("strided", wide)):
            q, s = aq.quantize_int8_rows(inp.to(dev))
            s_ref = runtime.per_token_scale(inp, 127.0)
            q_ref = runtime.quantize_int8(inp, s_ref)
            out.append(["kernel", k, str(dt), name, torch.equal(q.cpu(), q_ref), torch.equal(s.cpu(), s_ref),
                        int((q.cpu().int() - q_ref.int()).abs().max()), list(q.shape), list(s.shape)])
# the ties of row 2 at scale 1, as values: round half to even
t = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] + [0.0] * 8], device=dev)
out.append(["ties", aq.quantize_int8_rows(t)[0][0, :8].tolist()])
# through QuantLinear (int8_sq, float32): per-token layers take the kernel, static ones do not, and the layer's
# activations and output are those of the torch path
if dev.type == "cpu":
    k, n = 256, 48
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 1e-2 + 1e-3
    x = torch.randn(1, k, generator=g)
    lays = {}
    for label, env, static in (("pt", "triton", False), ("pt_torch", "torch", False), ("static", "triton", True)):
        os.environ["QUANTKIT_ACT_QUANT"] = env
        t = {"weight": w, "weight_scale": ws, **({"input_scale": torch.tensor(0.02)} if static else {})}
        lays[label] = runtime.QuantLinear("int8_sq", t, k, n, torch.float32, dev)
    got, ref = lays["pt"]._quantized_input(x), lays["pt_torch"]._quantized_input(x)
    out.append(["layer", {k_: v.kernels.get("act_quant") for k_, v in lays.items()},
                torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]),
                torch.equal(lays["pt"](x), lays["pt_torch"](x)),
                runtime_rel_err(lays["pt"](x), lays["pt"]._dequant_forward(x))])
    # compiled (Inductor, CPU): the custom op's declared outputs are what it returns
    f = torch.compile(lambda v: aq.quantize_int8_rows(v * 2.0), fullgraph=True, dynamic=False)
    cq, cs = f(x)
    eq, es = aq.quantize_int8_rows(x * 2.0)
    out.append(["compiled", torch.equal(cq, eq) and torch.equal(cs, es), str(cq.dtype), list(cs.shape)])
print("RESULT " + json.dumps(out))
"""


def _run(env: dict[str, str]) -> list:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):])


def _check_kernel_rows(rows: list, widths: set[int]) -> None:
    kernel = [r for r in rows if r[0] == "kernel"]
    assert {r[1] for r in kernel} == widths and len(kernel) == 4 * len(widths)
    for _, k, dt, name, q_same, s_same, worst, q_shape, s_shape in kernel:
        assert q_same and s_same, (k, dt, name, worst)
        assert q_shape == [4, k] and s_shape == [4, 1]
    assert next(r for r in rows if r[0] == "ties")[1] == [127, 0, 2, 2, 0, -2, -2, 4]


def test_kernel_equals_the_torch_arithmetic_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    rows = _run({"TRITON_INTERPRET": "1", "QUANTKIT_TEST_DEVICE": "cpu", "QK_DEV": "cpu"})
    _check_kernel_rows(rows, {16, 688, 4096, 14336})
    _, plans, same_input, same_output, err = next(r for r in rows if r[0] == "layer")
    assert plans == {"pt": "triton_int8_rows", "pt_torch": None, "static": None}
    assert same_input and same_output
    assert err < 1e-5  # and the layer still reproduces its dequantize reference
    _, same, dtype, s_shape = next(r for r in rows if r[0] == "compiled")
    assert same and dtype == "torch.int8" and s_shape == [1, 1]


@pytest.mark.skipif(os.environ.get("QUANTKIT_TEST_DEVICE") != "cuda" or not torch.cuda.is_available(),
                    reason="the compiled kernel on the GPU (QUANTKIT_TEST_DEVICE=cuda)")
def test_kernel_equals_the_torch_arithmetic_on_the_gpu() -> None:
    rows = _run({"QK_DEV": "cuda", "QK_WIDTHS": "4096,14336,688"})
    _check_kernel_rows(rows, {4096, 14336, 688})
