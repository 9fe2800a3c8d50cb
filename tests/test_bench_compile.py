"""quantkit.bench's compile scopes (bench.compile): the whole-decoder-layer graph decodes exactly the eager loop's
greedy tokens (unquantized and quantized runtime models, Llama and other families), all layers share one compiled
graph (no per-layer recompiles), and what cannot be compiled that way is refused with a QuantkitError.

CPU (Inductor's C++ backend), tiny float32 models. The CUDA-graph test runs with QUANTKIT_TEST_DEVICE=cuda."""

from __future__ import annotations

import pytest
import torch
from _families import tiny_model
from _runtime_helpers import device_under_test, roundtrip, tiny_llama
from pydantic import ValidationError

from quantkit import bench as qbench
from quantkit.bench import Generator, bench_model, compile_counters, compiled_scope, decoder_layers
from quantkit.errors import QuantkitError
from quantkit.recipe import BenchSection
from quantkit.runtime import fuse_projections, load_quantized, use_quantkit_attention

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # graph counts below are per test: earlier tests' compiled code for the same shapes would be reused
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(kind: str) -> torch.nn.Module:
    """initializer_range 0.2: a random tiny model whose greedy tokens vary (std 0.02 repeats one token)."""
    if kind == "llama":
        return tiny_llama(initializer_range=0.2, num_hidden_layers=3)
    if kind in ("qwen3", "mistral"):
        return tiny_model(kind, initializer_range=0.2)
    if kind == "gemma2":  # its default init already varies (0.2 repeats one token: softcapping saturates)
        return tiny_model(kind)
    return load_quantized(roundtrip(kind).hf_dir, "cpu", torch.float32)[0]


def _tokens(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, scope: str, new: int = 10,
            cuda_graph: bool = False) -> tuple[torch.Tensor, Generator]:
    with torch.inference_mode(), compiled_scope(model, scope):
        gen = Generator(model, ids.shape[0], ids.shape[1] + new + 4, device, cuda_graph)
        gen.prepare(ids)
        return gen.generate(ids, new)[0], gen


# model kind, scope, distinct decoder layer graphs. The decode steps compile one graph for all layers, not one
# per layer, plus one each for the final norm and the rotary embedding. mistral: every layer is a sliding-window
# one; gemma2 alternates sliding and full layers (window 4096, wider than the cache: see static_cache).
CASES = [("llama", "layers", 1), ("llama", "regions", None), ("qwen3", "layers", 1), ("mistral", "layers", 1),
         ("gemma2", "layers", 1), ("int4_awq", "layers", 1), ("int8_sq", "layers", 1)]


@pytest.mark.parametrize(("kind", "scope", "layer_kinds"), CASES)
def test_compiled_decode_gives_the_eager_tokens(kind: str, scope: str, layer_kinds: int | None) -> None:
    model = _model(kind)
    assert fuse_projections(model)  # as on CUDA: q/k/v and gate/up as one GEMM each (FusedPart inside the graph)
    use_quantkit_attention(model)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    eager, _ = _tokens(model, ids, CPU, "none")
    before = compile_counters()
    compiled, gen = _tokens(model, ids, CPU, scope)
    after = compile_counters()
    assert torch.equal(compiled, eager)
    assert len(set(eager.flatten().tolist())) > 3  # the comparison is not between constant outputs
    if layer_kinds is not None:
        assert after["graphs"] - before["graphs"] == layer_kinds + 2
        assert after["kernels"] > before["kernels"] and gen.warmup_s > 0
    # and a second generate through the same compiled graph (cache reset, same prompt) repeats itself
    with torch.inference_mode(), compiled_scope(model, scope):
        again = gen.generate(ids, 10)[0]
    assert torch.equal(again, eager)
    assert compile_counters()["graphs"] == after["graphs"]


def test_bench_model_records_scope_graphs_and_compile_time() -> None:
    model = _model("int4_awq")
    bench = BenchSection(batch_sizes=[1, 2], input_len=8, output_len=6, warmup=0, repeats=1)
    eager = bench_model(model, None, bench, "cpu", fuse=True)
    res = bench_model(model, None, bench, "cpu", compile="layers", fuse=True)
    assert eager["compile"] == "none" and eager["compiled_graphs"] == 0 and eager["compiled_regions"] == 0
    assert res["compile"] == "layers" and res["compiled_regions"] == 4  # both decoder layers, norm, rotary
    # dynamic=False: per batch size one layer graph shared by the layers, one for the norm, one for the rotary
    assert [r["compiled_graphs"] for r in res["results"]] == [3, 3] and res["compiled_graphs"] == 6
    assert all(r["compile_s"] > 0 for r in res["results"])
    assert [r["first_tokens"] for r in res["results"]] == [r["first_tokens"] for r in eager["results"]]
    # every projection quantized: Inductor's coordinate-descent tuning on, and recorded
    assert res["inductor"] == {"coordinate_descent_tuning": True} and eager["inductor"] == {}
    # True means the recipe's scope (default layers); on CPU the default stays eager
    assert BenchSection().compile == "layers"
    assert bench_model(model, None, bench.model_copy(update={"compile": "none", "batch_sizes": [1]}), "cpu",
                       compile=True)["compile"] == "none"


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_sliding_window_layers_that_never_fill_decode_hf_generate_tokens(kind: str) -> None:
    """bench.static_cache swaps sliding-window cache layers whose window holds the whole run for full static
    layers (graph-safe positions); the decode loop must still give what transformers' own generate gives (its
    dynamic cache keeps the sliding layers)."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    from quantkit.bench import static_cache

    model = _model(kind)
    assert {type(layer) for layer in static_cache(model, 64).layers} == {StaticLayer}
    assert StaticSlidingWindowLayer in {type(layer) for layer in static_cache(model, 5000).layers}  # window 4096
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    tokens, _ = _tokens(model, ids, CPU, "none")
    assert torch.equal(tokens, ref) and len(set(ref.flatten().tolist())) > 3


def test_a_sliding_window_that_fills_is_refused() -> None:
    model = tiny_model("mistral", sliding_window=8)  # the benchmark's cache (9 + 10 + 4 tokens) overflows it
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with pytest.raises(QuantkitError, match="sliding-window") as err:
        _tokens(model, ids, CPU, "layers")
    assert "bench.compile: regions" in err.value.fix


def test_decoder_layers_and_scope_field() -> None:
    model = tiny_llama()
    assert decoder_layers(model) is model.model.layers
    with pytest.raises(QuantkitError, match="no decoder layer list"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValidationError):
        BenchSection(compile="model")
    # what the scope compiles, and it leaves the model as it found it
    with compiled_scope(model, "layers") as compiled:
        assert sorted(compiled) == ["model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb"]
        assert all("forward" in m.__dict__ for m in (*model.model.layers, model.model.norm))
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("variant", [None, "mistral", "int4_awq"])
def test_cuda_graph_of_compiled_layers_gives_the_eager_tokens(variant: str | None) -> None:
    dev = device_under_test()
    if dev.type != "cuda":
        pytest.skip("CUDA graph of the compiled layers: run with QUANTKIT_TEST_DEVICE=cuda")
    if variant is None:
        model = tiny_llama(initializer_range=0.2).to(dev)
    elif variant == "mistral":  # sliding-window layers: positions must advance in the replayed graph
        model = tiny_model("mistral", initializer_range=0.2).to(dev)
    else:  # float32 compute: the comparison is about compile + capture, not bf16 rounding
        model = load_quantized(roundtrip(variant).hf_dir, dev, torch.float32)[0]
    fuse_projections(model)
    use_quantkit_attention(model)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3)).to(dev)
    eager, _ = _tokens(model, ids, dev, "none")
    compiled, gen = _tokens(model, ids, dev, "layers", cuda_graph=True)
    assert gen.graph is not None, gen.graph_error
    assert torch.equal(compiled, eager)


def test_inductor_tuning_only_where_no_float_linear_is_left(monkeypatch) -> None:
    """Coordinate-descent tuning makes Inductor rewrite M = 1 matmuls into its own reductions (slower than cuBLAS
    on the H200), so the layer graphs of a model with nn.Linear projections compile without it and those of a
    quantized model, whose projections are extern kernels, with it; the tokens stay the eager ones either way."""
    seen: list = []
    real = torch.compile

    def spy(fn, **kw):
        seen.append(kw.get("options"))
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    qbench._compiled_layer_forward.cache_clear()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    try:
        for kind, want in (("llama", None), ("int8_sq", {"coordinate_descent_tuning": True})):
            model = _model(kind)
            fuse_projections(model)
            seen.clear()
            eager, _ = _tokens(model, ids, CPU, "none", new=3)
            compiled, _ = _tokens(model, ids, CPU, "layers", new=3)
            assert len(seen) == 3 and all(o == want for o in seen), (kind, seen)  # layers, final norm, rotary
            assert torch.equal(compiled, eager)
    finally:
        qbench._compiled_layer_forward.cache_clear()
