"""
The two training stages of arXiv 2509.03020, one linear loop.

  python train.py --stage recon                      # Stage I: EBQ2D + EBD2Q, full fine-tune
  python train.py --stage contrastive --model DIR    # Stage II: InfoNCE with LoRA (from Stage I)
  python train.py --stage contrastive                # the paper's baseline: Stage II, base model
  torchrun --nproc_per_node=8 train.py ...           # data-parallel; --batch-size: the global batch

The losses and the Stage II step are bireco.py's; this file holds what training needs around them:
the settings with each stage's defaults, LoRA, the learning-rate schedule, what a checkpoint holds
(checkpoint.py writes it atomically and restores it) and the loop. Stage I interleaves whole
batches of EBD2Q and EBQ2D at the ratio of the task weights (or sums both losses on every batch
with --mode sum, as the official code does). Every checkpoint is a plain model folder that
model.load_model, eval.py, transformers and sentence-transformers read (LoRA merged on save).
Under torchrun every rank draws the same global batch and takes its slice; Stage II gathers the
embeddings of all slices, so each query meets the whole global batch; gradients are summed across
ranks once per optimizer step; rank 0 prints and writes the checkpoints (hardware.py holds the
processes' plumbing).
Left out: mixed-precision master weights other than fp32 + autocast, dataloader worker processes.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import replace

import hardware  # first: it sets the OpenMP wait policy before torch loads
import numpy as np
import torch
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
        anchor_input="sided",  # paper: the anchor at position 0, which at this scale stays
                        # unread (held-out gap ~0 after 4,800 pairs); centred after a real token,
                        # the gap opens but the decoder writes the wrong side; sided: told which
                        # side it writes (bireco.Decoding, experiments/README.md)
        lr=4e-4,        # paper 4e-5 at batch 512-1,024; in fp32, peak at step 15: at 2e-4 the gap
                        # opened at step 30-110 by seed, in one of five not by 150; at 4e-4 at step
                        # 20-80 (with the peak at step 40 and bf16: 30-60; WARMUP_SHARE)
        steps=150,      # paper 2,000: 2,400 pairs, 12.3-12.5 min in bf16 (27.5 in fp32) on 2 cores
        batch_size=16,  # paper 512-1,024: what a CPU step affords
        mix="size",     # as the official code's loader: with the equal mix (every other batch a
                        # man page) the gap was still zero after 4,000 pairs
        task_weights=[0.5, 0.5],  # paper 0.8 / 0.2 (EBD2Q / EBQ2D): the decoder learns to write
                        # a document from as many batches as a query
        max_length=64,  # paper 512: cuts 79% of man-page descriptions (median 91 tokens); 0.63x
        lora_rank=0),
    "contrastive": dict(
        mix="equal",    # the official code's is size: here every other batch is a man page
        lr=2e-3,        # paper 2e-4 for ~1,000 steps; at 5e-4 the loss sat at chance 30 of 40 steps
        steps=40,       # paper: not stated (~1,000 at batch 1,024 is two thirds of an epoch)
        batch_size=32,  # paper 1,024 (63 candidates per query here, 2,047 there)
        max_length=64,  # paper 512: as Stage I
        lora_rank=16),
}
WARMUP_SHARE = {  # default --warmup: this share of the steps (the paper: 300 of 2,000)
    "recon": 40 / 150,  # with the peak at step 15 (a tenth), two seeds of five in bf16 collapsed
                        # their [EOS] vectors there and never read them; with it at 40, all five read
    "contrastive": 0.1}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
arg = parser.add_argument
arg("--stage", choices=["recon", "contrastive"],
    help="recon = Stage I (EBQ2D/EBD2Q), contrastive = Stage II; required unless --resume")
arg("--model", help="HF checkpoint folder (Llama/Qwen2/Qwen3); default: SmolLM2-135M-Instruct")
arg("--data", nargs="+", default=[os.path.join(HERE, d, "train") for d in ("wordnet", "manpages")],
    help="JSONL files {query, positive, negative}, one per source dataset, or folders of them")
arg("--mix", choices=["equal", "size"],
    help="each dataset's batches as often as the largest one's, or in proportion to its size "
    "(stage default)")
arg("--out", help="run folder; default out/<stage>-<model>-<date-time>")
arg("--resume", help="continue the run in this folder from its latest checkpoint")
arg("--overwrite", action="store_true", help="allow --out to be a folder holding another run")
arg("--steps", type=int, help="optimizer steps (stage default)")
arg("--stop-after", type=int, help="stop with a checkpoint after this many steps; then --resume")
arg("--batch-size", type=int, help="pairs per batch (stage default): Stage II's negative pool")
arg("--grad-accum", type=int, default=1, help="batches per step (the negative pool stays a batch)")
arg("--lr", type=float, help="peak learning rate (stage default)")
arg("--warmup", type=int, help="linear warmup steps, then linear decay to 0 (default: Stage I 40 of every "
    "150 steps, Stage II a tenth)")
arg("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
arg("--clip", type=float, default=1.0, help="gradient norm clip")
arg("--max-length", type=int, help="tokens per text, EOS included (stage default)")
arg("--task-weights", type=float, nargs=2, metavar=("D2Q", "Q2D"),
    help="Stage I weights of EBD2Q and EBQ2D; 1 0 = EBD2Q only, 0 1 = EBQ2D only (stage default)")
arg("--mode", choices=["interleave", "sum"], default="interleave",
    help="Stage I: one task per batch at the weights' ratio, or both on every batch")
decoder = parser.add_argument_group("Stage I: how the decoder reads the anchor (bireco.Decoding)")
decoder.add_argument("--anchor-input", choices=["sided", "centred", "paper"],
                     help="sided: a real token, the anchor minus the batch's mean at the token "
                     "embeddings' norm, then the written side's chat-turn opening; centred: the "
                     "same without the turn opening; paper: the anchor itself at position 0 "
                     "(stage default)")
decoder.add_argument("--shuffle-anchors", nargs="?", const="rolled", choices=["rolled", "detached"],
                     help="a control: each target decodes from another pair's anchor; detached: "
                     "with no gradient into that anchor")
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
arg("--sample-every", type=int,
    help="Stage I: held-out reconstructions, gap and form at the start, every N steps and at the "
    "end; 0 = never (default: at the start and the end only)")
# the untrained model's WordNet EBD2Q gap read -0.16, +0.14 and +0.09 on 16, 32 and 64 pairs
arg("--gap-pairs", type=int, default=128, help="Stage I: held-out pairs per dataset for the gap")

# -----------------------------------------------------------------------------
# LoRA: W x + (alpha / r) B A dropout(x), B initialised to zero so training starts at the base model


class LoRALinear(nn.Module):
    """A frozen nn.Linear (base) plus a trained low-rank update: A (r, in), B (out, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.p = dropout

    def forward(self, x):  # x (..., in) -> (..., out); the dropout touches the update's input only
        dropped = hardware.dropout(x, self.p) if self.training else x
        return self.base(x) + (dropped @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged_weight(self):  # (out, in): what a checkpoint stores, so it loads as a plain model
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale


LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def add_lora(model, rank, alpha, dropout):
    """Freezes the model and wraps each LORA_TARGETS projection of every layer in a LoRALinear."""
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
    what resuming needs (train_state.pt) and the run's settings (meta.json).
    rng: checkpoint.rng_states(), gathered from every process."""
    # full fine-tunes resume from the saved weights; LoRA runs from the base plus these adapters
    trainable = {k: p.detach() for k, p in model.named_parameters() if ".lora_" in k}
    state = dict(opt=opt.state_dict(), data=batches.state_dict(), trainable=trainable, rng=rng)
    meta = dict(stage=args.stage, step=step, steps=args.steps, data_position=batches.state_dict(),
                base_model=os.path.abspath(args.model),
                data=[os.path.abspath(d) for d in args.data],
                training_datasets=sorted(batches.data),
                dataset_sizes={k: len(v) for k, v in batches.data.items()}, args=vars(args))
    return checkpoint.save(run, step, model, merged_state_dict(model), state, meta, args.model)


# -----------------------------------------------------------------------------
# Steps


def lr_at(step, args):
    """Linear warmup to --lr over --warmup steps, then linear decay to 0 at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * max(0.0, (args.steps - step) / max(1, args.steps - args.warmup))


def micro_step(model, fmt, name, batch, micro, args, ctx):
    """One batch of either stage (this process's slice of it), back-propagated at 1 / --grad-accum.
    Returns ({name: loss}, Stage II's negatives per query or None). Under torchrun each Stage I
    loss is a mean over the global batch's target tokens of its task, to which each process adds
    its own tokens' share (bireco's `total`); the logged values are the global means. Interleaved
    Stage I also logs the gap of the batch (of dataset `name`) before its update ("gap
    wordnet/d2q": bireco.stage1_loss), the mean over the processes: on WordNet's pairs, each seen
    once in a run, it is a held-out estimate; the man pages' 351 pairs repeat, so theirs is not."""
    mine = hardware.my_slice(batch)
    if args.stage == "contrastive":  # each process embeds its slice; InfoNCE over the whole batch
        gather = hardware.gather_batch if hardware.WORLD > 1 else None
        value, negatives = contrastive_step(model, fmt, mine, args.chunk, args.temperature, ctx,
                                            1 / args.grad_accum, gather)
        return {"loss": value}, negatives
    how, (wd2q, wq2d) = Decoding.from_flags(vars(args), fmt), args.task_weights
    if hardware.WORLD > 1:  # centred anchors: minus the global batch's mean, as on one process
        how = replace(how, batch_mean=hardware.global_mean)
    with ctx:
        if args.mode == "interleave":  # the paper's text: one task a batch, at the weights' ratio
            task = stage1_task(micro, wd2q, wq2d)
            loss, _, gap = stage1_loss(model, fmt, mine, task, how=how, total=hardware.all_sum,
                                       gap=True)
            logs = {task: loss.item(), f"gap {name}/{task}": gap / hardware.WORLD}
        else:  # sum, as the official code: both tasks on every batch
            weights = {t: w for t, w in (("d2q", wd2q), ("q2d", wq2d)) if w > 0}
            loss, logs = stage1_sum_loss(model, fmt, mine, weights, how=how, total=hardware.all_sum)
            logs = {t: v for t, (v, _) in logs.items()}
    (loss / args.grad_accum).backward()
    return {t: hardware.all_sum(v) for t, v in logs.items()}, None


def print_samples(model, fmt, sets, what, step, ctx, how):
    """Stage I's progress at a sample point: bireco.heldout_report, under autocast as training."""
    with ctx:
        lines = heldout_report(model, fmt, sets, how, what=what, at=f" at step {step}",
                               shufflings=2)
    print(*lines, sep="\n", flush=True)


# -----------------------------------------------------------------------------
# Setting up a run


def settings(argv):
    """The run's settings: the flags with the stage's defaults filled in, or, with --resume, those
    the run was started with. Returns (args, the checkpoint to resume from, its meta.json) or
    (args, None, None)."""
    args = parser.parse_args(argv)
    if not (args.stage or args.resume):
        parser.error("--stage is required (or --resume RUN to continue a run)")
    hardware.init_processes(args.device)
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
        gone = [k for k in ("decoder_dropout", "detach_decoder") if saved.get(k)]
        if gone:  # options of older versions (experiments/README.md says where they live)
            sys.exit(f"error: {resume_from}/meta.json: the run used --{gone[0].replace('_', '-')}, "
                     "which this version no longer has; resume it with the version it started with")
        return argparse.Namespace(**saved), resume_from, meta
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch_size", "grad_accum", "max_length", "chunk", "save_every",
              "log_every"):
        if getattr(args, k) < 1:
            parser.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    if args.warmup is None:
        args.warmup = round(WARMUP_SHARE[args.stage] * args.steps)
    elif not 0 <= args.warmup < args.steps:  # else the schedule never decays
        parser.error(f"--warmup {args.warmup} must be at least 0 and below --steps {args.steps}")
    if args.sample_every is None:  # at the start and the end
        args.sample_every = args.steps
    if args.batch_size % hardware.WORLD:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the "
                     f"{hardware.WORLD} processes")
    args.model = args.model or default_model_dir()
    name = os.path.basename(os.path.normpath(args.model))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out = args.out or os.path.join("out", f"{args.stage}-{name}-{stamp}")
    if hardware.WORLD > 1:  # the ranks may have started in different seconds: rank 0's name
        args.out = hardware.broadcast_object(args.out)
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
    # fused: one kernel over all parameters; on a 2-core CPU 0.08 s a step for the 135M full
    # fine-tune of Stage I, where the per-tensor loop took 0.64 s (a tenth of the step)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999),
                            fused=device.type in ("cpu", "cuda"))
    if not resume_from:
        return data, batches, model, fmt, opt, 0
    try:
        checkpoint.restore(resume_from, model, opt, batches)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"resumed {args.resume} at step {meta['step']}/{args.steps}")
    return data, batches, model, fmt, opt, meta["step"]


# -----------------------------------------------------------------------------
# The loop


def main(argv=None):
    started = time.time()  # the wall time printed at the end: loading and reports included
    args, resume_from, meta = settings(argv)
    run = args.resume or args.out
    if args.dtype == "auto":  # resolved once, so a resumed run keeps the dtype it started with
        args.dtype = str(hardware.auto_dtype(args.device)).removeprefix("torch.")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    device = hardware.local_device(args.device)
    # weights and optimizer state stay fp32; bf16 autocast runs the matmuls where it pays
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    print("config:", json.dumps(vars(args), sort_keys=True))
    data, batches, model, fmt, opt, step = build(args, device, resume_from, meta)
    params = opt.param_groups[0]["params"]  # the trained ones, as build() gave them to AdamW
    n_all, n_trained = (sum(p.numel() for p in ps) / 1e6 for ps in (model.parameters(), params))
    world, rank = hardware.WORLD, hardware.RANK
    per_rank = f" | world size {world} ({args.batch_size // world} pairs per process)" * (world > 1)
    print(f"model {args.model}: {n_all:.1f}M parameters, {n_trained:.2f}M trained | data "
          f"{sum(map(len, data.values()))} pairs in {len(data)} datasets | batch "
          f"{args.batch_size} x accum {args.grad_accum} | device {device} {args.dtype}{per_rank}")
    last_saved = [resume_from]  # what every error message names: nothing is lost up to there
    saved = lambda: last_saved[0] or "none yet"  # noqa: E731
    stop = checkpoint.on_ctrl_c(saved)  # a list: non-empty once Ctrl-C asked to stop
    # Stage I only: what the [EOS] vector regenerates of held-out pairs, and the gap between the
    # loss given the true anchor and given another pair's (bireco.heldout_report)
    samples = args.stage == "recon" and args.sample_every > 0 and rank == 0
    if samples:
        what, shown = sample_sets(args.data, data, args.gap_pairs)
        how = Decoding.from_flags(vars(args), fmt)
        if step == 0:
            print_samples(model, fmt, shown, what, 0, ctx, how)
    start_step = first = step
    t0, window = time.time(), {}  # window: the losses and tokens since the last line
    while step < args.steps:
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            for micro in range(args.grad_accum):  # micro-batches whose gradients add up
                name, batch = next(batches)
                logs, negatives = micro_step(model, fmt, name, batch,
                                             step * args.grad_accum + micro, args, ctx)
                for k, v in logs.items():
                    window.setdefault(k, []).append(v)
                    if not math.isfinite(v):
                        sys.exit(f"error: non-finite loss ({k} = {v}) at step {step + 1}; stopping "
                                 f"without saving. Last saved checkpoint: {saved()}")
                window["tokens"] = window.get("tokens", 0) + sum(len(fmt.ids(t)) for p in batch
                                                                 for t in (p.query, p.positive))
            hardware.sum_gradients(params)  # under torchrun: the one-device gradient on each rank
            torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
        except Exception as e:  # CPU and CUDA allocators both raise a RuntimeError subclass
            if not hardware.out_of_memory(e):
                raise
            sys.exit(f"error: out of memory at step {step + 1} ({str(e).splitlines()[0][:200]}); "
                     "lower the memory a step needs with --batch-size, --chunk (Stage II), "
                     f"--grad-ckpt or --max-length. Last saved checkpoint: {saved()}")
        opt.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == args.steps:
            dt, tokens = time.time() - t0, window.pop("tokens")
            gap = lambda k: k.startswith("gap ")  # noqa: E731
            losses = " ".join(f"{k} {np.mean(v):.4f}" for k, v in window.items() if not gap(k))
            gaps = " ".join(f"{k.removeprefix('gap ')} {np.mean(v):+.3f}"
                            for k, v in window.items() if gap(k))
            losses += f" | batch gap {gaps}" if gaps else ""
            extra = f" | negatives/query {negatives}" if negatives is not None else ""
            eta = dt / (step - first) * (args.steps - step)
            print(f"step {step}/{args.steps} | {losses} | lr {lr:.2e} | {tokens / dt:.0f} tok/s"
                  f"{extra} | eta {eta / 60:.1f} min", flush=True)
            window, t0, first = {}, time.time(), step
            if samples and (step % args.sample_every == 0 or step == args.steps):
                print_samples(model, fmt, shown, what, step, ctx, how)
        if world > 1 and hardware.all_sum(len(stop)) and not stop:  # Ctrl-C on another rank
            stop.append("peer")
        done_here = args.stop_after is not None and step - start_step >= args.stop_after
        if step % args.save_every == 0 or step == args.steps or stop or done_here:
            rng = checkpoint.rng_states()  # a collective: every rank takes part
            if rank == 0:
                try:
                    last_saved[0] = save_checkpoint(run, model, opt, batches, step, args, rng)
                except checkpoint.SaveError as e:
                    sys.exit(f"error: {e}. The previous checkpoint is kept: {saved()}")
                print(f"saved {last_saved[0]}")
            hardware.barrier()  # the others wait for the checkpoint, so a stop leaves a whole one
        if stop or done_here:
            break
    truncated = int(hardware.all_sum(fmt.truncated))  # every rank's texts
    if truncated:
        print(f"note: {truncated} texts were longer than --max-length {args.max_length} tokens and "
              "were cut (their EOS kept)")
    print(f"done: {os.path.join(run, 'latest')} (step {step}/{args.steps}) in "
          f"{(time.time() - started) / 60:.1f} min")
    hardware.end_processes()


if __name__ == "__main__":
    main()
