"""Low-precision GEMM kernels of quantkit's own (Triton), used by `quantkit.runtime` where no well-kept kernel fits.

Only skinny GEMMs (decode: M = batch size <= 16) live here; everything else goes to PyTorch's own kernels
(`torch._scaled_mm`, `torch._int_mm`, `aten._weight_int4pack_mm`, cuBLAS). See `quantkit.runtime` for
which kernel runs where.
"""
