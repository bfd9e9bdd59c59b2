"""hardware.py: the compute dtype a device gets."""

import torch

import hardware


def test_auto_dtype_follows_the_hardware():
    """bf16 where matmuls have bf16 units (CUDA; a CPU flag amx_bf16 or avx512_bf16, with torch's
    AVX-512 kernels in use), else fp32."""
    assert hardware.auto_dtype("cuda:0") == torch.bfloat16
    assert hardware.auto_dtype("cpu", "flags\t: fpu sse2 avx2 fma", "AVX2") == torch.float32
    assert hardware.auto_dtype("cpu", "flags\t: avx2 avx512f avx512_vnni", "AVX512") == torch.float32  # no bf16 units
    assert hardware.auto_dtype("cpu", "flags\t: avx512f avx512_bf16 avx512_vnni", "AVX512") == torch.bfloat16
    assert hardware.auto_dtype("cpu", "flags\t: avx2 amx_bf16 amx_tile", "AVX512") == torch.bfloat16
    assert hardware.auto_dtype("cpu", "flags\t: avx2 amx_bf16 amx_tile", "DEFAULT") == torch.float32  # kernels off
