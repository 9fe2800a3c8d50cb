"""Decode speed on Llama-3.1-8B shapes (random weights): bf16 vs fp8 / int8_sq / int4_awq (GPU only).

Every quantized model goes the way a user's does: quantkit.quantize.quantize_model (ModelOpt, calibrated on a
few random-token batches, on the GPU) -> quantkit.export.export_hf -> quantkit.runtime.load_quantized ->
quantkit.bench.bench_model (static KV cache, compiled regions, CUDA-graph decode step). The TensorRT-LLM export is
skipped here to save time: it does not change what the HF checkpoint holds (the HF exporter applies the same q/k/v
rewrite to its own copy).

Bandwidth share = measured decode tokens/s over the memory-bound limit: a decode step must read every weight it
uses once (runtime.weight_bytes: quantized layers as stored, lm_head, norms; not the embedding table) and the
K/V of the tokens attended (average context input_len + output_len / 2), at the device-to-device copy rate
(bytes read + written) measured in the same run.

Compile scopes (quantkit.bench, `bench.compile`): `--compile-scope layers,regions` benchmarks every method under
each scope on the same model (built and quantized once); vs bf16 compares with bf16 under the same scope, and the
table adds the step time, compile seconds (the warm-up steps) and the graphs torch.compile made.

    python bench/llama8b_speed.py [--methods bf16,fp8,int8_sq,int4_awq] [--layers 32] [--batch 1,8]
        [--input-len 1024] [--output-len 128] [--compile-scope layers[,regions,none]] [--json out.json]
        [--md RESULTS.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantkit.bench import bench_model
from quantkit.recipe import BenchSection, CompileScope

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def no_modelopt_jit() -> None:
    """ModelOpt JIT-compiles CUDA extensions for fake quantization on first use (minutes); without them it uses
    its pure-PyTorch path (same arithmetic). Calibration here is a few batches, so skip the build."""
    from modelopt.torch.quantization import extensions as ext

    for fn in (ext.get_cuda_ext, ext.get_cuda_ext_fp8, ext.get_cuda_ext_mx):
        fn.extension = None


def copy_bandwidth(dev: torch.device, gib: float = 2.0) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median of 20)."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    times = []
    for i in range(25):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t)
    times.sort()
    del a, b
    empty_cache(dev)
    return 2 * n * 2 / times[len(times) // 2]


def empty_cache(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


TINY = False  # --tiny: small shapes, for a CPU smoke test of this script


def llama8b_config(layers: int):
    from transformers import LlamaConfig

    if TINY:
        return LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def random_model(layers: int, dev: torch.device, seed: int = 0):
    """bf16 Llama with HF's init (normal, std 0.02; norms 1): random, never zeros."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(llama8b_config(layers), dtype=torch.bfloat16)
    return model.eval()


def kv_bytes_per_step(cfg, batch: int, input_len: int, output_len: int) -> float:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ctx = input_len + output_len / 2
    return 2 * cfg.num_key_value_heads * head_dim * 2 * ctx * batch * cfg.num_hidden_layers


def quantized(method: str, layers: int, dev: torch.device, workdir: Path, calib_batches: int, calib_len: int):
    from quantkit.calibration import CalibrationSet
    from quantkit.export import export_hf
    from quantkit.quantize import quantize_model
    from quantkit.recipe import QuantizeSection
    from quantkit.runtime import load_quantized

    model = random_model(layers, dev)
    ids = torch.randint(0, model.config.vocab_size, (calib_batches * 2, calib_len),
                        generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    section = QuantizeSection(method=method, block_size=128 if "int4" in method else None)
    model = quantize_model(model, section, CalibrationSet(ids, 2, "random"))
    tq = time.perf_counter() - t
    out = workdir / method
    t = time.perf_counter()
    export_hf(model, out, "bfloat16")
    te = time.perf_counter() - t
    del model
    empty_cache(dev)
    t = time.perf_counter()
    qmodel, _ = load_quantized(out, dev, torch.bfloat16)
    tl = time.perf_counter() - t
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out, ignore_errors=True)
    say(f"{method}: quantize {tq:.1f}s, export_hf {te:.1f}s, load {tl:.1f}s, checkpoint {size / 2**30:.2f} GiB")
    return qmodel, {"quantize_s": tq, "export_s": te, "load_s": tl, "checkpoint_bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="bf16,fp8,int8_sq,int4_awq")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true", help="same as --compile-scope none")
    ap.add_argument("--compile-scope", default=BenchSection().compile,
                    help="comma-separated bench.compile scopes to compare: layers, regions, none")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes (smoke test of the script, CPU is fine)")
    ap.add_argument("--workdir", default="/dev/shm/quantkit-8b" if Path("/dev/shm").is_dir() else "/tmp/quantkit-8b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also list the kernels of a decode step (torch.profiler over STEPS steps)")
    args = ap.parse_args()

    global TINY
    TINY = args.tiny
    dev = torch.device(args.device)
    no_modelopt_jit()
    from quantkit.bench import card_name

    card = card_name(dev)
    import transformers

    from quantkit.kernels.libs import version

    say(f"card {card}; torch {torch.__version__}, triton {version('triton')}, gemlite {version('gemlite')}, "
        f"transformers "
        f"{transformers.__version__}")
    bw = copy_bandwidth(dev)
    say(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
    batches = [int(b) for b in args.batch.split(",")]
    scopes = parse_scopes("none" if args.no_compile else args.compile_scope)
    section = BenchSection(batch_sizes=batches, input_len=args.input_len, output_len=args.output_len, warmup=1,
                           repeats=args.repeats)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = llama8b_config(args.layers)
    rows: list[dict] = []
    runs: dict[str, dict] = {}
    for method in args.methods.split(","):
        model = None
        try:
            if method == "bf16":
                model, info = random_model(args.layers, dev), {}
            else:
                model, info = quantized(method, args.layers, dev, workdir, args.calib_batches, args.calib_len)
            for scope in scopes:
                try:
                    res = bench_model(model, None, section, dev, compile=scope, profile_steps=args.profile)
                except Exception:
                    say(f"{method} [{scope}] FAILED:\n{traceback.format_exc()}")
                    continue
                res.update(info)
                key = run_key(method, scope, scopes)
                runs[key] = res
                rows.extend(speed_rows(method, scope, key, res, cfg, args, bw))
                say(f"{key}: " + ", ".join(f"b{r['batch_size']} {r['decode_tok_s']:.1f} tok/s "
                                           f"(graph={r['cuda_graph']}, compile {r['compile_s']:.0f} s, "
                                           f"{r['compiled_graphs']} graphs)" for r in res["results"])
                    + f"; kernels {res['kernels']}")
                report(rows, runs, args, card, bw)  # after every run: a session cut short keeps what it measured
        except Exception:
            say(f"{method} FAILED:\n{traceback.format_exc()}")
        finally:
            model = None
            empty_cache(dev)


def parse_scopes(text: str) -> list[CompileScope]:
    from typing import get_args

    scopes = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in scopes if t not in get_args(CompileScope)]
    if bad or not scopes:
        raise SystemExit(f"--compile-scope: {bad or text!r} not among {get_args(CompileScope)}")
    return scopes  # type: ignore[return-value]


def run_key(method: str, scope: str, scopes: list[str]) -> str:
    return method if len(scopes) == 1 else f"{method} [{scope}]"


def speed_rows(method: str, scope: str, key: str, res: dict, cfg, args: argparse.Namespace,
               bw: float) -> list[dict]:
    rows = []
    for r in res["results"]:
        wbytes = res["weight_bytes_per_step"]
        step_bytes = wbytes + kv_bytes_per_step(cfg, r["batch_size"], args.input_len, args.output_len)
        limit = r["batch_size"] * bw / step_bytes
        rows.append({"method": method, "scope": scope, "batch": r["batch_size"], "decode_tok_s": r["decode_tok_s"],
                     "step_ms": r["decode_step_ms"], "limit_tok_s": limit, "share": r["decode_tok_s"] / limit,
                     "prefill_tok_s": r["prefill_tok_s"], "ttft_ms": 1e3 * r["ttft_s"],
                     "peak_gpu_gib": (r["peak_gpu_mb"] or 0) / 1024, "weight_gib": wbytes / 2**30,
                     "cuda_graph": r["cuda_graph"], "graph_error": r["graph_error"], "prepare_s": r["prepare_s"],
                     "compile_s": r["compile_s"], "compiled_graphs": r["compiled_graphs"], "key": key,
                     "inductor": res.get("inductor") or {}})
    return rows


def emulated(run: dict) -> bool:
    """A method whose decode runs the dequantize reference path (w4a8, nvfp4 on this card): labelled as such."""
    return any(k.split("/")[1].startswith(("decode:dequant", "m1:dequant")) for k in run.get("kernels", {}))


def kernel_table(runs: dict[str, dict]) -> str:
    """Which kernel, from which library and version, ran each method's quantized layers (runtime.kernel_summary:
    regime m1 = M 1, decode = M <= 16, prefill = M > 16)."""
    from quantkit.runtime import kernel_origin

    lines = ["| method | layers | regime: kernel (library) |", "|---|---:|---|"]
    seen: set[str] = set()
    for name, run in runs.items():
        method = name.split(" [")[0]  # the same kernels under every compile scope: listed once
        if method in seen:
            continue
        seen.add(method)
        for key, n in sorted(run.get("kernels", {}).items()):
            fmt, rest = key.split("/", 1)
            regime, kernel = rest.split(":", 1)
            label = kernel if "(" in kernel else f"{kernel} ({kernel_origin(kernel)})"
            lines.append(f"| {method} ({fmt}) | {n} | {regime}: {label} |")
    return "\n".join(lines)


def step_kernel_tables(runs: dict[str, dict]) -> str:
    """Where a decode step's time goes (--profile): its kernels per method and batch size, longest first."""
    out = []
    for name, run in runs.items():
        for r in run["results"]:
            if not r.get("step_kernels"):
                continue
            total = sum(k["us"] for k in r["step_kernels"])
            out.append(f"\n\n{name}, batch {r['batch_size']}: kernels of one decode step ({total:.0f} us of GPU time "
                       f"in all; step {1e3 * r['decode_step_ms']:.0f} us)\n\n| kernel | us / step | launches / step |"
                       "\n|---|---:|---:|")
            out.extend(f"| `{k['kernel'][:90]}` | {k['us']:.1f} | {k['calls']:.0f} |" for k in r["step_kernels"])
    return "\n".join(out)


def report(rows: list[dict], runs: dict[str, dict], args: argparse.Namespace, card: str, bw: float) -> None:
    import transformers

    from quantkit.kernels.libs import version

    base = {(r["scope"], r["batch"]): r["decode_tok_s"] for r in rows if r["method"] == "bf16"}
    for r in rows:  # vs bf16 under the same compile scope
        b = base.get((r["scope"], r["batch"]))
        r["vs_bf16"] = r["decode_tok_s"] / b if b else None
        r["emulated"] = emulated(runs[r["key"]])
    header = ("| method | compile | batch | step ms | decode tok/s | vs bf16 | share of bandwidth limit | "
              "limit tok/s | prefill tok/s | TTFT ms | weights GiB | peak GPU GiB | compile s | graphs |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs = f"{r['vs_bf16']:.2f}x" if r["vs_bf16"] else "–"
        name = f"{r['method']} (emulated: dequantize path, no real kernel)" if r["emulated"] else r["method"]
        scope = r["scope"] + (" + " + ", ".join(r["inductor"]) if r["inductor"] else "")  # e.g. tuning on
        lines.append(f"| {name} | {scope} | {r['batch']} | {r['step_ms']:.2f} | {r['decode_tok_s']:.1f} | {vs} | "
                     f"{100 * r['share']:.0f}% | {r['limit_tok_s']:.0f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['ttft_ms']:.0f} | {r['weight_gib']:.2f} | {r['peak_gpu_gib']:.1f} | {r['compile_s']:.1f} | "
                     f"{r['compiled_graphs']} |")
    table = "\n".join(lines) + "\n\n" + kernel_table(runs) + step_kernel_tables(runs)
    print(f"\nLlama-3.1-8B shapes ({args.layers} layers), random weights, {card}; input {args.input_len}, output "
          f"{args.output_len}; copy bandwidth {bw / 1e9:.0f} GB/s\n{table}")
    meta = {"card": card, "copy_gb_s": bw / 1e9, "torch": torch.__version__, "triton": version("triton"),
            "gemlite": version("gemlite"), "transformers": transformers.__version__, "layers": args.layers,
            "input_len": args.input_len,
            "output_len": args.output_len, "rows": rows,
            "runs": {k: {kk: vv for kk, vv in v.items() if kk != "settings"} for k, v in runs.items()},
            "wall_s": time.perf_counter() - T0}
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=1, default=str))
    if args.md:
        Path(args.md).write_text(f"# Llama-3.1-8B shapes, decode speed\n\nCard: **{card}** (copy {bw / 1e9:.0f} GB/s)"
                                 f", torch {torch.__version__}, triton {version('triton')}, gemlite "
                                 f"{version('gemlite')}.\n\n{table}\n")


if __name__ == "__main__":
    main()
