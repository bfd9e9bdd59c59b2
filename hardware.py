"""
Hardware choices, in one place that neither the model nor the method imports: how many OpenMP
threads wait, and which compute dtype a device runs fastest. train.py and eval.py import this
module before torch.
"""

import os
import re

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
