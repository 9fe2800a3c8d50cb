"""Bench stage: greedy generation speed of a run's exported checkpoint on real low-precision kernels.

`bench_model` runs its own decode loop over transformers' StaticCache (not `generate`): prefill once, then one
token per step with static shapes. On CUDA the per-token step is captured once as a CUDA graph and replayed (the
step feeds its own output back, so a replay is one whole decode step with no host work). Before capture,
torch.compile fuses the small ops between the GEMMs (`bench.compile`): `layers` compiles each decoder layer whole
(residual adds, norms, activation quantization, RoPE, the K/V cache write and attention between the GEMMs, which
stay extern calls: aten / torch.library ops), as one graph that every layer shares; `regions` compiles norms, MLPs,
quantized projections and RoPE separately (cache update and attention eager); `none` runs eagerly.
DESIGN.md: `torch.compile(mode="reduce-overhead")` inside HF `generate` failed ("tensor output of CUDAGraphs that
has been overwritten"); owning the loop and the graph avoids that. On CPU the loop runs eagerly unless asked
(numbers there are for comparing runs, not deployment speed).

Measured per batch size: prefill tokens/s, decode tokens/s, time to first token (prefill + first token), peak GPU
memory (torch.cuda.max_memory_allocated) and peak CPU memory (ru_maxrss); plus the checkpoint size on disk.
Results go to `RUN/bench/bench.json` (written to a temporary name and renamed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.recipe import BenchSection, CompileScope
from quantkit.runfolder import read_recipe

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


def checkpoint_size(path: str | Path) -> int:
    """Bytes of all files under `path` (a folder) or of the file itself."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def peak_cpu_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def compiled_regions(model: nn.Module, enabled: bool):
    """torch.compile the repeated regions that hold no cache state: norms, MLPs, quantized projections and the
    rotary embedding function. Compiled once per class and input shape and reused by every layer (the cache
    update and attention stay eager: the layer index inside them would make dynamo specialise per layer)."""
    if not enabled:
        yield []
        return
    import sys as _sys

    from quantkit.runtime import QuantLinear

    _raise_recompile_limits()
    compiled: list[str] = []
    in_mlp: set[int] = set()
    originals: list[tuple[nn.Module, Any]] = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls.endswith("MLP"):
            in_mlp.update(id(m) for m in mod.modules())
        if cls.endswith(("RMSNorm", "MLP")) or (isinstance(mod, QuantLinear) and id(mod) not in in_mlp):
            originals.append((mod, mod.forward))
            mod.forward = torch.compile(mod.forward, dynamic=False)
            compiled.append(name)
    rope_mod = _sys.modules.get(type(model).__module__)
    rope = getattr(rope_mod, "apply_rotary_pos_emb", None)
    if rope is not None:
        rope_mod.apply_rotary_pos_emb = torch.compile(rope, dynamic=False)
        compiled.append(f"{rope_mod.__name__}.apply_rotary_pos_emb")
    try:
        yield compiled
    finally:
        for mod, fwd in originals:
            mod.forward = fwd
        if rope is not None:
            rope_mod.apply_rotary_pos_emb = rope


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers in cache order: the ModuleList holding its `_no_split_modules` class (the name
    transformers gives every family's repeated block; model.model.layers for the families quantkit runs)."""
    from quantkit.errors import QuantkitError

    names = set(getattr(model, "_no_split_modules", None) or ())
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and type(mod[0]).__name__ in names:
            return mod
    raise QuantkitError(f"no decoder layer list found in {type(model).__name__} (no nn.ModuleList of its "
                        f"_no_split_modules {sorted(names)})", where="bench.compile",
                        fix="set bench.compile: regions (or none) in the recipe for this model")


class _LayerCache:
    """One layer's view of the model's cache, handed to that layer's compiled forward instead of the whole cache.

    The attention calls `past_key_values.update(k, v, self.layer_idx)`; through the whole cache dynamo would index
    `cache.layers` with the layer's constant index and specialise the graph per layer (one compile each). This view
    already is the layer's cache entry and ignores the index, so every layer runs the same graph (guards on types,
    shapes and flags only: the static cache's tensors are marked static without an address guard)."""

    def __init__(self, layer: Any) -> None:
        if getattr(layer, "is_sliding", False):  # static_cache keeps only windows that fill within the run
            from quantkit.errors import QuantkitError

            raise QuantkitError(f"bench.compile: layers cannot compile a sliding-window cache layer that fills "
                                f"(window {layer.max_cache_len} tokens, fewer than the run's prompt + output): its "
                                "update branches on a Python position, one recompile per token", where="bench.compile",
                                fix="set bench.compile: regions, or keep bench.input_len + output_len within the "
                                "model's sliding window")
        self.layer = layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.update(key_states, value_states, *args, **kwargs)


def static_cache(model: nn.Module, max_len: int) -> Any:
    """transformers' StaticCache for `max_len` tokens, with every sliding-window layer whose window holds all
    `max_len` tokens replaced by a full StaticLayer. Such a layer never fills, so the full layer stores, returns
    and masks exactly the same (transformers' mask takes the window from the config, not from the layer); but the
    sliding layer reports its length as a Python int (get_seq_length, the mask's query offset), which a captured
    CUDA graph would replay unchanged and which compiled code would specialise on, step by step."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False) and window is not None and window > max_len:
            cache.layers[i] = StaticLayer(max_cache_len=max_len)
    return cache


def _layer_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(layer).forward(layer, *args, **kwargs)


def inductor_options(layers: nn.Module) -> dict[str, Any]:
    """Inductor settings for the compiled decoder layers. Coordinate-descent tuning benchmarks neighbouring launch
    settings of each kernel Inductor generates and keeps the fastest: the single-row reductions of a decode step
    (norms, per-token amax, the attention combine) ran faster with it (H200, int8_sq 3.50 -> 3.46 ms per step,
    bench/RESULTS.md). Under it Inductor also rewrites every matmul with M = 1 into its own reduction kernels
    (torch/_inductor/decomposition.py: `mm`, `bmm` when config.coordinate_descent_tuning), which ran far slower
    than cuBLAS (bf16 4.86 -> 5.80 ms). So it is on only where the layers hold no nn.Linear: every projection is
    then a quantized kernel, an extern call that Inductor leaves alone."""
    return {} if any(isinstance(m, nn.Linear) for m in layers.modules()) else {"coordinate_descent_tuning": True}


@functools.cache
def _compiled_layer_forward(options: tuple[tuple[str, Any], ...]) -> Any:
    # made at first use: torch.compile imports dynamo (~2 s), and every CLI start imports this module
    return torch.compile(_layer_forward, fullgraph=True, dynamic=False, options=dict(options) or None)


def _raise_recompile_limits() -> None:
    # one entry per (layer graph variant, batch size, model): a bench of 4 methods x 2 batch sizes exceeds the
    # default of 8 and would silently fall back to eager
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)


@contextlib.contextmanager
def compiled_layers(model: nn.Module):
    """Each decoder layer's forward (attention with the static-cache update and SDPA included) through one
    torch.compile'd function (fullgraph, dynamic=False), so Inductor fuses everything between the GEMMs. The
    layers share the compiled code: the layer module is an argument (its weights are graph inputs) and the cache
    comes in as the layer's own `_LayerCache`. Hooks on the layer still run (only `forward` is replaced).

    The once-per-step modules beside the layers (the final norm, the rotary embedding: children of the layers'
    parent other than embeddings) are compiled too, one graph each; the mask and lm_head stay eager. Inductor's
    settings: `inductor_options`."""
    _raise_recompile_limits()
    layers = decoder_layers(model)
    options = tuple(inductor_options(layers).items())
    originals: list[tuple[nn.Module, Any]] = []

    def wrap(index: int, layer: nn.Module):
        def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
            if past_key_values is not None:
                past_key_values = _LayerCache(past_key_values.layers[index])
            return _compiled_layer_forward(options)(layer, *args, past_key_values=past_key_values, **kwargs)

        return forward

    compiled: list[str] = []
    for name, mod in model.named_modules():
        if mod is layers:
            compiled.extend(f"{name}.{i}" for i in range(len(layers)))
        elif any(child is layers for child in mod.children()):
            for child_name, child in mod.named_children():
                if child is not layers and not isinstance(child, nn.Embedding):
                    originals.append((child, child.__dict__.get("forward")))
                    child.forward = torch.compile(child.forward, dynamic=False, options=dict(options) or None)
                    compiled.append(f"{name}.{child_name}")
    for i, layer in enumerate(layers):
        originals.append((layer, layer.__dict__.get("forward")))
        layer.forward = wrap(i, layer)
    try:
        yield compiled
    finally:
        for mod, fwd in originals:
            if fwd is None:
                del mod.forward
            else:
                mod.forward = fwd


@contextlib.contextmanager
def compiled_scope(model: nn.Module, scope: CompileScope):
    """The compile scope `bench.compile` names (see the module docstring); yields what it compiled."""
    if scope == "layers":
        with compiled_layers(model) as compiled:
            yield compiled
    else:
        with compiled_regions(model, scope == "regions") as compiled:
            yield compiled


def compile_counters() -> dict[str, int]:
    """Graphs dynamo compiled and kernels Inductor generated so far in this process (take differences)."""
    from torch._dynamo.utils import counters
    from torch._inductor import metrics

    return {"graphs": int(counters["stats"]["unique_graphs"]), "kernels": int(metrics.generated_kernel_count)}


class Generator:
    """Greedy generation for a fixed batch size and length with a static KV cache and (optionally) a CUDA graph."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, device: torch.device,
                 cuda_graph: bool) -> None:
        self.model, self.device, self.b = model, device, batch_size
        self.cache = static_cache(model, max_len)
        self.tok = torch.zeros((batch_size, 1), dtype=torch.long, device=device)  # the step's static input
        self.graph: torch.cuda.CUDAGraph | None = None
        self.want_graph = cuda_graph and device.type == "cuda"
        self.graph_error: str | None = None
        self.warmup_s = 0.0  # the first decode steps: torch.compile's compile time when a scope is compiled

    def _step(self) -> None:
        # One decode step in place: positions come from the cache's own on-device counter (no host sync).
        logits = self.model(input_ids=self.tok, past_key_values=self.cache, use_cache=True).logits
        self.tok.copy_(logits[:, -1].argmax(-1, keepdim=True))

    def prefill(self, ids: torch.Tensor) -> None:
        self.cache.reset()
        ctx = torch.compiler.set_stance("force_eager")  # prefill is one big GEMM per layer: compile buys nothing
        with ctx:
            logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.tok.copy_(logits[:, -1].argmax(-1, keepdim=True))

    def prepare(self, ids: torch.Tensor) -> None:
        """Warm up (compiles, autotunes) and capture the graph; leaves the cache to be reset by `prefill`."""
        self.prefill(ids)
        t0 = time.perf_counter()
        for _ in range(3):
            self._step()
        _sync(self.device)
        self.warmup_s = time.perf_counter() - t0
        if not self.want_graph:
            return
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self.graph = graph
        except Exception as exc:  # any capture failure falls back to eager decoding, and says so
            self.graph_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log.warning("CUDA graph capture failed, decoding eagerly: %s", self.graph_error)
            self.graph = None
            _sync(self.device)

    def decode(self, steps: int) -> torch.Tensor:
        out = torch.empty((self.b, steps), dtype=torch.long, device=self.device)
        for i in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            out[:, i : i + 1].copy_(self.tok)
        return out

    def profile(self, ids: torch.Tensor, steps: int, top: int = 20) -> list[dict[str, Any]]:
        """The GPU kernels of a decode step (torch.profiler over `steps` steps right after prefilling `ids`, graph
        replays included): per kernel name, microseconds and launches per step, the `top` longest first, plus the
        sum of the rest."""
        from torch.profiler import ProfilerActivity, profile

        self.prefill(ids)  # the cache holds input + output tokens: start where a generate starts
        _sync(self.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.decode(steps)
            _sync(self.device)
        rows = []
        for evt in prof.key_averages():
            us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            if us > 0:
                rows.append({"kernel": evt.key, "us": us / steps, "calls": evt.count / steps})
        rows.sort(key=lambda r: -r["us"])
        rest = rows[top:]
        if rest:
            rows = rows[:top] + [{"kernel": f"({len(rest)} other kernels)", "us": sum(r["us"] for r in rest),
                                  "calls": sum(r["calls"] for r in rest)}]
        return rows

    def generate(self, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
        """Greedy tokens [b, new_tokens], time to first token (s), decode time for the rest (s)."""
        _sync(self.device)
        t0 = time.perf_counter()
        self.prefill(ids)
        first = self.tok.clone()
        _sync(self.device)
        t1 = time.perf_counter()
        rest = self.decode(new_tokens - 1)
        _sync(self.device)
        t2 = time.perf_counter()
        return torch.cat([first, rest], dim=1), t1 - t0, t2 - t1


# ----------------------------------------------------------------------------- the benchmark


def bench_model(model: nn.Module, tokenizer: Any, bench: BenchSection, device: str | torch.device, *,
                compile: bool | CompileScope | None = None, cuda_graph: bool | None = None,
                fuse: bool | None = None, seed: int = 0, profile_steps: int = 0) -> dict[str, Any]:
    """Greedy-generation speed of `model` for each batch size in `bench` (prompts: random token ids).

    compile: a scope (layers / regions / none), True for `bench.compile`, False for none; default `bench.compile`
    on CUDA and none on CPU. cuda_graph / fuse default to on for CUDA and off for CPU. fuse: q/k/v and gate/up
    become one GEMM each, in place (runtime.fuse_projections; same arithmetic, applied to the unquantized baseline
    too). The tokenizer is only used for its name: the prompts are random ids of exactly `bench.input_len` tokens
    so every method sees identical work. profile_steps > 0 (CUDA): each batch size's row also lists the kernels of
    a decode step (`Generator.profile`), measured after the timed runs.
    """
    from quantkit.runtime import fuse_projections, kernel_summary, use_quantkit_attention, weight_bytes

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if compile is None or compile is True:
        scope: CompileScope = bench.compile if (on_cuda or compile) else "none"
    else:
        scope = compile or "none"
    cuda_graph = on_cuda if cuda_graph is None else cuda_graph
    fused = fuse_projections(model) if (on_cuda if fuse is None else fuse) else []
    vocab = model.config.vocab_size
    result: dict[str, Any] = {
        "device": device.type, "card": card_name(device), "torch": torch.__version__,
        "settings": bench.model_dump(), "compile": scope, "cuda_graph": cuda_graph, "fused_layers": len(fused),
        "weight_bytes_per_step": weight_bytes(model), "kernels": kernel_summary(model),
        "tokenizer": getattr(tokenizer, "name_or_path", None), "results": [],
    }
    gen_ = torch.Generator().manual_seed(seed)
    attn_before = use_quantkit_attention(model)  # GQA without repeat_kv copies (see runtime.gqa_sdpa_attention)
    try:
        _bench_batches(model, bench, device, scope, cuda_graph, gen_, vocab, result, profile_steps)
    finally:
        model.set_attn_implementation(attn_before)
    return result


def _bench_batches(model: nn.Module, bench: BenchSection, device: torch.device, scope: CompileScope,
                   cuda_graph: bool, gen_: torch.Generator, vocab: int, result: dict[str, Any],
                   profile_steps: int = 0) -> None:
    on_cuda = device.type == "cuda"
    start = compile_counters()
    with torch.inference_mode(), compiled_scope(model, scope) as compiled:
        result["compiled_regions"] = len(compiled)
        result["inductor"] = inductor_options(decoder_layers(model)) if scope == "layers" else {}
        for b in bench.batch_sizes:
            ids = torch.randint(0, vocab, (b, bench.input_len), generator=gen_).to(device)
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t_prep = time.perf_counter()
            before = compile_counters()
            gen = Generator(model, b, bench.input_len + bench.output_len, device, cuda_graph)
            gen.prepare(ids)
            prep_s = time.perf_counter() - t_prep
            after = compile_counters()
            runs = []
            tokens = None
            for i in range(bench.warmup + bench.repeats):
                tokens, ttft, dec = gen.generate(ids, bench.output_len)
                if i >= bench.warmup:
                    runs.append((ttft, dec))
            ttft = statistics.median(r[0] for r in runs)
            dec = statistics.median(r[1] for r in runs)
            steps = bench.output_len - 1
            row = {
                "batch_size": b, "input_len": bench.input_len, "output_len": bench.output_len,
                "ttft_s": ttft, "prefill_tok_s": b * bench.input_len / ttft,
                "decode_s": dec, "decode_tok_s": b * steps / dec if steps and dec > 0 else None,
                "decode_step_ms": 1e3 * dec / steps if steps else None,
                "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else None,
                "peak_cpu_mb": peak_cpu_mb(), "cuda_graph": gen.graph is not None,
                "graph_error": gen.graph_error, "prepare_s": prep_s, "repeats": len(runs),
                "compile_s": gen.warmup_s, "compiled_graphs": after["graphs"] - before["graphs"],
                "generated_kernels": after["kernels"] - before["kernels"],
                "first_tokens": tokens[0, :8].tolist() if tokens is not None else [],
            }
            if profile_steps and on_cuda:
                row["step_kernels"] = gen.profile(ids, profile_steps)
            result["results"].append(row)
            log.info("batch %d: prefill %.0f tok/s, decode %.1f tok/s, ttft %.3f s", b, row["prefill_tok_s"],
                     row["decode_tok_s"] or 0.0, ttft)
            del gen
            if on_cuda:
                torch.cuda.empty_cache()
    end = compile_counters()
    # graphs compiled for this model (0 when an earlier model with the same shapes left reusable ones)
    result["compiled_graphs"] = end["graphs"] - start["graphs"]
    result["generated_kernels"] = end["kernels"] - start["kernels"]


def built_engine_dir(run_dir: Path) -> Path | None:
    """The TensorRT-LLM engine folder that `quantkit build` recorded for this run, if it still exists."""
    info = run_dir / "build" / "engine.json"
    if not info.is_file():
        return None
    engine_dir = Path(json.loads(info.read_text())["engine_dir"])
    return engine_dir if any(engine_dir.glob("rank*.engine")) else None


def tensorrt_llm_available() -> bool:
    try:
        import tensorrt_llm  # noqa: F401
    except Exception:  # a broken install raises more than ImportError
        return False
    return torch.cuda.is_available()


def bench_engine(engine_dir: Path, tokenizer_dir: Path, bench: BenchSection, seed: int = 0) -> dict[str, Any]:
    """The built engine through TensorRT-LLM's ModelRunner (engine line, TensorRT-LLM <= 1.2.x).

    TTFT is a 1-token generate; decode tokens/s is the rest of an `output_len` generate. Early stopping is off
    (end_id -1, as TensorRT-LLM's own benchmarks run) so every request makes `output_len` tokens.
    Not runnable on machines without TensorRT-LLM (none here); kept small and parallel to `bench_model`.
    """
    from tensorrt_llm.runtime import ModelRunner
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    runner = ModelRunner.from_dir(engine_dir=str(engine_dir), rank=0)
    g = torch.Generator().manual_seed(seed)
    free_before = torch.cuda.mem_get_info()[0]

    def timed(ids: list[torch.Tensor], new_tokens: int) -> float:
        times = []
        for i in range(bench.warmup + bench.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.generate(ids, max_new_tokens=new_tokens, end_id=-1, pad_id=tokenizer.pad_token_id or 0)
            torch.cuda.synchronize()
            if i >= bench.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    results = []
    for bs in bench.batch_sizes:
        ids = [torch.randint(100, len(tokenizer), (bench.input_len,), generator=g, dtype=torch.int32)
               for _ in range(bs)]
        ttft = timed(ids, 1)
        total = timed(ids, bench.output_len)
        results.append({"batch_size": bs, "prefill_tok_s": bs * bench.input_len / ttft,
                        "decode_tok_s": bs * (bench.output_len - 1) / max(total - ttft, 1e-9), "ttft_s": ttft,
                        "peak_gpu_mb": (free_before - torch.cuda.mem_get_info()[0]) / 2**20 or None,
                        "peak_cpu_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    import tensorrt_llm

    return {"device": "cuda", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "runtime": f"tensorrt_llm {tensorrt_llm.__version__} engine", "settings": bench.model_dump(),
            "compile": False, "cuda_graph": False, "results": results}


def bench_run(run_dir: str | Path, bench_section: BenchSection | None = None, device: str | None = None,
              **kwargs: Any) -> dict[str, Any]:
    """Benchmark a run folder's HF export (or, for a `none` run, the unquantized source model) and write
    RUN/bench/bench.json. `bench_section` defaults to the recipe's `bench:` section, else BenchSection()."""
    from quantkit.errors import QuantkitError
    from quantkit.models import DTYPES, load_model, resolve_model_path
    from quantkit.runtime import load_quantized

    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    method = recipe["quantize"]["method"]
    dtype_name = recipe["model"].get("dtype", "bfloat16")
    section = bench_section or BenchSection(**(recipe.get("bench") or {}))
    hf_dir = run_dir / "export" / "hf"
    t0 = time.perf_counter()
    engine_dir = built_engine_dir(run_dir)
    if engine_dir is not None and device == "cuda" and tensorrt_llm_available():
        # What deployment runs: the engine `quantkit build` made, not quantkit's own kernels.
        result = bench_engine(engine_dir, hf_dir if hf_dir.is_dir() else run_dir / "export" / "trtllm", section)
        result.update(run=run_dir.name, method=method, loaded=str(engine_dir), load_s=0.0,
                      checkpoint_bytes=checkpoint_size(engine_dir), model_dtype=dtype_name,
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return _record_bench(run_dir, result, section, device, method, t0)
    if engine_dir is not None:
        log.info("engine %s found, but TensorRT-LLM or CUDA is missing here: benchmarking the HF checkpoint "
                 "with quantkit.runtime instead", engine_dir)
    if method == "none":
        model, tokenizer = load_model(recipe["model"]["source"], dtype_name, device,
                                      trust_remote_code=recipe["model"].get("trust_remote_code", False))
        size_path = hf_dir if hf_dir.is_dir() else Path(resolve_model_path(recipe["model"]["source"]))
        loaded = f"unquantized {recipe['model']['source']}"
    else:
        if not (hf_dir / "config.json").is_file():
            raise QuantkitError(f"run '{run_dir.name}' has no HF export at {hf_dir}", where="export.hf",
                                fix="set export.hf: true in the recipe and rerun `quantkit run`")
        model, tokenizer = load_quantized(hf_dir, device, DTYPES[dtype_name])
        size_path, loaded = hf_dir, str(hf_dir)
    load_s = time.perf_counter() - t0
    result = bench_model(model, tokenizer, section, device, **kwargs)
    result.update(run=run_dir.name, method=method, loaded=loaded, load_s=round(load_s, 2),
                  checkpoint_bytes=checkpoint_size(size_path), model_dtype=dtype_name,
                  finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    result.setdefault("runtime", "quantkit.runtime")
    return _record_bench(run_dir, result, section, device, method, t0)


def _record_bench(run_dir: Path, result: dict[str, Any], section: BenchSection, device: str, method: str,
                  t0: float) -> dict[str, Any]:
    from quantkit.runfolder import RunFolder, atomic_write_json, fingerprint

    atomic_write_json(run_dir / "bench" / "bench.json", result)
    RunFolder.open(run_dir).record("bench", fingerprint(section.model_dump(), device, method),
                                   time.perf_counter() - t0, device=result["card"])
    try:  # refresh results.json so `quantkit compare` sees the numbers; the bench result stands either way
        from quantkit.report import write_run_report

        write_run_report(run_dir)
    except Exception as exc:  # the bench result stands either way
        log.warning("bench.json written, but the run report was not refreshed: %s", exc)
    return result


# ----------------------------------------------------------------------------- CLI


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result.get('run', '')} [{result.get('method', '')}] on {result['card']} "
             f"(checkpoint {result.get('checkpoint_bytes', 0) / 2**20:.1f} MiB, compile={result['compile']}, "
             f"cuda_graph={result['cuda_graph']})",
             "| batch | prefill tok/s | decode tok/s | TTFT s | peak GPU MiB | peak CPU MiB |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "–"
        dec = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "–"
        lines.append(f"| {r['batch_size']} | {r['prefill_tok_s']:.0f} | {dec} | {r['ttft_s']:.3f} | {gpu} | "
                     f"{r['peak_cpu_mb']:.0f} |")
    return "\n".join(lines)


def _cmd_bench(args: argparse.Namespace) -> int:
    result = bench_run(args.run, device=args.device)
    print(format_table(result))
    print(f"wrote {Path(args.run) / 'bench' / 'bench.json'}", file=sys.stderr)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="speed of a run's exported checkpoint (tokens/s, TTFT, memory)")
    p.add_argument("run", help="run folder (holds recipe.yaml and export/hf)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when available, else cpu")
    p.set_defaults(func=_cmd_bench)
