"""The decode step's attention kernel (kernels/triton_attention.py), in Triton's interpreter on CPU (float32).

Ground truth: PyTorch's SDPA on K/V heads repeated per query head (transformers' repeat_kv), with the same boolean
mask. Cases: grouped and plain multi-head attention, caches whose length is not a multiple of the chunk, chunks
with nothing to attend (the unused tail of a static cache) and a sliding window (oldest positions masked); then a
whole decode loop of tiny Llama and Mistral models through runtime.gqa_sdpa_attention must give SDPA's tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = r"""
import json, torch
from quantkit.kernels import triton_attention as ta
from quantkit.bench import Generator
from quantkit.runtime import use_quantkit_attention
from _families import tiny_model
from _runtime_helpers import tiny_llama
torch.manual_seed(0)
out = {"kernel": [], "tokens": {}}
for b, hq, hkv, d, L, lens in [(2, 8, 2, 64, 100, [37, 100]), (1, 4, 4, 32, 200, [1]),
                               (3, 6, 2, 16, 130, [130, 64, 65]), (1, 32, 8, 128, 1152, [1030])]:
    q = torch.randn(b, hq, 1, d); k = torch.randn(b, hkv, L, d); v = torch.randn(b, hkv, L, d)
    keep = torch.zeros(b, L, dtype=torch.bool)
    for i, n in enumerate(lens):
        keep[i, :n] = True
    if b == 3:
        keep[2, :10] = False  # a sliding window
    got = ta.decode_attention(q, k, v, keep, d ** -0.5)
    rep = hq // hkv
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                           attn_mask=keep[:, None, None, :], scale=d ** -0.5)
    chunk, splits = ta.chunking(b, hkv, L)
    empty = sum(1 for i in range(b) for s in range(splits) if not keep[i, s * chunk:(s + 1) * chunk].any())
    out["kernel"].append([b, hq, hkv, d, L, splits, empty, (got - ref).abs().max().item() / ref.abs().max().item()])
calls = []
kernel = ta.decode_attention
ta.decode_attention = lambda *a: calls.append(1) or kernel(*a)  # count what the model runs through it
for kind in ("llama", "mistral"):
    model = tiny_llama(initializer_range=0.2, num_hidden_layers=3) if kind == "llama" else tiny_model(
        "mistral", initializer_range=0.2)
    use_quantkit_attention(model)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    res = {}
    for choice in ("sdpa", "triton"):
        import os
        os.environ["QUANTKIT_DECODE_ATTENTION"] = choice
        with torch.inference_mode():
            gen = Generator(model, 2, 9 + 10 + 40, torch.device("cpu"), False)  # a cache longer than the run
            gen.prepare(ids)
            before = len(calls)
            res[choice] = gen.generate(ids, 10)[0].tolist()
            res[choice + "_kernel_calls"] = len(calls) - before
    out["tokens"][kind] = res
print("RESULT " + json.dumps(out))
"""


def test_decode_attention_matches_sdpa_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "QUANTKIT_TEST_DEVICE": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    print(res)
    for *shape, err in res["kernel"]:
        assert err < 1e-5, (shape, err)
    assert any(r[5] > 1 for r in res["kernel"]) and any(r[6] > 0 for r in res["kernel"])  # split; skipped chunks
    for kind, tokens in res["tokens"].items():
        assert tokens["triton"] == tokens["sdpa"], kind
        assert tokens["sdpa_kernel_calls"] == 0 and tokens["triton_kernel_calls"] > 0  # 9 steps x layers
        assert len({t for row in tokens["sdpa"] for t in row}) > 3  # not a constant output


def test_decode_attention_on_cuda_matches_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled kernel on the GPU (QUANTKIT_TEST_DEVICE=cuda): bf16 Llama-3-8B attention shapes against SDPA in
    float32, and a tiny float32 Llama's greedy tokens with the kernel against SDPA's."""
    import torch
    from _runtime_helpers import device_under_test, tiny_llama

    from quantkit.bench import Generator
    from quantkit.kernels import triton_attention as ta
    from quantkit.runtime import use_quantkit_attention

    dev = device_under_test()
    if dev.type != "cuda":
        pytest.skip("the compiled kernel: run with QUANTKIT_TEST_DEVICE=cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for b, length in ((1, 1152), (8, 1152), (2, 4096)):
        q, k, v = (torch.randn(b, h, n, 128, device=dev, generator=g, dtype=torch.bfloat16)
                   for h, n in ((32, 1), (8, length), (8, length)))
        keep = torch.arange(length, device=dev)[None, :] < torch.tensor([1030, 7][:b] * b, device=dev)[:b, None]
        got = ta.decode_attention(q, k, v, keep, 128**-0.5).float()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1),
            attn_mask=keep[:, None, None, :], scale=128**-0.5)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-2, (b, length)
    model = tiny_llama(initializer_range=0.2, num_hidden_layers=3).to(dev)
    use_quantkit_attention(model)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3)).to(dev)
    tokens = {}
    for choice in ("sdpa", "triton"):
        monkeypatch.setenv("QUANTKIT_DECODE_ATTENTION", choice)
        with torch.inference_mode():
            gen = Generator(model, 2, 9 + 10 + 40, dev, False)
            gen.prepare(ids)
            tokens[choice] = gen.generate(ids, 10)[0]
    assert torch.equal(tokens["triton"], tokens["sdpa"])
