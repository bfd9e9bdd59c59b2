"""
The usual mistakes of someone rebuilding this project, and the tests that catch each one.

  python tests/mistakes.py                 # every mistake: a table of caught / missed
  python tests/mistakes.py rope-interleaved gqa-repeat-order    # some of them
  python tests/mistakes.py --list          # names, steps and what each edit does

Each mistake is a small edit of the real source (a line or two replaced, as a learner might write
it). For each, the tracked files are copied to a temporary folder, the edit is applied there, and
only the tests of the step the mistake belongs to run (exercise.md gives each step's command).
The mistake is caught when those tests fail. First the same commands run on the untouched copy,
which must pass: a command that fails anyway catches nothing. Exits 1 if any mistake is missed.
Takes about 5 minutes on 2 cores (most of it pytest starting and the tiny models being built).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each step of exercise.md and the tests that say when it is right (run from the repository root).
STEPS = {
    1: ("the decoder", "tests/test_model.py -k 'parity or bidirectional or last_position'"),
    2: ("the text format", "tests/test_data.py -k 'format or one_piece or content_only or truncation'"),
    3: ("the [EOS] embedding", "tests/test_bireco.py -k 'pooling or embed'"),
    4: ("Stage I's decoder input and loss",
        "tests/test_bireco.py -k 'reconstruction_loss or padded_targets or gradient_reaches or sink "
        "or centred or sided or shuffled or greedy'"),
    5: ("EBQ2D, EBD2Q and their interleaving",
        "tests/test_bireco.py tests/test_data.py -k 'stage1 or schedule'"),
    6: ("InfoNCE", "tests/test_bireco.py -k contrastive_loss"),
    7: ("the cached step", "tests/test_contrastive_step.py"),
    8: ("the schedule and LoRA", "tests/test_train.py -k 'warmup or lora'"),
    9: ("the held-out gap", "tests/test_bireco.py tests/test_eval.py -k 'gap or anchor_losses or reconstruct_prints'"),
}


@dataclass
class Mistake:
    name: str
    step: int
    file: str
    old: str  # must occur exactly once in the file
    new: str
    what: str


MISTAKES = [
    # step 1: the decoder
    Mistake("rmsnorm-weight-first", 1, "model.py",
            "        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 or wider\n"
            "        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)\n"
            "        return self.weight * xf.to(x.dtype)",
            "        xf = (self.weight * x).to(torch.promote_types(x.dtype, torch.float32))\n"
            "        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)\n"
            "        return xf.to(x.dtype)",
            "RMSNorm's weight applied before normalising, not after"),
    Mistake("rmsnorm-no-eps-sqrt", 1, "model.py",
            "torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)",
            "1 / (xf.pow(2).mean(-1, keepdim=True) + self.eps)",
            "RMSNorm divides by the mean square instead of its square root"),
    Mistake("rope-interleaved", 1, "model.py",
            "    x1, x2 = xf.chunk(2, dim=-1)  # (B, H, T, d/2) each\n"
            "    rotated = torch.cat((-x2, x1), dim=-1)",
            "    x1, x2 = xf[..., 0::2], xf[..., 1::2]  # neighbours (2i, 2i + 1)\n"
            "    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)",
            "RoPE in the interleaved layout of the RoPE paper, not the checkpoints' rotate-half"),
    Mistake("gqa-repeat-order", 1, "model.py",
            "        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)\n"
            "        v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)",
            "        k = k.repeat(1, self.n_head // self.n_kv_head, 1, 1)\n"
            "        v = v.repeat(1, self.n_head // self.n_kv_head, 1, 1)",
            "key/value heads repeated as a block (0 1 0 1) instead of each in place (0 0 1 1)"),
    Mistake("swiglu-swapped", 1, "model.py",
            "self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))",
            "self.down_proj(self.gate_proj(x) * F.silu(self.up_proj(x)))",
            "SwiGLU's SiLU on the up projection instead of the gate"),
    Mistake("mask-not-causal", 1, "model.py",
            "        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=padding_mask.device).tril()",
            "        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=padding_mask.device)",
            "the explicit mask (left padding) lets every token see the ones after it"),
    # Not a mistake, so not listed: positions counted from the row's start, padding included. A
    # constant shift of every position in a row leaves RoPE's q . k unchanged (it depends on the
    # difference only), so left-padded rows come out the same.
    # step 2: the text format
    Mistake("no-eos-appended", 2, "data.py",
            "        return self.head + self._fit(self.ids(prefix + text), room) + [self.eos_id]",
            "        return self.head + self._fit(self.ids(prefix + text), room + 1)",
            "the embedded text does not end in the EOS token"),
    Mistake("template-in-targets", 2, "data.py",
            "        return self._fit(self.ids(text), self.max_length - 1)  # the anchor takes one position",
            "        return self._fit(self.head + self.ids(text), self.max_length - 1)",
            "the chat template's tokens counted as reconstruction targets"),
    Mistake("truncation-drops-eos", 2, "data.py",
            "        room = self.max_length - len(self.head) - 1\n",
            "        room = self.max_length - len(self.head)\n",
            "a cut text loses its EOS (max_length + 1 tokens, or the EOS cut off)"),
    # step 3: the [EOS] embedding
    Mistake("pool-padded-last", 3, "bireco.py",
            "    return (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)",
            "    return torch.full((mask.shape[0],), mask.shape[1] - 1, device=mask.device)",
            "pooling the last position of the padded row instead of the EOS"),
    Mistake("pool-first-token", 3, "bireco.py",
            "    return (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)",
            "    return mask.long().argmax(1)",
            "pooling the first real token (a BERT-style [CLS]) instead of the last"),
    # step 4: Stage I's decoder input and loss
    Mistake("anchor-predicts-y2", 4, "bireco.py",
            "    return h[mask], targets[mask]\n",
            "    return h[mask], targets.roll(-1, dims=1)[mask]\n",
            "the anchor's position predicts y_2 (and every position one token too far)"),
    Mistake("anchor-after-tokens", 4, "bireco.py",
            "    x = torch.cat([prefix.to(tok.dtype), tok], dim=1)  # (B, P + n-1, D)",
            "    x = torch.cat([tok, prefix.to(tok.dtype)], dim=1)  # (B, P + n-1, D)",
            "the anchor appended after y_1 .. y_(n-1) instead of before them"),
    Mistake("anchor-detached", 4, "bireco.py",
            "    prefix = how.prefix(anchor, W, prompt, roll=1 if how.shuffle else 0)",
            "    prefix = how.prefix(anchor.detach(), W, prompt, roll=1 if how.shuffle else 0)",
            "the anchor detached: no gradient reaches the pass that embedded the other side"),
    Mistake("loss-mean-over-rows", 4, "bireco.py",
            "    return target_cross_entropy(model, h, y, chunk=chunk)[0] / (tokens or len(y))",
            "    return target_cross_entropy(model, h, y, chunk=chunk)[0] / (tokens or len(targets))",
            "the summed cross-entropy divided by the rows instead of the target tokens"),
    Mistake("centre-no-rescale", 4, "bireco.py",
            "    return v * (scale / v.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(v.dtype)",
            "    return v",
            "centred anchors left at their own norm, not the token embeddings'"),
    # step 5: EBQ2D, EBD2Q and their interleaving
    Mistake("instruction-in-d2q-target", 5, "bireco.py",
            "        return [(None, p.positive) for p in pairs], [p.query for p in pairs]",
            "        return [(None, p.positive) for p in pairs], [f\"Instruct: {p.instruction}\\nQuery: {p.query}\"\n"
            "                                                     for p in pairs]",
            "EBD2Q's targets include the instruction, not only the query's text"),
    Mistake("q2d-without-instruction", 5, "bireco.py",
            "        return [(p.instruction, p.query) for p in pairs], [p.positive for p in pairs]",
            "        return [(None, p.query) for p in pairs], [p.positive for p in pairs]",
            "EBQ2D embeds the query without its instruction"),
    Mistake("interleave-ratio-inverted", 5, "data.py",
            "    p = Fraction(w_q2d / (w_d2q + w_q2d)).limit_denominator(100)",
            "    p = Fraction(w_d2q / (w_d2q + w_q2d)).limit_denominator(100)",
            "EBQ2D drawn at EBD2Q's weight (4 EBQ2D batches in 5)"),
    # step 6: InfoNCE
    Mistake("dot-product", 6, "bireco.py",
            "    q, cands = F.normalize(at_least_fp32(q), dim=-1), F.normalize(at_least_fp32(p), dim=-1)\n"
            "    if n is not None:\n        cands = torch.cat([cands, F.normalize(at_least_fp32(n), dim=-1)])",
            "    q, cands = at_least_fp32(q), at_least_fp32(p)\n"
            "    if n is not None:\n        cands = torch.cat([cands, at_least_fp32(n)])",
            "a dot product instead of cosine similarity"),
    Mistake("no-temperature", 6, "bireco.py",
            "    scores = q @ cands.T / temperature  # (B, B + B')",
            "    scores = q @ cands.T  # (B, B + B')",
            "InfoNCE without its temperature"),
    Mistake("own-row-negatives-only", 6, "bireco.py",
            "    scores = q @ cands.T / temperature  # (B, B + B')",
            "    B = q.shape[0]\n"
            "    own = torch.eye(B, dtype=torch.bool, device=q.device)\n"
            "    own = torch.cat([own, own], 1)[:, :cands.shape[0]]  # the own positive (and negative)\n"
            "    scores = (q @ cands.T / temperature).masked_fill(~own, float(\"-inf\"))",
            "each query's candidates only its own positive and hard negative, no in-batch negatives"),
    Mistake("hard-negatives-dropped", 6, "bireco.py",
            "    if n is not None:\n        cands = torch.cat([cands, F.normalize(at_least_fp32(n), dim=-1)])",
            "    pass",
            "the hard negatives never enter the candidates"),
    # step 7: the cached step
    Mistake("pass-2-new-dropout", 7, "bireco.py",
            "        torch.set_rng_state(cpu_rng)  # same dropout masks as in pass 1\n",
            "",
            "pass 2 of the cached step draws new dropout masks"),
    Mistake("cached-gradient-not-injected", 7, "bireco.py",
            "        e.backward(g)  # pass 2: re-run the chunk with autograd, inject the cached gradient",
            "        e.sum().backward()",
            "pass 2 back-propagates the embeddings' sum, not the cached d loss / d embedding"),
    # step 8: the schedule and LoRA
    Mistake("warmup-off-by-one", 8, "train.py",
            "        return args.lr * (step + 1) / args.warmup",
            "        return args.lr * step / args.warmup",
            "warmup's first step at learning rate 0"),
    Mistake("lora-not-merged", 8, "train.py",
            "            sd[f\"{name}.weight\"] = m.merged_weight().detach()",
            "            sd[f\"{name}.weight\"] = m.base.weight.detach()",
            "LoRA not merged into the saved weights"),
    Mistake("lora-scale-alpha", 8, "train.py",
            "        self.base, self.scale = base, alpha / rank",
            "        self.base, self.scale = base, alpha",
            "LoRA's update scaled by alpha instead of alpha / rank"),
    Mistake("lora-b-random", 8, "train.py",
            "        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))",
            "        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank, **like) * 0.01)",
            "LoRA's B initialised at random: training does not start at the base model"),
    # step 9: the held-out gap
    Mistake("gap-own-anchor-as-other", 9, "bireco.py",
            "    true, shuffled = loss(anchor), loss(anchor.roll(1, dims=0))",
            "    true, shuffled = loss(anchor), loss(anchor.roll(len(anchor), dims=0))",
            "the 'another pair's anchor' of the gap rolled by the batch size: the own anchor again"),
]


def copy_tree(dest):
    """The tracked files (and untracked ones git does not ignore) of the repository, into dest."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
            shutil.copy2(src, os.path.join(dest, f))


def run_step(tree, step):
    """Runs a step's tests in `tree`: (exit status, the first failing test's name or a summary)."""
    cmd = f"{sys.executable} -m pytest -q -x -p no:cacheprovider {STEPS[step][1]}"
    proc = subprocess.run(cmd, shell=True, cwd=tree, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    return proc.returncode, failed.group(1) if failed else summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mistakes to try (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mistakes and stop")
    args = parser.parse_args()
    known = {m.name: m for m in MISTAKES}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        sys.exit(f"error: unknown mistake {unknown[0]!r}; --list names them")
    chosen = [known[n] for n in args.names] or MISTAKES
    if args.list:
        for m in chosen:
            print(f"{m.name:<30} step {m.step} ({STEPS[m.step][0]}), {m.file}: {m.what}")
        return
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        clean = os.path.join(tmp, "clean")
        copy_tree(clean)
        for step in sorted({m.step for m in chosen}):  # each command must pass as it is
            code, why = run_step(clean, step)
            if code != 0:
                sys.exit(f"error: step {step}'s tests fail on the unchanged source ({why}); "
                         f"fix them first: python -m pytest -q {STEPS[step][1]}")
        rows = []
        for m in chosen:
            tree = os.path.join(tmp, m.name)
            shutil.copytree(clean, tree)
            path = os.path.join(tree, m.file)
            with open(path) as f:
                text = f.read()
            if text.count(m.old) != 1:  # the source moved on: the mistake must be rewritten
                sys.exit(f"error: mistake {m.name}: {m.file} holds its original text "
                         f"{text.count(m.old)} times, not once; update it in {__file__}")
            with open(path, "w") as f:
                f.write(text.replace(m.old, m.new))
            code, why = run_step(tree, m.step)
            caught = code == 1  # 1: tests ran and some failed; 5 would be: no test selected
            rows.append((m, caught, why if caught else f"missed (pytest exit {code}: {why})"))
            print(f"{m.name:<30} step {m.step}  {'caught' if caught else 'MISSED'}  {rows[-1][2]}",
                  flush=True)
            shutil.rmtree(tree)
    print(f"\n| mistake | step | caught by |\n|---|---|---|")
    for m, caught, why in rows:
        print(f"| {m.name}: {m.what} | {m.step} | {why if caught else '**missed**'} |")
    missed = sum(not c for _, c, _ in rows)
    print(f"\n{len(rows) - missed} of {len(rows)} mistakes caught ({time.time() - t0:.0f} s)")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
