"""
The machine a run uses, in one place that neither the model nor the method imports: how OpenMP
threads wait, which compute dtype a device runs fastest, a dropout whose mask a CPU draws quickly,
running out of memory, and the processes of a data-parallel run under torchrun (the paper trains on
8 GPUs). train.py and eval.py import this module before torch.
Left out: tensor, pipeline and sequence parallelism and FSDP: the paper's 1-1.5B models, their fp32
weights, gradients and AdamW state (~24 GB at 1.5B) fit on one GPU.
"""

import os
import re
import sys

import numpy as np

# OpenMP threads that spin while waiting made steps 5-9x slower on a shared CPU; a user's own
# setting wins (read once, when torch loads its OpenMP runtime)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


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


def out_of_memory(e: BaseException) -> bool:
    """Whether an exception is an allocation failing: CUDA's, Python's, or torch's CPU allocator's
    (a plain RuntimeError whose message says so)."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


# -----------------------------------------------------------------------------
# Data parallelism. torchrun starts one process per device and sets WORLD_SIZE, RANK and
# LOCAL_RANK; plain `python train.py` runs one process and never creates a process group. Every
# rank draws the same global batch and works on its own slice; the gradients are summed once per
# optimizer step by an explicit all-reduce rather than DistributedDataParallel: each rank's loss
# is already its share of the global loss (Stage II: the gradient of the one global InfoNCE loss;
# Stage I: token sums over the global token count), so the sum is the one-device gradient,
# whatever the micro-batches, chunks and passes were.

RANK, WORLD = 0, 1  # this process's rank, the number of processes


def init_processes(device: str):
    """Joins torchrun's process group, if there is one: NCCL with one GPU per process, or gloo.
    Rank 0 alone prints; errors still reach stderr from every rank."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    if RANK:
        sys.stdout = open(os.devnull, "w")


def local_device(device: str) -> torch.device:
    """Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if WORLD > 1 and device.startswith("cuda"):
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def my_slice(batch: list) -> list:
    """This rank's contiguous share of the global batch (rank order = batch order)."""
    n = len(batch) // WORLD
    return batch[RANK * n:(RANK + 1) * n]


def all_sum(x: float | int) -> float:
    """The sum of x over the ranks (x itself in one process)."""
    if WORLD == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def sum_gradients(params):
    """Each parameter's gradient summed over the ranks, in place."""
    if WORLD == 1:
        return
    for p in params:
        if p.grad is None:  # every rank reduces the same tensors, in the same order
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def gather_batch(reps, sections: int):
    """Stage II: this rank's embeddings (sections x its slice, D) -> the global batch's, every
    rank's slices in rank order within each section; only this rank's carry a gradient."""
    parts = [torch.empty_like(reps) for _ in range(WORLD)]
    dist.all_gather(parts, reps.detach().contiguous())
    parts[RANK] = reps
    return torch.cat([part.chunk(sections)[k] for k in range(sections) for part in parts])


def global_mean(x):
    """Stage I's centred anchors: this rank's rows (b, D) -> the mean over every rank's rows (1, D),
    as one process would take it over the whole batch. Differentiable: the backward sums every
    rank's gradient of the mean, so each rank's anchors get what the whole batch's loss asks."""
    from torch.distributed.nn.functional import all_reduce
    total = all_reduce(x.float().sum(0, keepdim=True))  # fp32: gloo and bf16 do not always meet
    return (total / (len(x) * WORLD)).to(x.dtype)


def gather_objects(obj) -> list:
    """Every rank's obj, in rank order (pickled; for small things such as RNG states)."""
    objs = [None] * WORLD
    dist.all_gather_object(objs, obj)
    return objs


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    objs = [obj]
    dist.broadcast_object_list(objs)
    return objs[0]


def barrier():
    if WORLD > 1:
        dist.barrier()


def end_processes():
    """Leaves the process group. The barrier first: gloo's worker thread frees the last collective's
    tensors after the caller has moved on, and freeing a tensor made in Python takes the GIL; if the
    interpreter is already shutting down by then, the process aborts ("terminate called without an
    active exception", about one two-process run in fifteen). Waiting in the barrier hands the
    thread the GIL while the interpreter is still whole."""
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()
