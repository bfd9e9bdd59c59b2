"""
The paper's claim at small scale: does Stage I (bidirectional reconstruction) before Stage II
(contrastive learning) give a better embedder than Stage II alone, with the same Stage II budget?

  python experiments/compare.py                                  # the comparison, 5 seeds, test split
  python experiments/compare.py --split validation --seeds 0 --arms baseline \\
      --out out/search-lr1e-3 --results out/search-lr1e-3/results.json --contrastive "--lr 1e-3"   # a search point
  python experiments/compare.py --arms d2q-only q2d-only sum --seeds 0    # ablations, one seed
  python experiments/compare.py --report                         # tables and plot from what has finished

Model: the embedded SmolLM2-135M-Instruct (or --model); data and recipe: train.py's defaults (the
bundled WordNet and man-page train splits, STAGE_DEFAULTS), changed only by --recon / --contrastive.
Scores: nDCG@10 on both bundled retrieval tasks through eval.py (mteb), on --split. Arms:
  baseline   Stage II only, from the base model
  ours       the default Stage I (train.py's STAGE_DEFAULTS), then the same Stage II from its checkpoint
  q2d-only, d2q-only, sum   Stage I with EBQ2D only, EBD2Q only, or both summed every batch
  control    the same Stage I with every target decoded from another pair's anchor: the LM
             fine-tuned on the same texts for the same steps, with nothing to reconstruct
  control-detached   the same with no gradient into the other pair's anchor (bireco.Decoding)
Arms are paired by seed: a seed fixes Stage II's data order and LoRA initialisation in every arm.
The first seed's baseline and ours are also scored at --curve points along Stage II (the paper's
early-convergence claim); the reconstruction diagnostic (target loss given the true vs a shuffled
anchor, on held-out pairs) is measured before and after each Stage I.

Every finished unit is recorded in --results (experiments/results/compare.json) at once, each
training run with the train.py flags it ran with, and a re-run skips it, so the experiment can be
stopped and continued, in parts with different flags; --report prints the tables, which runs had
which flags, and draws the plot beside it. The runs themselves (checkpoints, training logs) go to --out.
"""

import argparse
import glob
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from smollm2 import default_model_dir  # noqa: E402

TASKS = data.BUNDLED_TASKS  # eval.py's bundled tasks: their data folders
ABLATIONS = {"q2d-only": ["--task-weights", "0", "1"], "d2q-only": ["--task-weights", "1", "0"],
             "sum": ["--mode", "sum"], "control": ["--shuffle-anchors"],
             "control-detached": ["--shuffle-anchors", "detached"]}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default=None, help="base model folder (default: embedded SmolLM2)")
parser.add_argument("--out", default=os.path.join(ROOT, "out", "compare"), help="the runs (checkpoints, logs)")
parser.add_argument("--results", default=os.path.join(ROOT, "experiments", "results", "compare.json"),
                    help="the recorded units (small, kept in the repository); the plot goes beside it")
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
parser.add_argument("--arms", nargs="+", default=["baseline", "ours", "control"],
                    choices=["baseline", "ours", *ABLATIONS])
parser.add_argument("--split", choices=["validation", "test"], default="test",
                    help="where scores come from: validation while choosing settings, test to report")
parser.add_argument("--recon", default="", help="train.py flags for Stage I, e.g. \"--steps 60 --lr 2e-5\"")
parser.add_argument("--contrastive", default="", help="train.py flags for Stage II (every arm)")
parser.add_argument("--curve", type=int, default=5, help="Stage II points scored for the first seed")
parser.add_argument("--report", action="store_true", help="only print the tables and draw the plot")


def run(cmd, log=None):
    """Runs a project script; with `log`, its output goes there as it comes (tail -f to watch)."""
    print("$", " ".join(cmd), flush=True)
    if log is None:
        code = subprocess.run([sys.executable] + cmd, cwd=ROOT).returncode
    else:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as f:
            code = subprocess.run([sys.executable] + cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"error: {cmd[0]} failed with status {code}" + (f" (log: {log})" if log else ""))
    return True


def evaluate(model_dir, out, split):
    """{task: nDCG@10 and friends} of one checkpoint on both bundled tasks, via eval.py."""
    out = os.path.join(out, f"eval-{split}")
    run(["eval.py", "--model", model_dir, "--split", split, "--output", out])
    scores = {}
    for task in TASKS:
        files = glob.glob(os.path.join(out, "results", "*", "*", f"{task}.json"))
        with open(max(files, key=os.path.getmtime)) as f:
            s = json.load(f)["scores"][split][0]
        scores[task] = {k: s[k] for k in ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_100")}
    return scores


def diagnostic(model_dir, split, n=128, how=None):
    """{dataset: {task: the own, another pair's (3 shufflings) and the mean anchor's loss}} on n
    held-out pairs of each bundled task, decoded as `how` (bireco.Decoding; default: as the
    checkpoint's Stage I decoded)."""
    import torch

    from bireco import Embedder, anchor_losses, checkpoint_decoding
    from data import INSTRUCTIONS, split_pairs

    embedder = Embedder.from_pretrained(model_dir)
    model, fmt, out = embedder.model, embedder.fmt, {}
    how = how or checkpoint_decoding(model_dir, fmt)
    for name in TASKS.values():
        pairs = split_pairs(os.path.join(ROOT, name, split), INSTRUCTIONS[name], n)
        out[name] = {}
        for task in ("d2q", "q2d"):
            out[name][task] = anchor_losses(model, fmt, pairs, task, how=how, shufflings=3)
    del model, embedder
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def losses(log):
    """[(step, loss)] of every Stage II progress line in a train.py log."""
    with open(log) as f:
        return [(int(s), float(v)) for s, v in re.findall(r"^step (\d+)/\d+ \| loss (\d+\.\d+)", f.read(), re.M)]


def main():
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = args.results
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    results = json.load(open(path)) if os.path.isfile(path) else {}
    if args.report:
        return report(results, path)
    results["settings"] = dict(split=args.split)  # the flags go with each run: "<arm>/s<seed>/<stage>.flags"

    def save():
        try:  # a new file, then an atomic rename: a fault leaves the previous results whole
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError as e:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            sys.exit(f"error: cannot write {path}: {e.strerror or e}; the results recorded before are kept")

    def unit(name, fn):  # run once, record at once
        if name not in results:
            t0 = time.time()
            results[name] = fn()
            results[name + ".seconds"] = round(time.time() - t0)
            save()
        return results[name]

    if args.model is None:
        args.model = default_model_dir()
    base, split = args.model, args.split
    unit(f"base/{split}", lambda: evaluate(base, os.path.join(args.out, "base"), split))
    unit(f"base/diagnostic-{split}", lambda: diagnostic(base, split))
    unit(f"bm25/{split}", lambda: {t: {"ndcg_at_10": bm25(t, split)} for t in TASKS})

    def stage1(arm, seed):
        """The Stage I checkpoint of an arm, trained when first needed (seeded: a deleted one comes back the same)."""
        d = os.path.join(args.out, f"{arm}-s{seed}", "recon")
        if not os.path.isdir(os.path.join(d, "latest")):
            results.pop(f"{arm}/s{seed}/recon", None)
            if os.path.exists(os.path.join(d, "train.log")):
                os.remove(os.path.join(d, "train.log"))
        def train():
            flags = [*ABLATIONS.get(arm, []), *shlex.split(args.recon)]
            results[f"{arm}/s{seed}/recon.flags"] = shlex.join(flags)  # this run's own, whatever a later run passes
            run(["train.py", "--stage", "recon", "--model", base, "--seed", str(seed), "--out", d, "--overwrite",
                 *flags], os.path.join(d, "train.log"))
            return os.path.relpath(d, args.out)
        unit(f"{arm}/s{seed}/recon", train)
        latest = os.path.join(d, "latest")
        unit(f"{arm}/s{seed}/recon/diagnostic-{split}", lambda: diagnostic(latest, split))
        return latest

    def stage2(arm, seed, curve):
        """Stage II from the base model (baseline) or the arm's Stage I checkpoint, scored at its points."""
        d = os.path.join(args.out, f"{arm}-s{seed}", "contrastive")
        curve = curve and args.curve > 0  # --curve 0: the end point only
        flags = shlex.split(args.contrastive)
        steps = int(flags[flags.index("--steps") + 1]) if "--steps" in flags else stage_default("steps")
        points = sorted({max(1, round(steps * (i + 1) / args.curve)) for i in range(args.curve)}) if curve else [steps]
        if curve:  # the curve starts where Stage II starts: the base model, or the arm's Stage I checkpoint
            unit(f"{arm}/s{seed}/contrastive@0-{split}", lambda: results[f"base/{split}"] if arm == "baseline"
                 else evaluate(stage1(arm, seed), os.path.dirname(stage1(arm, seed)), split))
        for p in points:
            def train_to(p=p):
                at = 0
                if os.path.isfile(os.path.join(d, "latest", "meta.json")):
                    with open(os.path.join(d, "latest", "meta.json")) as f:
                        at = json.load(f)["step"]  # a stopped experiment may have trained further
                if at == 0 or at > p:  # from the start, with a fresh log
                    start = base if arm == "baseline" else stage1(arm, seed)
                    if os.path.exists(os.path.join(d, "train.log")):
                        os.remove(os.path.join(d, "train.log"))
                    results[f"{arm}/s{seed}/contrastive.flags"] = shlex.join(flags)
                    run(["train.py", "--stage", "contrastive", "--model", start, "--seed", str(seed), "--out", d,
                         "--overwrite", "--log-every", "1", "--stop-after", str(p), *flags], os.path.join(d, "train.log"))
                elif at < p:
                    run(["train.py", "--resume", d, "--stop-after", str(p - at)], os.path.join(d, "train.log"))
                return evaluate(os.path.join(d, "latest"), os.path.join(d, f"step{p}"), split)
            unit(f"{arm}/s{seed}/contrastive@{p}-{split}", train_to)
        unit(f"{arm}/s{seed}/losses", lambda: losses(os.path.join(d, "train.log")))

    first = args.seeds[0]
    for seed in args.seeds:  # the paired arms seed by seed, so every finished seed is a complete pair
        for arm in args.arms:
            stage2(arm, seed, curve=seed == first and arm in ("baseline", "ours"))
    report(results, path)


def stage_default(key):
    import train
    return train.STAGE_DEFAULTS["contrastive"][key]


def bm25(task, split):
    return data.bm25_ndcg10(os.path.join(ROOT, TASKS[task], split))


def loss_summary(v):
    """A Stage II loss curve [(step, loss)] in three numbers: first, around a third of the way
    (the mean of three steps there), the mean of the last five."""
    n = len(v)
    third = statistics.mean(x for s, x in v[max(0, n // 3 - 2):n // 3 + 1]) if n >= 3 else v[-1][1]
    return f"first {v[0][1]:.2f}, around step {n // 3} {third:.2f}, last 5 {statistics.mean(x for _, x in v[-5:]):.2f}"


def interval(values):
    """Mean and half-width of its 95% t-interval (None for one value)."""
    m = statistics.mean(values)
    return m, (T95[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def report(results, path):
    """Markdown tables: final nDCG@10 per arm and task (mean, 95% interval, per seed), the paired
    difference of each arm against the baseline, the first seed's Stage II curve, Stage II's
    training loss against chance, and the reconstruction diagnostic; then the convergence plot."""
    split = results.get("settings", {}).get("split", "test")
    finals, curves = {}, {}  # finals[arm][seed] = scores; curves[(arm, seed)] = [(step, scores)]
    for k, v in results.items():
        m = re.fullmatch(rf"([\w-]+)/s(\d+)/contrastive@(\d+)-{split}", k)
        if m:
            curves.setdefault((m[1], int(m[2])), []).append((int(m[3]), v))
    last = max((p for pts in curves.values() for p, _ in pts), default=0)  # Stage II's length
    for (arm, seed), pts in curves.items():
        pts.sort(key=lambda p: p[0])
        if pts[-1][0] == last:  # a run still on its way is in the curves only
            finals.setdefault(arm, {})[seed] = pts[-1][1]
    fmt = lambda m, h: f"{m:.3f}" + (f" ± {h:.3f}" if h is not None else "")
    print(f"nDCG@10 on the {split} split (mean ± 95% interval over seeds)\n")
    print("| arm | " + " | ".join(TASKS) + " | seeds |\n|---|" + "---|" * (len(TASKS) + 1))
    for row, key in (("BM25", f"bm25/{split}"), ("base model, untrained", f"base/{split}")):
        if key in results:
            print(f"| {row} | " + " | ".join(f"{results[key][t]['ndcg_at_10']:.3f}" for t in TASKS) + " | - |")
    for arm, by_seed in finals.items():
        cells = [fmt(*interval([s[t]["ndcg_at_10"] for s in by_seed.values()])) for t in TASKS]
        print(f"| {arm} | " + " | ".join(cells) + f" | {len(by_seed)} |")
    base = finals.get("baseline", {})
    pairs = [(arm, "baseline") for arm in finals if arm != "baseline" and base]
    pairs += [("ours", c) for c in ("control", "control-detached") if "ours" in finals and c in finals]
    for arm, other in pairs:  # the paired differences, as rows of the same table
        paired = sorted(set(finals[arm]) & set(finals[other]))
        if paired:
            cells = [fmt(*interval([finals[arm][s][t]["ndcg_at_10"] - finals[other][s][t]["ndcg_at_10"]
                                    for s in paired])) for t in TASKS]
            print(f"| {arm} - {other}, paired by seed | " + " | ".join(cells) + f" | {len(paired)} |")
    for arm, by_seed in finals.items():
        paired = sorted(set(by_seed) & set(base))
        if arm == "baseline" or not paired:
            continue
        print(f"\n{arm} - baseline, paired by seed ({len(paired)} pairs): " + "; ".join(
            f"{t} {fmt(*interval([by_seed[s][t]['ndcg_at_10'] - base[s][t]['ndcg_at_10'] for s in paired]))}"
            for t in TASKS))
        for t in TASKS:
            print(f"  {t} per seed: " + ", ".join(f"s{s} {by_seed[s][t]['ndcg_at_10']:.3f} vs "
                                                  f"{base[s][t]['ndcg_at_10']:.3f}" for s in paired))
    for (arm, seed), pts in sorted(curves.items()):
        if len(pts) > 1:
            print(f"\ncurve {arm} s{seed}: " + ", ".join(
                f"@{p} " + "/".join(f"{v[t]['ndcg_at_10']:.3f}" for t in TASKS) for p, v in pts))
    for stage in ("recon", "contrastive"):  # which runs had which train.py flags (beyond seed and paths)
        runs = {}
        for k, v in sorted(results.items()):
            m = re.fullmatch(rf"([\w-]+)/s(\d+)/{stage}\.flags", k)
            if m:
                runs.setdefault(v, []).append(f"{m[1]} s{m[2]}")
        for v, who in runs.items():
            print(f"{stage} flags {v or '(the defaults)'}: " + ", ".join(who))
    for k, v in sorted(results.items()):
        if k.endswith("/losses") and v:
            print(f"{k}: {loss_summary(v)}")
    for k, v in sorted(results.items()):
        if "diagnostic" in k and not k.endswith(".seconds"):
            print(f"{k}: " + "; ".join(f"{name} " + ", ".join(f"{t} gap {g['shuffled'] - g['true']:+.2f} "
                                                            f"(own {g['true']:.2f}, another's {g['shuffled']:.2f})"
                                                            for t, g in d.items()) for name, d in v.items()))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[plot]'): no plot")
        return
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.5 * len(TASKS), 3.5))
    for ax, t in zip(axes, TASKS):
        for (arm, seed), pts in sorted(curves.items()):
            if len(pts) > 1:
                ax.plot([p for p, _ in pts], [v[t]["ndcg_at_10"] for _, v in pts], marker="o", label=f"{arm} (seed {seed})")
        if f"bm25/{split}" in results:
            ax.axhline(results[f"bm25/{split}"][t]["ndcg_at_10"], color="gray", ls="--", label="BM25")
        ax.set(title=t, xlabel="Stage II steps", ylabel=f"{split} nDCG@10")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    plot = os.path.splitext(path)[0] + ".png"
    fig.savefig(plot, dpi=120)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
