"""
Hardware choices, in one place that neither the model nor the method imports: how many OpenMP
threads wait, which compute dtype a device runs fastest, and a dropout whose mask a CPU draws
quickly. train.py and eval.py import this module before torch.
"""

import os
import re

import numpy as np

# OpenMP threads that spin while waiting made steps 5-9x slower on a shared CPU; a user's own
# setting wins (read once, when torch loads its OpenMP runtime)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def auto_dtype(device, cpuinfo: str | None = None, capability: str | None = None) -> torch.dtype:
    """The compute dtype a device runs fastest without losing training quality: bf16 on CUDA and on
    CPUs with bf16 matrix units (AMX or AVX512-BF16, read from /proc/cpuinfo) whose AVX-512
    kernels torch uses (torch's CPU capability: ATEN_CPU_CAPABILITY=avx2 or default turns them
    off, and torch's bf16 matmuls then fail there); fp32 on other CPUs, where bf16 matmuls are
    emulated and run many times slower than fp32."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    if (capability or torch.backends.cpu.get_cpu_capability()) != "AVX512":
        return torch.float32
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return torch.float32
    return torch.bfloat16 if re.search(r"\b(amx_bf16|avx512_bf16)\b", cpuinfo) else torch.float32


def dropout(x, p: float):
    """x * Bernoulli(1 - p) / (1 - p), as torch's dropout in training mode. On a CPU the mask's
    random bits come from numpy's SFC64 generator, seeded by one draw from torch's generator (so
    torch.manual_seed and torch's saved RNG state still decide every mask): torch's CPU Bernoulli
    sampler draws a few ns an element, and LoRA's dropout on 7 inputs a layer took half of a
    Stage II forward pass (experiments/README.md); this mask costs a tenth of it. Each element is
    kept where 16 random bits reach round(p * 65536): p = 0.05 drops 0.0500031 of them."""
    if p == 0:
        return x
    if x.device.type != "cpu":
        return torch.nn.functional.dropout(x, p, training=True)
    seed = int(torch.randint(0, 2**62, (1,)))
    n = x.numel()
    bits = np.random.Generator(np.random.SFC64(seed)).integers(
        0, 2**64 - 1, (n + 3) // 4, dtype=np.uint64, endpoint=True)  # 4 x 16 bits in each
    u16 = torch.from_numpy(bits.view(np.int16)[:n]).view(x.shape)  # uniform on [-2^15, 2^15)
    keep = u16 >= round(p * 65536) - 2**15
    return torch.where(keep, x, 0.0) * (1 / (1 - p))
