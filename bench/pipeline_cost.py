"""What `quantkit run` costs against the same job written directly on ModelOpt (GPU).

One session, one method after the other: `quantkit run` (recipe: local HF folder, local .txt calibration,
`evaluate.tasks: []`, TensorRT-LLM bf16 + HF exports) and the same job on ModelOpt (`from_pretrained(device_map=
"cuda")`, `mtq.quantize` with the config quantkit builds and the same token batches, `export_tensorrt_llm_checkpoint`
+ `export_hf_checkpoint`). Each job runs in a child process, so peak GPU (torch.cuda.max_memory_allocated) and
peak RSS (ru_maxrss) are that job's alone. For int8_sq with alpha auto the direct job also runs quantkit's per-layer
alpha search (ModelOpt's config then has no algorithm): the ratio measures the pipeline, not a different algorithm.

The model: Llama-3.1-8B shapes (hidden 4096, FFN 14336, 32 heads / 8 KV heads, vocab 128256), random bf16 weights
(normal, std 0.02), made on the GPU and saved as a local HF folder with a word-level tokenizer (about 25 s).
`--max-memory-gib X` adds an offload row per method (or per `--offload-methods`): model.max_memory {0: X GiB} in
quantkit, device_map auto with the same max_memory directly; its TensorRT-LLM export is off unless --offload-trtllm
(ModelOpt's TensorRT-LLM exporter needs every weight resident: quantkit materializes the whole model for it).
nvfp4 on a GPU before Blackwell is fake quantization (no FP4 tensor cores): its row says so.
quantkit's quantize stage is split into ModelOpt's call (seconds per pass over the data) and the resume state.

    python3 bench/pipeline_cost.py --methods fp8 int8_sq int4_awq w4a8_awq nvfp4 [--layers 32]
        [--max-memory-gib 8] [--json out.json] [--workdir /tmp/qk-cost] [--samples 128] [--seq 512]

`--json` merges into an existing file, so methods (and, with `--jobs`, the two sides of one method) can be split
over several calls of at most 10 minutes each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from quantkit.runfolder import dir_bytes  # noqa: E402 - after the path insert

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
# --small: a CPU run of this script. The vocabulary stays Llama-3.1's: what scales with it (logits over 128256
# entries, the embedding) is what the 8B table's extra peak came from.
SMALL = dict(SHAPE, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
WORDS = 20000  # word-level tokenizer: one word, one token


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gpu_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0




def make_model(folder: Path, layers: int, small: bool = False) -> float:
    """Random-weight Llama-3.1-8B-shaped model + tokenizer, saved as an HF folder; returns seconds."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    shape = {**(SMALL if small else SHAPE), "num_hidden_layers": layers}
    cfg = LlamaConfig(**shape, architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(tmp)
    tmp.rename(folder)
    return time.perf_counter() - t0


def warm_extensions() -> str:
    """Build (or load) ModelOpt's CUDA fake-quant extensions once, before any job: torch JIT-compiles them into
    ~/.cache/torch_extensions in the first process that fake-quantizes on the GPU (int8 / int4 blocks:
    modelopt_cuda_ext; fp8: modelopt_cuda_ext_fp8) and later processes load the cache. On a fresh machine that first
    process is the first job of the call, so an uncached build lands in one side's quantize stage only."""
    import contextlib
    import io

    import torch

    if not torch.cuda.is_available():
        return "no GPU: ModelOpt's CUDA extensions not used"
    from modelopt.torch.quantization import extensions

    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        built = {"modelopt_cuda_ext": extensions.get_cuda_ext(), "modelopt_cuda_ext_fp8": extensions.get_cuda_ext_fp8()}
    status = ", ".join(f"{k} {'ok' if v is not None else 'unavailable (Python fallback)'}" for k, v in built.items())
    return f"ModelOpt CUDA extensions {time.perf_counter() - t0:.1f} s before the jobs ({status})"


def make_text(path: Path, tokens: int) -> None:
    import random

    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(WORDS)}" for _ in range(1000)) for _ in range(tokens // 1000 + 10)]
    path.write_text("\n\n".join(docs) + "\n")


def recipe_dict(args, method: str, model_dir: Path, text: Path, out: Path, offload: bool) -> dict:
    model = {"source": str(model_dir), "dtype": "bfloat16"}
    if offload:
        model["max_memory"] = {"0": f"{args.max_memory_gib}GiB", "cpu": "400GiB"}
    trtllm = {"dtype": "bfloat16"} if (not offload or args.offload_trtllm) else None
    return {"metadata": {"name": f"cost-{method}"}, "model": model, "quantize": {"method": method},
            "calibration": {"dataset": str(text), "n_samples": args.samples, "seq_len": args.seq,
                            "batch_size": args.batch},
            "export": {"trtllm": trtllm, "hf": True}, "build": {"max_batch_size": 8}, "evaluate": {"tasks": []},
            "output_dir": str(out)}


def job_quantkit(args) -> dict:
    # The direct job imports these before its clock starts: so does this one (import time is not pipeline cost).
    import modelopt.torch.export
    import modelopt.torch.quantization  # noqa: F401
    import transformers  # noqa: F401
    import yaml

    from quantkit.pipeline import run_recipe
    from quantkit.recipe import load_recipe

    work = Path(args.workdir)
    out = work / "runs"
    path = work / f"recipe-{args.method}.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(args, args.method, Path(args.model_dir), Path(args.text), out,
                                               args.offload)))
    t0 = time.perf_counter()
    run_dir = run_recipe(load_recipe(path), force=True)
    _sync()
    wall = time.perf_counter() - t0
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    st = {k: stages[k]["wall_s"] for k in ("quantize", "export", "check", "build") if k in stages}
    st["load+other"] = round(wall - sum(st.values()), 2)  # before the quantize detail below turns it into text
    q = stages.get("quantize", {})
    for k in ("quantize", "export"):  # the process's peak GPU at the end of each stage: which stage made the peak
        if stages.get(k, {}).get("peak_gpu_gib") is not None:
            st[k] = f"{st[k]} [peak so far {stages[k]['peak_gpu_gib']} GiB]"
    x = stages.get("export", {})
    if "trtllm_s" in x or "hf_s" in x:  # the two exporters, as the direct job's export_trtllm / export_hf
        st["export"] = f"{st['export']} (trtllm {x.get('trtllm_s', '-')}, hf {x.get('hf_s', '-')})"
    if "quantize_s" in q:  # where the quantize stage went: ModelOpt's call (its passes over the data), resume state
        passes = "+".join(map(str, q.get("calibration_pass_s", [])))
        state = q.get("state_s", "-")
        st["quantize"] = f"{st['quantize']} (calibrate {q['quantize_s']}: passes {passes}; state {state})"
    return {"wall_s": round(wall, 2), "stages_s": st, "peak_gpu_gib": _peak_gpu_gib(),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "disk_bytes": dir_bytes(run_dir), "export_bytes": dir_bytes(run_dir / "export"),
            "state_bytes": q.get("state_bytes"), "batch_size": q.get("calibration_batch_size")}


def job_direct(args) -> dict:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.calibration import build_calibration_set, load_texts
    from quantkit.methods import build_modelopt_config, resolved_settings
    from quantkit.recipe import QuantizeSection

    work = Path(args.workdir)
    out = work / "direct"
    shutil.rmtree(out, ignore_errors=True)
    st: dict[str, float] = {}
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    calib = build_calibration_set(load_texts(args.text), tokenizer, args.samples, args.seq,
                                  args.batch if args.batch != "auto" else 8, 1234, args.text)
    st["data"] = round(time.perf_counter() - t0, 2)
    t = time.perf_counter()
    if args.offload:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, device_map="auto",
                                                     max_memory={0: f"{args.max_memory_gib}GiB", "cpu": "400GiB"})
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16,
                                                     device_map="cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    device = model.get_input_embeddings().weight.device if not args.offload else torch.device("cuda")
    st["load"] = round(time.perf_counter() - t, 2)
    section = QuantizeSection(method=args.method)
    cfg = build_modelopt_config(section)
    settings = resolved_settings(section)

    def loop(m) -> None:
        with torch.no_grad():
            for batch in calib.batches():
                m(batch.to(device))

    t = time.perf_counter()
    model = mtq.quantize(model, cfg, loop if cfg.get("algorithm") is not None else None)
    if settings.get("smoothquant_alpha") == "auto":
        from quantkit.smoothquant import smoothquant_auto

        smoothquant_auto(model, loop, per_token=settings["activations"] == "per_token")
    _sync()
    st["quantize"] = round(time.perf_counter() - t, 2)
    peak_quantize = _peak_gpu_gib()
    t = time.perf_counter()
    status = "ok"
    if not args.offload or args.offload_trtllm:
        try:
            export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.bfloat16,
                                           export_dir=out / "trtllm", inference_tensor_parallel=1)
        except Exception as exc:  # recorded, not hidden: the direct job may not support offload
            status = f"trtllm export failed: {str(exc).splitlines()[0][:120]}"
    st["export_trtllm"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out / "hf")
    _sync()
    st["export_hf"] = round(time.perf_counter() - t, 2)
    wall = time.perf_counter() - t0
    if peak_quantize:  # as in the quantkit row: the peak so far at the end of quantize
        st["quantize"] = f"{st['quantize']} [peak so far {peak_quantize:.2f} GiB]"
    return {"wall_s": round(wall, 2), "stages_s": st, "peak_gpu_gib": _peak_gpu_gib(),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "disk_bytes": dir_bytes(out), "export_bytes": dir_bytes(out), "status": status}


def child(args, job: str, method: str, offload: bool, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--job", job, "--method", method, "--workdir", args.workdir,
           "--model-dir", args.model_dir, "--text", args.text, "--samples", str(args.samples), "--seq", str(args.seq),
           "--batch", str(args.batch), "--max-memory-gib", str(args.max_memory_gib)]
    cmd += ["--offload"] if offload else []
    cmd += ["--offload-trtllm"] if args.offload_trtllm else []
    # The previous job's gigabytes may still be in the page cache, unwritten: flush them outside this job's clock
    # (the fp8 / int8_sq export gap at 8B is suspected to be that write-back).
    t0 = time.perf_counter()
    os.sync()
    synced = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout} s", "sync_before_s": synced}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "sync_before_s": synced}
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"status": f"rc {done.returncode} after {time.perf_counter() - t0:.0f} s: {' | '.join(tail)[:300]}"}


def label(method: str, card: str) -> str:
    """Row name; NVFP4 on a GPU without FP4 tensor cores (before Blackwell, sm_100) runs as fake quantization."""
    import torch

    if method == "nvfp4" and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (10, 0)):
        return f"nvfp4 (emulated on {card}: fake quantization, no FP4 tensor cores)"
    return method


def ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.2f}x" if a.get(key) and b.get(key) else "-"


def _synced(r: dict) -> str:
    """How long the flush of earlier jobs' writes took before this job started (not in its wall time)."""
    return f" (sync before: {r['sync_before_s']:.1f} s)" if r.get("sync_before_s") else ""


def table(rows: dict) -> str:
    lines = ["| method | job | wall s | stages s | peak GPU GiB | peak RSS GiB | run folder GiB | state MiB | "
             "wall ratio | GPU ratio | RSS ratio | status |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, pair in rows.items():
        qk, dr = pair.get("quantkit", {}), pair.get("direct", {})
        for job, r in (("quantkit", qk), ("direct", dr)):
            if "wall_s" not in r:
                lines.append(f"| {key} | {job} | | | | | | | | | | {r.get('status', '-')} |")
                continue
            stages = ", ".join(f"{k} {v}" for k, v in r["stages_s"].items())
            state = f"{r['state_bytes'] / 2**20:.1f}" if r.get("state_bytes") else "-"
            rat = (ratio(qk, dr, "wall_s"), ratio(qk, dr, "peak_gpu_gib"), ratio(qk, dr, "peak_rss_gib")) \
                if job == "quantkit" else ("1.00x",) * 3
            lines.append(f"| {key} | {job} | {r['wall_s']:.1f} | {stages} | {r['peak_gpu_gib']:.1f} | "
                         f"{r['peak_rss_gib']:.1f} | {r['disk_bytes'] / 2**30:.2f} | {state} | {' | '.join(rat)} | "
                         f"{r.get('status', 'ok')}{_synced(r)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="tiny hidden size: a CPU smoke run of the script")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", default="8", help="calibration batch size, or auto")
    ap.add_argument("--max-memory-gib", type=float, default=0.0, help="also run each method offloaded at this cap")
    ap.add_argument("--offload-only", action="store_true", help="only the offload rows")
    ap.add_argument("--offload-methods", nargs="+", default=None,
                    help="methods that get an offload row (default: --methods)")
    ap.add_argument("--offload-trtllm", action="store_true")
    ap.add_argument("--workdir", default="/tmp/qk-cost")
    ap.add_argument("--json", default=None)
    ap.add_argument("--timeout", type=int, default=540, help="seconds per job")
    ap.add_argument("--jobs", nargs="+", default=["quantkit", "direct"], choices=["quantkit", "direct"],
                    help="run only one side (int4_awq with awq_clip needs a call per side); --json merges them")
    ap.add_argument("--job", choices=["quantkit", "direct"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    ap.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch = args.batch if args.batch == "auto" else int(args.batch)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.job:
        result = (job_quantkit if args.job == "quantkit" else job_direct)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"llama8b-shape-{args.layers}L{'-small' if args.small else ''}"
    if not (model_dir / "config.json").is_file():
        print(f"building the model: {make_model(model_dir, args.layers, args.small):.1f} s", flush=True)
    text = work / "calib.txt"
    if not text.is_file():
        make_text(text, args.samples * args.seq)
    args.model_dir, args.text = str(model_dir), str(text)
    extensions = warm_extensions()
    print(extensions, flush=True)
    model_gib = dir_bytes(model_dir) / 2**30
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    results.setdefault("rows", {})
    results.update(card=card, layers=args.layers, model_gib=round(model_gib, 2), extensions=extensions,
                   calibration=f"{args.samples}x{args.seq} batch {args.batch}")
    offload_methods = args.offload_methods or args.methods
    variants = ([] if args.offload_only else [(m, False) for m in args.methods]) + (
        [(m, True) for m in offload_methods] if args.max_memory_gib else [])
    for method, offload in variants:
        key = label(method, card) + (f" @{args.max_memory_gib:g}GiB cap, {model_gib:.1f} GiB model" if offload else "")
        pair = results["rows"].get(key, {})
        for job in args.jobs:
            shutil.rmtree(work / "runs", ignore_errors=True)  # disk: 64 GB on the device
            shutil.rmtree(work / "direct", ignore_errors=True)
            pair[job] = child(args, job, method, offload, args.timeout)
            print(f"{key} {job}: {json.dumps(pair[job])}", flush=True)
        results["rows"][key] = pair
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(work / "direct", ignore_errors=True)
    print(f"\ncard {card}; model {args.layers} layers, {model_gib:.1f} GiB bf16; calibration {results['calibration']}; "
          f"{extensions}")
    print(table(results["rows"]))


if __name__ == "__main__":
    main()
