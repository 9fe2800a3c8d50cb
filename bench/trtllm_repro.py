"""Every method through `quantkit run` on a Llama-3.1-8B-shaped model (random bf16 weights, fewer layers), then:
both checkpoints through `quantkit check`, and the TensorRT-LLM checkpoint run through quantkit.trtllm_reference
(TensorRT-LLM's layer arithmetic, ranks merged) against the fake-quantized model the run evaluated (restored from
the run folder's quantizer_state.pth and re-shared as the pipeline does). Prints one table.

    python3 bench/trtllm_repro.py [--methods fp8,...] [--layers 4] [--mappings 1x1,2x1,1x2] [--workdir /tmp/qk-repro]
        [--json out.json] [--tiny]

Bounds are tests/test_runtime.py's 16-bit bounds. The reference has no NVFP4 path: nvfp4 is run and checked, its
reproduction reported as "n/a".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

T0 = time.perf_counter()
# method name -> quantize section overrides (int4_awq with awq_lite: the variant that writes pre-quant scales)
METHODS = {
    "none": {}, "fp8": {}, "fp8_kv": {"method": "fp8", "kv_cache": "fp8"}, "fp8_pcpt": {},
    "int8_sq": {}, "int8_sq_static": {"method": "int8_sq", "activations": "per_tensor"},
    "int4_awq": {"awq_algorithm": "awq_lite"}, "int4_rtn": {}, "w4a8_awq": {}, "int8_wo": {}, "nvfp4": {},
}
# tests/test_runtime.py's 16-bit bounds (the one home); weight-only methods take its 2e-2 too: at 8B shapes the
# float16 storage floor of tests/test_trtllm_reference.py's tiny model (2e-3) is not measured.
from test_runtime import _CUDA_BOUND  # noqa: E402

BOUND = {**_CUDA_BOUND, "none": 2e-2, "int8_sq_static": _CUDA_BOUND["int8_sq"]}


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def make_model_folder(path: Path, layers: int, tiny: bool) -> None:
    """Random-weight Llama (HF init) in bf16 plus a small byte-level tokenizer, as a local model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                          architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    vocab = {chr(i): i for i in range(256)} | {"<unk>": 256, "<s>": 257, "</s>": 258}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(path)


def recipe(model_dir: Path, name: str, tp: int, pp: int, tiny: bool) -> str:
    """A quantkit recipe (JSON is YAML) for one method: no evaluation, both exports."""
    q = {"method": METHODS[name].get("method", name), **{k: v for k, v in METHODS[name].items() if k != "method"}}
    if name.startswith("int8_sq") and "smoothquant_alpha" not in q:
        q["smoothquant_alpha"] = 0.5  # the auto search is minutes at 8B; the layout does not depend on alpha
    return json.dumps({
        "metadata": {"name": f"repro-{name}-tp{tp}pp{pp}", "description": "issue 12 reproduction"},
        # float32 fake model, float16 checkpoint: the setup whose bounds the tests derive
        "model": {"source": str(model_dir), "dtype": "float32"},
        "quantize": q,
        "calibration": {"dataset": "builtin:wiki", "n_samples": 8 if tiny else 16, "seq_len": 128 if tiny else 256,
                        "batch_size": 4, "seed": 1},
        "export": {"trtllm": {"tp_size": tp, "pp_size": pp, "dtype": "float16"}, "hf": True},
        "build": {"max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 1152},
        "evaluate": {"tasks": []},
    })


def reproduce(model_dir: Path, run: Path, dev: str, mappings: list[tuple[int, int]], name: str) -> list[dict]:
    """The run's fake-quantized model against its TensorRT-LLM checkpoint through the reference; the other
    mappings are exported from the same restored model (export_trtllm, as the pipeline calls it) and checked."""
    from _runtime_helpers import rel_err
    from transformers import AutoModelForCausalLM

    from quantkit import resume
    from quantkit.check import check_checkpoint
    from quantkit.export import export_trtllm, prepare_for_deployment, share_fused_scales
    from quantkit.trtllm_reference import load_reference

    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2)).to(dev)
    # As the pipeline's rerun does: source weights in the run's dtype (float32, as tests/test_trtllm_reference.py, so
    # the bounds measure the checkpoint, not bf16 rounding), the small resume state, the same re-sharing.
    fake = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=dev).eval()
    state = run / "quantize" / "quantizer_state.pth"
    if state.is_file():
        fake, _ = resume.restore(fake, state)
        fake = share_fused_scales(prepare_for_deployment(fake))
    with torch.no_grad():
        ref = fake(ids).logits.float()
    out = []
    for tp, pp in mappings:
        row: dict = {"tp": tp, "pp": pp}
        ckpt = run / "export" / "trtllm"
        if (tp, pp) != (1, 1):
            ckpt = run / f"trtllm-tp{tp}pp{pp}"
            export_trtllm(fake, ckpt, dtype="float16", tp_size=tp, pp_size=pp)
            row["ranks"] = len(list(ckpt.glob("rank*.safetensors")))
        row["trtllm_violations"] = len(check_checkpoint(ckpt))
        if name in BOUND:
            try:
                model = load_reference(ckpt).to(dev)
                with torch.no_grad():
                    row["rel_err"] = rel_err(model(ids).logits.float(), ref)
                del model
            except Exception as exc:  # report and go on: one table for every method
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--mappings", default="1x1,2x1,1x2", help="tp x pp exports per method")
    ap.add_argument("--workdir", default="/tmp/qk-repro")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="small shapes: a CPU smoke test of this script")
    args = ap.parse_args()
    from quantkit.check import check_checkpoint

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    model_dir = work / "model"
    make_model_folder(model_dir, args.layers, args.tiny)
    say(f"model folder ready ({args.layers} layers{', tiny' if args.tiny else ', Llama-3.1-8B shapes'}) on {dev}")
    mappings = [tuple(int(x) for x in m.split("x")) for m in args.mappings.split(",")]
    mappings = [m for m in mappings if m[1] <= args.layers]
    rows = []
    for name in args.methods.split(","):
        (work / "recipes").mkdir(parents=True, exist_ok=True)
        rfile = work / "recipes" / f"{name}.yaml"
        rfile.write_text(recipe(model_dir, name, 1, 1, args.tiny))  # JSON is YAML
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", str(rfile), "--output-dir",
                               str(work / "runs"), "--device", dev], capture_output=True, text=True, cwd=ROOT)
        run = work / "runs" / f"repro-{name}-tp1pp1"
        base = {"method": name, "run_s": round(time.perf_counter() - t, 1), "run_rc": proc.returncode}
        if proc.returncode != 0:
            text = (proc.stderr or proc.stdout or "no output").strip().splitlines()
            rows.append({**base, "tp": 1, "pp": 1, "error": text[-1][:200], "pass": False})
            say(json.dumps(rows[-1]))
            continue
        base["hf_violations"] = len(check_checkpoint(run / "export" / "hf"))
        for r in reproduce(model_dir, run, dev, mappings, name):
            row = {**base, **r}
            err = row.get("rel_err")
            row["pass"] = (row["trtllm_violations"] == 0 and row["hf_violations"] == 0 and "error" not in row
                           and (err < BOUND[name] if name in BOUND else True))
            rows.append(row)
            say(json.dumps(row))
        shutil.rmtree(run, ignore_errors=True)  # the modelopt state and checkpoints are large
    print("\n| method | tp | pp | quantkit run (s) | TRT-LLM check | HF check | reference rel err | bound | pass |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = r.get("rel_err")
        print(f"| {r['method']} | {r['tp']} | {r['pp']} | {r['run_s']} | {r.get('trtllm_violations', '-')} | "
              f"{r.get('hf_violations', '-')} | {'n/a' if err is None else f'{err:.3g}'} | "
              f"{BOUND.get(r['method'], '-')} | {'yes' if r['pass'] else 'NO: ' + r.get('error', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
