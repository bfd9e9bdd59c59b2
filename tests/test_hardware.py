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


def test_dropout_is_torch_dropout_with_a_cheaper_mask():
    """hardware.dropout(x, p): each element zeroed with probability p, the rest scaled by 1 / (1 - p),
    the gradient through the same mask; torch's RNG state decides the mask (same seed, same mask;
    the next call, another), and p = 0 is the identity."""
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = hardware.dropout(x, 0.05)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002  # binomial sd over 1e6 elements: 0.0002
    assert set(y.unique().tolist()) == {0.0, torch.tensor(1 / 0.95).item()}
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x = mask / (1 - p), and x = 1
    torch.manual_seed(0)
    assert torch.equal(hardware.dropout(x, 0.05), y)
    assert not torch.equal(hardware.dropout(x, 0.05), y)
    rows = (y == 0).float().mean(1)  # no structure along either axis: each row drops about p
    assert rows.min() > 0.02 and rows.max() < 0.09
    assert hardware.dropout(x, 0.0) is x
    assert hardware.dropout(x.bfloat16(), 0.5).dtype == torch.bfloat16
