"""
The two training stages of arXiv 2509.03020, one linear loop.

  python train.py --stage recon                      # Stage I: EBQ2D + EBD2Q, full fine-tune
  python train.py --stage contrastive --model DIR    # Stage II: InfoNCE with LoRA (from Stage I)
  python train.py --stage contrastive                # the paper's baseline: Stage II, base model
  torchrun --nproc_per_node=8 train.py ...           # data-parallel; --batch-size: the global batch

The losses and the Stage II step are bireco.py's; this file holds what training needs around them:
the settings with each stage's defaults, LoRA, the learning-rate schedule, what a checkpoint holds
(checkpoint.py writes it atomically) and the data-parallel plumbing. Stage I interleaves whole
batches of EBD2Q and EBQ2D at the ratio of the task weights (or sums both losses on every batch
with --mode sum, as the official code does). Every checkpoint is a plain model folder that
model.load_model, eval.py, transformers and sentence-transformers read (LoRA merged on save).
Under torchrun every rank draws the same global batch and takes its slice; Stage II gathers the
embeddings of all slices, so each query meets the whole global batch; gradients are summed across
ranks once per optimizer step; rank 0 prints and writes the checkpoints.
Left out: mixed-precision master weights other than fp32 + autocast, dataloader worker processes.
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import time

import hardware  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
from bireco import Decoding, contrastive_step, heldout_report, stage1_loss, stage1_sum_loss
from data import Batches, DataError, TextFormat, load_pairs, sample_sets, stage1_task
from model import load_model, load_tokenizer
from smollm2 import default_model_dir

HERE = os.path.dirname(os.path.abspath(__file__))

# Per-stage defaults: the CPU recipe, chosen on the validation splits (experiments/README.md).
# Stage I is a full fine-tune; Stage II trains LoRA adapters (r16, alpha 32, dropout 0.05, the
# paper's) on q,k,v,o,gate,up,down. Where a number differs from the paper's, and why:
STAGE_DEFAULTS = {
    "recon": dict(
        lr=2e-5,        # paper 4e-5 at batch 512-1,024; at batch 8 that rate broke 3 of 12 runs
        steps=100,      # paper 2,000: ~5 minutes here
        batch_size=16,  # paper 512-1,024: what a CPU step affords
        max_length=64,  # paper 512: cuts 79% of man-page descriptions (median 91 tokens); 0.63x
        lora_rank=0),
    "contrastive": dict(
        lr=2e-3,        # paper 2e-4 for ~1,000 steps; at 5e-4 the loss sat at chance 30 of 40 steps
        steps=40,       # paper: not stated (~1,000 at batch 1,024 is two thirds of an epoch)
        batch_size=32,  # paper 1,024 (63 candidates per query here, 2,047 there)
        max_length=64,  # paper 512: as Stage I
        lora_rank=16),
}
WARMUP_SHARE = 0.1  # default --warmup: this share of the steps (the paper: 300 of 2,000)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
arg = parser.add_argument
arg("--stage", choices=["recon", "contrastive"],
    help="recon = Stage I (EBQ2D/EBD2Q), contrastive = Stage II; required unless --resume")
arg("--model", help="HF checkpoint folder (Llama/Qwen2/Qwen3); default: SmolLM2-135M-Instruct")
arg("--data", nargs="+", default=[os.path.join(HERE, d, "train") for d in ("wordnet", "manpages")],
    help="JSONL files {query, positive, negative}, one per source dataset, or folders of them")
arg("--mix", choices=["equal", "size"], default="equal",
    help="each dataset's batches as often as the largest one's, or in proportion to its size")
arg("--out", help="run folder; default out/<stage>-<model>-<date-time>")
arg("--resume", help="continue the run in this folder from its latest checkpoint")
arg("--overwrite", action="store_true", help="allow --out to be a folder holding another run")
arg("--steps", type=int, help="optimizer steps (stage default)")
arg("--stop-after", type=int, help="stop with a checkpoint after this many steps; then --resume")
arg("--batch-size", type=int, help="pairs per batch (stage default): Stage II's negative pool")
arg("--grad-accum", type=int, default=1, help="batches per step (the negative pool stays a batch)")
arg("--lr", type=float, help="peak learning rate (stage default)")
arg("--warmup", type=int, help="linear warmup steps, then linear decay to 0 (default: steps / 10)")
arg("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
arg("--clip", type=float, default=1.0, help="gradient norm clip")
arg("--max-length", type=int, help="tokens per text, EOS included (stage default)")
arg("--task-weights", type=float, nargs=2, default=[0.8, 0.2], metavar=("D2Q", "Q2D"),
    help="Stage I weights of EBD2Q and EBQ2D; 1 0 = EBD2Q only, 0 1 = EBQ2D only")
arg("--mode", choices=["interleave", "sum"], default="interleave",
    help="Stage I: one task per batch at the weights' ratio, or both on every batch")
decoder = parser.add_argument_group("Stage I decoder options, not in the paper (bireco.Decoding)")
decoder.add_argument("--decoder-dropout", type=float, default=0.0,
                     help="share of the decoder's input tokens replaced by zero vectors")
decoder.add_argument("--detach-decoder", action="store_true",
                     help="the decoder pass trains no weight: they learn through the anchor only")
decoder.add_argument("--sink", action="store_true",
                     help="the template's first token before the anchor (then at position 1)")
decoder.add_argument("--centre-anchors", action="store_true",
                     help="the anchor minus the batch's mean, at the token embeddings' norm")
decoder.add_argument("--shuffle-anchors", action="store_true",
                     help="a control: each target decodes from another pair's anchor")
arg("--temperature", type=float, default=0.02, help="Stage II InfoNCE temperature")
arg("--lora-rank", type=int, help="LoRA rank; 0 = full fine-tune (stage default)")
arg("--lora-alpha", type=float, default=32.0, help="LoRA alpha (scale = alpha / rank)")
arg("--lora-dropout", type=float, default=0.05, help="LoRA input dropout")
# 1024: the default Stage II batch (96 texts of at most 64 tokens) as the cached step, in passes of
# at most 1,024 padded tokens: 6 default steps in fp32 on a 2-core CPU without bf16 units took 238 s
# at a peak RSS of 5.4 GB; before, as one plain pass (8192) with torch's dropout, 241 s and 16.7 GB
arg("--chunk", type=int, default=1024,
    help="Stage II: padded tokens a pass holds with autograd; lower it to need less memory")
arg("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
    help="autocast dtype (weights stay fp32); auto: bf16 on CUDA and CPUs with bf16 units")
arg("--device", default="cuda" if torch.cuda.is_available() else "cpu")
arg("--grad-ckpt", action="store_true", help="activation checkpointing per layer")
arg("--seed", type=int, default=0)
arg("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
arg("--log-every", type=int, default=10, help="progress line every N steps")
arg("--sample-every", type=int, default=50,
    help="Stage I: held-out reconstructions and gap at the start, every N steps; 0 = never")
# the untrained model's WordNet EBD2Q gap read -0.16, +0.14 and +0.09 on 16, 32 and 64 pairs
arg("--gap-pairs", type=int, default=32, help="Stage I: held-out pairs per dataset for the gap")

# -----------------------------------------------------------------------------
# LoRA: W x + (alpha / r) B A dropout(x), B initialised to zero so training starts at the base model


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.p = dropout

    def forward(self, x):
        dropped = hardware.dropout(x, self.p) if self.training else x
        return self.base(x) + (dropped @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged_weight(self):
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale


LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def add_lora(model, rank, alpha, dropout):
    model.requires_grad_(False)
    for layer in model.model.layers:
        for target in LORA_TARGETS:
            parent, name = target.split(".")
            owner = getattr(layer, parent)
            setattr(owner, name, LoRALinear(getattr(owner, name), rank, alpha, dropout))


def merged_state_dict(model):
    """The model's weights with every LoRA adapter folded in, under the plain HF key names."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            del sd[f"{name}.base.weight"]
            sd[f"{name}.weight"] = m.merged_weight().detach()
            if m.base.bias is not None:
                sd[f"{name}.bias"] = sd.pop(f"{name}.base.bias")
    return sd


# -----------------------------------------------------------------------------
# Checkpoints (checkpoint.py writes them atomically; here: what goes in)


def save_checkpoint(run, model, opt, batches, step, args, rng):
    """<run>/step-NNNNNN and <run>/latest: the weights with LoRA merged (a plain model folder),
    what resuming needs (train_state.pt) and the run's settings (meta.json). rng: rng_states()."""
    # full fine-tunes resume from the saved weights; LoRA runs from the base plus these adapters
    trainable = {k: p.detach() for k, p in model.named_parameters() if ".lora_" in k}
    state = dict(opt=opt.state_dict(), data=batches.state_dict(), trainable=trainable, rng=rng)
    meta = dict(stage=args.stage, step=step, steps=args.steps, data_position=batches.state_dict(),
                base_model=os.path.abspath(args.model),
                data=[os.path.abspath(d) for d in args.data],
                training_datasets=sorted(batches.data),
                dataset_sizes={k: len(v) for k, v in batches.data.items()}, args=vars(args))
    return checkpoint.save(run, step, model, merged_state_dict(model), state, meta, args.model)


def rng_states():
    """Every RNG a step draws from; under torchrun every rank's (their dropout masks differ)."""
    if WORLD == 1:
        return checkpoint.rng_state()
    ranks = [None] * WORLD
    dist.all_gather_object(ranks, checkpoint.rng_state())  # torch's states: CPU byte tensors
    return {"ranks": ranks}


# -----------------------------------------------------------------------------
# Data parallelism: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; plain `python train.py` runs
# one process and never creates a process group.

RANK, WORLD = 0, 1


def setup_distributed(device: str):
    """Joins torchrun's process group, if there is one: NCCL with one GPU per process, or gloo."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    if RANK:  # rank 0 alone prints; errors still reach stderr from every rank
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
    if WORLD == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def sum_gradients(params):
    """Sums the ranks' gradients. An explicit all-reduce once per optimizer step rather than
    DistributedDataParallel: each rank's loss is already its share of the global loss (Stage II:
    the gradient of the one global InfoNCE loss; Stage I: token sums over the global token count),
    so the sum is the one-device gradient, whatever the micro-batches, chunks and passes were."""
    if WORLD == 1:
        return
    for p in params:
        if p.grad is None:  # every rank reduces the same tensors, in the same order
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def gather_batch(reps, sections: int):
    """Stage II under torchrun: this rank's embeddings (sections x its slice, D) -> the global
    batch's, every rank's slices in rank order within each section; only this rank's carry a
    gradient."""
    parts = [torch.empty_like(reps) for _ in range(WORLD)]
    dist.all_gather(parts, reps.detach().contiguous())
    parts[RANK] = reps
    return torch.cat([part.chunk(sections)[k] for k in range(sections) for part in parts])


# -----------------------------------------------------------------------------
# Steps


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))  # torch's CPU allocator


def lr_at(step, args):
    """Linear warmup to --lr over --warmup steps, then linear decay to 0 at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * max(0.0, (args.steps - step) / max(1, args.steps - args.warmup))


def decoding(args, fmt) -> Decoding:
    """Stage I's decoder options from the flags (bireco.Decoding)."""
    return Decoding.from_flags(vars(args), fmt)


def recon_step(model, fmt, batch, micro, args, ctx):
    """Stage I on one batch: returns (loss to backprop, {task: (loss, target tokens)}). Across
    ranks each loss is a mean over the global batch's target tokens of that task, each rank
    contributing its own tokens' sum; the logged values are the global means."""
    w = dict(d2q=args.task_weights[0], q2d=args.task_weights[1])
    mine, share = my_slice(batch), dict(d2q=1.0, q2d=1.0)  # this rank's share of a task's tokens
    if WORLD > 1:
        for task, texts in (("d2q", [p.query for p in mine]), ("q2d", [p.positive for p in mine])):
            tokens = sum(min(len(fmt.ids(x)), fmt.max_length - 1) for x in texts)  # as target_ids
            share[task] = tokens / all_sum(tokens)
    if args.mode == "interleave":
        task = stage1_task(micro, w["d2q"], w["q2d"])
        with ctx:
            loss, n_tok = stage1_loss(model, fmt, mine, task, how=decoding(args, fmt))
        loss = loss * share[task]
        return loss, {task: (all_sum(loss.item()), int(all_sum(n_tok)))}
    weights = {t: w[t] * share[t] for t in ("d2q", "q2d") if w[t] > 0}  # local -> global
    with ctx:  # sum: both tasks, one output-layer pass over their targets
        loss, logs = stage1_sum_loss(model, fmt, mine, weights, how=decoding(args, fmt))
    return loss, {t: (all_sum(v * share[t]), int(all_sum(n))) for t, (v, n) in logs.items()}


def micro_step(model, fmt, batch, micro, args, ctx):
    """One batch of either stage, back-propagated at 1 / --grad-accum. Returns ({name: (loss,
    count)}, Stage II's negatives per query or None)."""
    if args.stage == "recon":
        loss, logs = recon_step(model, fmt, batch, micro, args, ctx)
        (loss / args.grad_accum).backward()
        return logs, None
    gather = gather_batch if WORLD > 1 else None
    value, negatives = contrastive_step(model, fmt, my_slice(batch), args.chunk, args.temperature,
                                        ctx, 1 / args.grad_accum, gather)
    return {"loss": (value, len(batch))}, negatives


def print_samples(model, fmt, sets, what, step, ctx, how):
    """bireco.heldout_report at a sample point, in eval mode, not counting its texts as cut."""
    model.eval()
    counted = fmt.truncated  # the warning counts training texts, not these
    with ctx:
        lines = heldout_report(model, fmt, sets, how, what=what, at=f" at step {step}")
    print(*lines, sep="\n", flush=True)
    fmt.truncated = counted
    model.train()


# -----------------------------------------------------------------------------
# Setting up a run


def settings(argv):
    """The run's settings: the flags with the stage's defaults filled in, or, with --resume, those
    the run was started with. Returns (args, the checkpoint to resume from, its meta.json) or
    (args, None, None)."""
    args = parser.parse_args(argv)
    if not (args.stage or args.resume):
        parser.error("--stage is required (or --resume RUN to continue a run)")
    setup_distributed(args.device)
    if args.resume:
        changed = [k for k, v in vars(args).items()
                   if k not in ("resume", "stop_after") and v != parser.get_default(k)]
        if changed:  # a run continues with the settings it started with
            parser.error(f"--resume continues a run with its saved settings; only --stop-after "
                         f"may be given with it, not --{changed[0].replace('_', '-')}")
        try:
            resume_from = checkpoint.latest(args.resume)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        with open(os.path.join(resume_from, "meta.json")) as f:
            meta = json.load(f)
        saved = {**meta["args"], "resume": args.resume, "stop_after": args.stop_after}
        return argparse.Namespace(**saved), resume_from, meta
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch_size", "grad_accum", "max_length", "chunk", "save_every",
              "log_every"):
        if getattr(args, k) < 1:
            parser.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    if args.warmup is None:
        args.warmup = round(WARMUP_SHARE * args.steps)
    elif not 0 <= args.warmup < args.steps:  # else the schedule never decays
        parser.error(f"--warmup {args.warmup} must be at least 0 and below --steps {args.steps}")
    if args.batch_size % WORLD:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the {WORLD} processes")
    args.model = args.model or default_model_dir()
    name = os.path.basename(os.path.normpath(args.model))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out = args.out or os.path.join("out", f"{args.stage}-{name}-{stamp}")
    if WORLD > 1:  # the ranks may have started in different seconds: rank 0's name
        names = [args.out]
        dist.broadcast_object_list(names)
        args.out = names[0]
    if os.path.lexists(os.path.join(args.out, "latest")) and not args.overwrite:
        sys.exit(f"error: {args.out} already holds a run; pass --resume {args.out} to continue it "
                 "or --overwrite to replace it")
    return args, None, None


def build(args, device, resume_from, meta):
    """Data, model (with LoRA for Stage II), tokenizer format and optimizer, at the saved state
    when resuming. Returns (data, batches, model, fmt, opt, step)."""
    try:
        data = load_pairs(*args.data)
        batches = Batches(data, args.batch_size, args.seed, args.mix)
    except DataError as e:
        sys.exit(f"error: {e}")
    sizes = {k: len(v) for k, v in data.items()}
    if meta and meta.get("dataset_sizes") != sizes:  # the saved data position would point elsewhere
        sys.exit(f"error: {' '.join(args.data)} changed since the run started: datasets and sizes "
                 f"{meta.get('dataset_sizes')} then, {sizes} now; cannot resume on other data")
    try:  # a full fine-tune resumes from its saved weights, LoRA from the base plus saved adapters
        weights = resume_from if resume_from and args.lora_rank == 0 else args.model
        model = load_model(weights, device=device)
        tok, eos_ids = load_tokenizer(args.model)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    fmt = TextFormat(tok, eos_ids, args.max_length)
    # a template longer than --max-length fails here, not at the first batch that meets it; queries
    # (with their instructions) are embedded by EBQ2D and Stage II, EBD2Q embeds documents only
    queries = args.stage == "contrastive" or args.task_weights[1] > 0
    instructions = {p.instruction for v in data.values() for p in v} if queries else set()
    try:
        for instruction in instructions | {None}:
            fmt.embed_ids("", instruction)
    except ValueError as e:
        sys.exit(f"error: --max-length {args.max_length} is too short: {e}")
    if args.lora_rank > 0:
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout)
    model.gradient_checkpointing = args.grad_ckpt
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    if not resume_from:
        return data, batches, model, fmt, opt, 0
    state = torch.load(os.path.join(resume_from, "train_state.pt"), map_location=device,
                       weights_only=False)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state["trainable"].items():
            named[k].copy_(v)
    opt.load_state_dict(state["opt"])
    batches.load_state_dict(state["data"])
    saved = len(state["rng"]["ranks"]) if isinstance(state["rng"], dict) else 1
    if saved != WORLD:
        sys.exit(f"error: {resume_from} was saved by {saved} process(es); resume it with as many "
                 f"(torchrun --nproc_per_node={saved}), not {WORLD}")
    checkpoint.set_rng_state(state["rng"]["ranks"][RANK] if WORLD > 1 else state["rng"])
    print(f"resumed {args.resume} at step {meta['step']}/{args.steps}")
    return data, batches, model, fmt, opt, meta["step"]


def on_ctrl_c(last_saved) -> list:
    """Ctrl-C finishes the current step, saves and exits; a second Ctrl-C aborts at once. Returns
    the list the handler appends to; last_saved: a one-item list naming the last checkpoint."""
    stop = []

    def handler(sig, frame):
        if stop:  # exit status 130 = 128 + SIGINT, as for a process killed by Ctrl-C
            print("\ninterrupt: aborted without saving. Last saved checkpoint: "
                  f"{last_saved[0] or 'none yet'}", file=sys.stderr)
            sys.exit(130)
        stop.append(sig)
        print("\ninterrupt: finishing this step, then saving (Ctrl-C again: abort without saving)",
              file=sys.stderr)
    signal.signal(signal.SIGINT, handler)
    return stop


# -----------------------------------------------------------------------------
# The loop


def main(argv=None):
    args, resume_from, meta = settings(argv)
    run = args.resume or args.out
    if args.dtype == "auto":  # resolved once, so a resumed run keeps the dtype it started with
        args.dtype = str(hardware.auto_dtype(args.device)).removeprefix("torch.")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    device = local_device(args.device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    print("config:", json.dumps(vars(args), sort_keys=True))
    data, batches, model, fmt, opt, step = build(args, device, resume_from, meta)
    params = opt.param_groups[0]["params"]  # the trained ones, as build() gave them to AdamW
    n_all, n_trained = (sum(p.numel() for p in ps) / 1e6 for ps in (model.parameters(), params))
    world = f" | world size {WORLD} ({args.batch_size // WORLD} pairs per process)" * (WORLD > 1)
    print(f"model {args.model}: {n_all:.1f}M parameters, {n_trained:.2f}M trained | data "
          f"{sum(map(len, data.values()))} pairs in {len(data)} datasets | batch "
          f"{args.batch_size} x accum {args.grad_accum} | device {device} {args.dtype}{world}")
    last_saved = [resume_from]
    stop = on_ctrl_c(last_saved)
    samples = args.stage == "recon" and args.sample_every > 0 and RANK == 0
    if samples:
        what, shown = sample_sets(args.data, data, args.gap_pairs)
        if step == 0:
            print_samples(model, fmt, shown, what, 0, ctx, decoding(args, fmt))
    start_step = first = step
    t0, window, warned = time.time(), {}, 0
    while step < args.steps:
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            for micro in range(args.grad_accum):
                _, batch = next(batches)
                logs, negatives = micro_step(model, fmt, batch, step * args.grad_accum + micro,
                                             args, ctx)
                for k, (v, _) in logs.items():
                    window.setdefault(k, []).append(v)
                    if not math.isfinite(v):
                        sys.exit(f"error: non-finite loss ({k} = {v}) at step {step + 1}; stopping "
                                 "without saving. Last saved checkpoint: "
                                 f"{last_saved[0] or 'none yet'}")
                window["tokens"] = window.get("tokens", 0) + sum(len(fmt.ids(t)) for p in batch
                                                                 for t in (p.query, p.positive))
            sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
        except Exception as e:  # CPU and CUDA allocators both raise a RuntimeError subclass
            if not out_of_memory(e):
                raise
            sys.exit(f"error: out of memory at step {step + 1} ({str(e).splitlines()[0][:200]}); "
                     "lower the memory a step needs with --batch-size, --chunk (Stage II), "
                     "--grad-ckpt or --max-length. Last saved checkpoint: "
                     f"{last_saved[0] or 'none yet'}")
        opt.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == args.steps:
            dt, tokens = time.time() - t0, window.pop("tokens")
            losses = " ".join(f"{k} {np.mean(v):.4f}" for k, v in window.items())
            extra = f" | negatives/query {negatives}" if negatives is not None else ""
            eta = dt / (step - first) * (args.steps - step)
            print(f"step {step}/{args.steps} | {losses} | lr {lr:.2e} | {tokens / dt:.0f} tok/s"
                  f"{extra} | eta {eta / 60:.1f} min", flush=True)
            window, t0, first = {}, time.time(), step
            truncated = int(all_sum(fmt.truncated))  # every rank's texts
            if truncated > warned:
                print(f"warning: {truncated} texts so far were longer than --max-length "
                      f"{args.max_length} tokens and were cut (their EOS kept)")
                warned = truncated
            if samples and (step % args.sample_every == 0 or step == args.steps):
                print_samples(model, fmt, shown, what, step, ctx, decoding(args, fmt))
        if WORLD > 1 and all_sum(len(stop)) and not stop:  # Ctrl-C reached another rank: all stop
            stop.append("peer")
        done_here = args.stop_after is not None and step - start_step >= args.stop_after
        if step % args.save_every == 0 or step == args.steps or stop or done_here:
            rng = rng_states()  # every rank's, gathered
            if RANK == 0:
                try:
                    last_saved[0] = save_checkpoint(run, model, opt, batches, step, args, rng)
                except checkpoint.SaveError as e:
                    sys.exit(f"error: {e}. The previous checkpoint is kept: "
                             f"{last_saved[0] or 'none yet'}")
                print(f"saved {last_saved[0]}")
            if WORLD > 1:
                dist.barrier()  # the others wait for the checkpoint, so a stop leaves a whole one
        if stop or done_here:
            break
    print(f"done: {os.path.join(run, 'latest')} (step {step}/{args.steps})")
    if WORLD > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
