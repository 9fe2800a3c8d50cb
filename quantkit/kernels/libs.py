"""GEMM kernels from maintained libraries (gemlite today) for `quantkit.runtime`: which ones, and the mapping of
ModelOpt's exported tensors onto their layouts.

Chosen by measurement (bench/kernel_libs.py, H200, torch 2.11 + CUDA 13, the 7 GEMMs of one Llama-3.1-8B decoder
layer, CUDA-graph replay, median; /work/notes/kl_h200.log, bench/RESULTS.md "Kernel libraries"), us per layer:

| format        | M=1                        | M=8               | M=16             | M=1024                      |
|---------------|----------------------------|-------------------|------------------|-----------------------------|
| bf16 cuBLAS   | 135                        | 140               | 142              | 673                         |
| fp8           | gemlite 79, _scaled_mm 167 | gemlite 116 / 168 | gemlite 104 / 151| gemlite 439, _scaled_mm 681 |
| int8 W8A8     | gemlite 82, triton 170     | gemlite 96 / 190  | gemlite 95 / 194 | gemlite 512, _int_mm 1506   |
| int4 W4A16    | tinygemm 79, gemlite 91    | gemlite 156 / 163 | gemlite 155 / 269| triton_dequant 920, gl 1866 |

Hence `CHOICES`: gemlite for int8 activations at every M and for fp8 at decode (M <= 16; at prefill the whole
model ran faster on torch._scaled_mm; at M = 1 with static activation scales quantkit's GEMV where its tune table
measured it faster), gemlite A16W4 for int4 at M = 2..16 (tinygemm stays at M = 1, quantkit's
dequantize + cuBLAS at prefill), for layers of at least MEASURED_MIN_WEIGHTS. Every
library kernel is still self-checked at load on each layer against quantkit's torch reference
(runtime.library_kernel_ok) and skipped, with the reason logged, where it is absent, disabled
(QUANTKIT_KERNEL_LIBS=none) or wrong.

The checkpoint's arithmetic is kept, not gemlite's own quantization (read from gemlite 0.6.0.post2's source):
- 8-bit weights (fp8 E4M3 / int8): gemlite's `GemLiteLinearTriton(8, ...)` with `scaled_activations=False` takes
  already-quantized activations, and `pack(W_q, scales[N, 1], zeros=None)` selects its channel-wise weight scaling
  (core.py `pack`: meta_is_channelwise -> channel_scale_mode 1, W_group_mode 0), whose epilogue is
  y[m, n] = acc[m, n] * scales[n] (triton_kernels/gemv_splitK_kernels.py, "channel_scale_mode == 1"; the GEMM
  kernels the same). quantkit quantizes x itself exactly as ModelOpt does (static per-tensor scale, or dynamic
  per-token with ModelOpt's round-half-even; gemlite's own dynamic quantizer rounds half away from zero and floors
  the scale at 1e-6, so it is not the same function) and folds the static input scale into scales[n] (output in
  the model dtype, as gemlite's own A8W8 layers write it); a per-token scale multiplies an fp32 output. The
  weight tensor is handed over as it is stored (a view, no copy).
- int4: gemlite's A16W4 dequantizes w = (u - zero) * scale per group (triton_kernels/utils.py `dequantize`,
  W_group_mode 3 with a scalar zero: `(b - zeros).to(meta_dtype) * scales`). ModelOpt's symmetric int4
  w = q * scale, q in [-8, 7], is exactly that with u = q + 8 and zero = 8; scales stay fp32 (meta_dtype fp32) so
  the dequantized weight is the fp32 product q * scale, as the reference computes it.

gemlite's custom op (`gemlite::forward_functional`) declares its output with the input's dtype, which is wrong for
pre-quantized input (fp8/int8 in, fp32 out), so the call is wrapped in `quantkit::gemlite_gemm` with the right fake.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

GEMLITE = "gemlite"
GEMLITE_MEASURED = "0.6.0.post2"  # the version bench/kernel_libs.py measured (pyproject extra `kernels` pins it)
INT4_ZERO = 8  # gemlite's zero point that turns ModelOpt's signed int4 into its unsigned codes

# format -> regime -> kernels in order of preference (regimes: "m1" M = 1, "decode" M <= 16 (M = 1 too unless "m1"
# is listed), "prefill" M > 16). A library kernel counts where its library loads (the runtime then self-checks it
# on each layer); a quantkit/torch kernel only where quantkit's own plan picked it for that regime. Not listed:
# quantkit's own choice. From the table above.
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    # fp8 prefill stays on quantkit's torch._scaled_mm: in the whole 8B model (bench/llama8b_speed.py, H200)
    # gemlite's A8W8 prefill ran at 15.9k tok/s against 28.7k for _scaled_mm, whatever the isolated GEMM says
    # M = 1 with static activation scales: quantkit's split-K GEMV first where the own plan has it, i.e. where
    # bench/w8_tune.py measured it faster than gemlite's GEMV on that shape (kernels/w8_gemv_configs.json), else
    # gemlite; per-token formats keep gemlite at every M <= 16 (runtime.QuantLinear._w8_gemv_plan says why)
    "fp8": {"m1": ("triton_w8_gemv", "gemlite_a8w8"), "decode": ("gemlite_a8w8",)},
    "fp8_pt": {"decode": ("gemlite_a8w8",)},
    "int8_sq": {"m1": ("triton_w8_gemv", "gemlite_a8w8"), "decode": ("gemlite_a8w8",), "prefill": ("gemlite_a8w8",)},
    "int8_sq_pt": {"decode": ("gemlite_a8w8",), "prefill": ("gemlite_a8w8",)},
    # int4: quantkit's Triton W4A16 first wherever the own plan has it, i.e. where bench/w4a16_tune.py measured it
    # faster than tinygemm (H200, 2026-12-04: M = 8 on every 8B shape, 80 us per layer against gemlite's 123 and
    # tinygemm's 154; at M = 1 tinygemm 68 us against gemlite 70 and quantkit 78, so M = 1 stays on tinygemm)
    "int4": {"m1": ("triton_w4a16", "tinygemm", "gemlite_a16w4"), "decode": ("triton_w4a16", "gemlite_a16w4")},
}
KERNEL_LIBRARY = {"gemlite_a8w8": GEMLITE, "gemlite_a16w4": GEMLITE}
# CHOICES holds for layers at least as large as the smallest one measured (k/v_proj of Llama-3.1-8B, 1024 x 4096):
# nothing says a library wins on smaller ones, and gemlite would autotune every such shape at first use.
MEASURED_MIN_WEIGHTS = 1024 * 4096


def choose(fmt: str, own: dict[str, str], usable: Callable[[str], bool], weights: int) -> dict[str, str]:
    """The plan for format `fmt` and a layer of `weights` (out x in) weights: per regime of CHOICES, the first
    candidate that is a library kernel whose library is `usable`, or the kernel quantkit's own plan `own` picked
    for that regime; other regimes, and layers smaller than MEASURED_MIN_WEIGHTS, keep `own`. "m1" is dropped
    where it equals "decode"."""
    plan = dict(own)
    if weights < MEASURED_MIN_WEIGHTS:
        return plan
    for regime, candidates in CHOICES.get(fmt, {}).items():
        mine = own.get(regime, own["decode"])
        for c in candidates:
            if c == mine or (kernel_library(c) is not None and usable(c)):
                plan[regime] = c
                break
    if plan.get("m1") == plan["decode"]:
        plan.pop("m1")
    return plan


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Library:
    name: str
    module: ModuleType | None
    version: str | None
    reason: str | None  # why it is not used (None: usable)

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


_LIBS: dict[tuple[str, str], Library] = {}
_SKIP_LOGGED: set[tuple[str, str]] = set()


def enabled_libraries() -> set[str] | None:
    """QUANTKIT_KERNEL_LIBS: unset = every library that is installed; 'none' = quantkit's own kernels only; else a
    comma-separated list of library names."""
    value = os.environ.get("QUANTKIT_KERNEL_LIBS")
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"}


def library(name: str, device: torch.device) -> Library:
    """The library for `device` (cached), or why it cannot be used. An absent library is not an error; one that is
    installed but fails to import is (QuantkitError: a broken install must not silently cost the speed-up)."""
    device = torch.device(device)
    key = (name, device.type)
    if key in _LIBS:
        return _LIBS[key]
    lib = _probe(name, device)
    _LIBS[key] = lib
    if lib.reason is not None and (name, lib.reason) not in _SKIP_LOGGED:
        _SKIP_LOGGED.add((name, lib.reason))
        log.info("kernel library %s not used: %s", name, lib.reason)
    return lib


def _probe(name: str, device: torch.device) -> Library:
    if name != GEMLITE:
        raise KeyError(name)
    allowed = enabled_libraries()
    if allowed is not None and name not in allowed:
        return Library(name, None, None, "disabled by QUANTKIT_KERNEL_LIBS")
    if importlib.util.find_spec(name) is None:
        return Library(name, None, None, "not installed (pip install 'quantkit[kernels]')")
    if device.type != "cuda":  # gemlite's import itself queries the GPU
        return Library(name, None, None, f"needs a CUDA device (this is {device.type})")
    ver = version(name)
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        from quantkit.errors import MissingDependencyError

        raise MissingDependencyError(
            f"{name} {ver} is installed but fails to import ({type(exc).__name__}: {exc})",
            where="runtime kernel libraries",
            fix=f"reinstall it (pip install '{name}=={GEMLITE_MEASURED}'), uninstall it, or set "
                "QUANTKIT_KERNEL_LIBS=none to run on quantkit's own kernels") from exc
    if ver != GEMLITE_MEASURED:
        log.warning("%s %s is installed; %s was measured (bench/kernel_libs.py): kernels still self-check", name,
                    ver, GEMLITE_MEASURED)
    _load_gemlite_configs(module)
    return Library(name, module, ver, None)


def _load_gemlite_configs(gemlite: ModuleType) -> None:
    """gemlite picks its tuned-config file by a tag in the device name and ships none for the H200: load the H100
    file there (same SM90 kernels; what bench/kernel_libs.py measured), so no shape autotunes at run time."""
    name = torch.cuda.get_device_name().lower()
    cfg_dir = Path(gemlite.__file__).parent / "configs"
    if "h200" in name and (cfg_dir / "h100.json").is_file():
        gemlite.GemLiteLinear.load_config(str(cfg_dir / "h100.json"))


def kernel_library(kernel: str) -> str | None:
    return KERNEL_LIBRARY.get(kernel)


# ----------------------------------------------------------------------------- ModelOpt tensors -> gemlite layout
# Pure torch: tested on CPU against the checkpoint's dequantized weight (tests/test_kernel_libs.py).


def a8w8_channel_scales(weight_scale: torch.Tensor, input_scale: torch.Tensor | None, out_features: int
                        ) -> torch.Tensor:
    """gemlite's per-output-channel scales [N, 1] fp32 for an 8-bit layer: weight scale (per tensor or per row)
    times the static input scale where there is one (a per-token scale is applied to the output instead)."""
    s = weight_scale.float().reshape(-1).expand(out_features)
    if input_scale is not None:
        s = s * input_scale.float().reshape(())
    return s.reshape(out_features, 1).contiguous()


def a16w4_codes(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 [N, K] in [-8, 7] -> gemlite's unsigned codes [N, K] uint8 (u = q + INT4_ZERO)."""
    return (q.to(torch.int16) + INT4_ZERO).to(torch.uint8)


# ----------------------------------------------------------------------------- building and calling gemlite layers


@dataclass
class GemliteLayer:
    """What `gemlite_gemm` needs: gemlite's tensor and meta arguments, the output dtype, and the bytes of the
    tensors it owns (0 where the weight is a view of quantkit's buffer)."""

    tensors: list[torch.Tensor]
    meta: list[int]
    out_dtype: torch.dtype
    nbytes: int


def build_a8w8(gemlite: ModuleType, weight: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype
               ) -> GemliteLayer:
    """An fp8 / int8 weight [N, K] (as stored) with channel scales [N, 1] fp32 -> a gemlite layer taking
    pre-quantized activations of the weight's dtype. out_dtype: the model dtype where the scales are complete
    (static input scale folded in: no extra kernel), float32 where a per-token scale still multiplies the output."""
    n, k = weight.shape
    core = gemlite.core
    lin = gemlite.GemLiteLinearTriton(8, group_size=k, in_features=k, out_features=n,
                                      input_dtype=core.TORCH_TO_DTYPE[weight.dtype],
                                      output_dtype=core.TORCH_TO_DTYPE[out_dtype], scaled_activations=False)
    lin.pack(weight, scales, zeros=None)
    return GemliteLayer([t.detach() for t in lin.get_tensor_args()], lin.get_meta_args(), out_dtype, 0)


def build_a16w4(gemlite: ModuleType, q: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype
                ) -> GemliteLayer:
    """Signed int4 [N, K] with fp32 group scales [N, K / group] -> a gemlite A16W4 layer for `dtype` activations."""
    n, k = q.shape
    dt = gemlite.core.TORCH_TO_DTYPE[dtype]
    lin = gemlite.GemLiteLinearTriton(4, group_size=group, in_features=k, out_features=n, input_dtype=dt,
                                      output_dtype=dt, scaled_activations=False)
    lin.pack(a16w4_codes(q), scales.float().contiguous(), INT4_ZERO)  # scalar zero: W_group_mode 3
    tensors = [t.detach() for t in lin.get_tensor_args()]
    nbytes = sum(t.numel() * t.element_size() for t in tensors[:2])
    return GemliteLayer(tensors, lin.get_meta_args(), dtype, nbytes)


@torch.library.custom_op("quantkit::gemlite_gemm", mutates_args=())
def gemlite_gemm(x: torch.Tensor, tensors: list[torch.Tensor], meta: list[int], out_dtype: torch.dtype
                 ) -> torch.Tensor:
    """y [M, N] = gemlite's GEMM of x [M, K] (already quantized where the layer takes 8-bit activations)."""
    from gemlite.core import forward_functional

    return forward_functional(x.contiguous(), None, tensors, meta).to(out_dtype)


@gemlite_gemm.register_fake
def _(x: torch.Tensor, tensors: list[torch.Tensor], meta: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((x.shape[0], tensors[0].shape[1]), dtype=out_dtype)
