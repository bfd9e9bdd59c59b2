"""
The paper's claim at small scale: does Stage I (bidirectional reconstruction) before Stage II
(contrastive learning) give a better embedder than Stage II alone, with the same Stage II budget?

  python experiments/wordnet.py                       # the whole experiment (hours on a 2-core CPU)
  python experiments/wordnet.py --seeds 0 --no-ablations   # the main comparison only
  python experiments/wordnet.py --ablations d2q-only       # one ablation (for every seed)
  python experiments/wordnet.py --no-ablations --contrastive-steps 120 --out out/experiment-ii120
                                                      # a longer Stage II, in its own folder
  python experiments/wordnet.py --report              # table + plot from what has finished so far

Model: the embedded SmolLM2-135M-Instruct (or --model). Data: the bundled WordNet train split;
scores: nDCG@10 on the held-out WordNet retrieval task through eval.py (mteb). Arms:
  baseline      Stage II only, from the base model
  ours          Stage I (EBD2Q:EBQ2D = 4:1, interleaved) then Stage II from its checkpoint
  ablations     Stage I with EBQ2D only, EBD2Q only, or both summed every batch; then Stage II
Every arm runs with every seed (the main comparison for all seeds first, then the ablations;
--long-recon adds a longer Stage I for the first seed, after its ablations). For the first seed,
both main arms are also evaluated every --eval-every Stage II steps on the way (the paper's
early-convergence claim). The reconstruction diagnostic (target loss with the true vs a shuffled
anchor, on held-out pairs) is measured before and after Stage I.

Every finished unit is recorded in <out>/results.json at once, and a re-run skips it, so the
experiment can be stopped and continued.
"""

import argparse
import glob
import gzip
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default=None, help="base model folder (default: embedded SmolLM2)")
parser.add_argument("--out", default=os.path.join(ROOT, "out", "experiment"), help="runs and results.json")
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--recon-steps", type=int, default=40, help="Stage I steps")
parser.add_argument("--recon-batch", type=int, default=8, help="Stage I pairs per batch")
parser.add_argument("--recon-lr", type=float, default=None, help="Stage I peak learning rate (default: train.py's)")
parser.add_argument("--contrastive-steps", type=int, default=40, help="Stage II steps (both arms)")
parser.add_argument("--contrastive-batch", type=int, default=8, help="Stage II pairs per batch")
parser.add_argument("--eval-every", type=int, default=20, help="Stage II steps between curve points")
parser.add_argument("--no-ablations", action="store_true", help="skip the Stage I ablations")
parser.add_argument("--ablations", nargs="+", default=["q2d-only", "d2q-only", "sum"],
                    choices=["q2d-only", "d2q-only", "sum"], help="which ablations to run")
parser.add_argument("--long-recon", type=int, default=0, metavar="STEPS",
                    help="also an arm 'ours-reconSTEPS': a longer Stage I, then the same Stage II (first seed)")
parser.add_argument("--report", action="store_true", help="only print the table and draw the plot")
parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further train.py flags for every run (e.g. --device cuda --dtype bfloat16)")

ABLATIONS = {"q2d-only": ["--task-weights", "0", "1"], "d2q-only": ["--task-weights", "1", "0"],
             "sum": ["--mode", "sum"]}


def run(cmd):
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable] + cmd, cwd=ROOT, check=True)


def evaluate(model_dir, out):
    """nDCG@10 (and friends) of one checkpoint on the held-out WordNet task, via eval.py."""
    out = os.path.join(out, "eval")
    run(["eval.py", "--model", model_dir, "--output", out])
    files = glob.glob(os.path.join(out, "results", "*", "*", "WordNetSenseRetrieval.json"))
    with open(max(files, key=os.path.getmtime)) as f:
        scores = json.load(f)["scores"]["test"][0]
    return {k: scores[k] for k in ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_100")}


def diagnostic(model_dir, n=64):
    """Per-token reconstruction loss with the true vs a shuffled anchor, on held-out pairs."""
    import torch

    from bireco import reconstruction_gap
    from data import INSTRUCTIONS, Pair, TextFormat
    from model import load_model, load_tokenizer

    read = lambda name: {r["id"]: r["text"] for r in map(json.loads, gzip.open(
        os.path.join(ROOT, "wordnet", "test", name), "rt", encoding="utf-8"))}
    queries, corpus = read("queries.jsonl.gz"), read("corpus.jsonl.gz")
    with open(os.path.join(ROOT, "wordnet", "test", "qrels.tsv")) as f:
        qrels = [line.split("\t")[:2] for line in f.read().splitlines()[1:]]
    pairs = [Pair(queries[q], corpus[d], None, INSTRUCTIONS["wordnet"]) for q, d in qrels[:n]]
    model = load_model(model_dir).eval()
    tok, eos_ids = load_tokenizer(model_dir)
    fmt = TextFormat(tok, eos_ids)
    out = {}
    for task in ("d2q", "q2d"):
        losses = [reconstruction_gap(model, fmt, pairs[i:i + 16], task) for i in range(0, n, 16)]
        out[task] = {"true": sum(t for t, _ in losses) / len(losses),
                     "shuffled": sum(s for _, s in losses) / len(losses)}
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def main():
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    if args.report:
        return report(results, args.out, args.seeds[0])

    def unit(name, fn):  # run once, record at once
        if name not in results:
            t0 = time.time()
            results[name] = fn()
            results[name + ".seconds"] = round(time.time() - t0)
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=2)
            os.replace(path + ".tmp", path)
        return results[name]

    if args.model is None:
        from smollm2 import default_model_dir
        args.model = default_model_dir()
    base = args.model
    unit("base/eval", lambda: evaluate(base, os.path.join(args.out, "base")))
    unit("base/diagnostic", lambda: diagnostic(base))

    recon_lr = [] if args.recon_lr is None else ["--lr", str(args.recon_lr)]

    def stage1(name, seed, flags, steps=args.recon_steps):
        """The Stage I checkpoint, trained now if it is not on disk (training is seeded, so a
        checkpoint deleted after its scores were recorded comes back the same)."""
        d = os.path.join(args.out, f"{name}-s{seed}", "recon")
        if not os.path.isdir(os.path.join(d, "latest")):
            results.pop(f"{name}/s{seed}/recon", None)
        unit(f"{name}/s{seed}/recon", lambda: run(["train.py", "--stage", "recon", "--model", base,
             "--steps", str(steps), "--batch-size", str(args.recon_batch), "--seed", str(seed),
             "--warmup", str(steps // 10), "--out", d, "--overwrite"] + flags + recon_lr + args.extra)
             or os.path.relpath(d, args.out))
        return os.path.join(d, "latest")

    def stage2(name, seed, start, curve):
        """Stage II from `start` (a folder, or a function that returns one when first needed)."""
        d = os.path.join(args.out, f"{name}-s{seed}", "contrastive")
        points = list(range(args.eval_every, args.contrastive_steps, args.eval_every)) if curve else []
        points.append(args.contrastive_steps)
        done = 0
        for p in points:
            def train_to(p=p, done=done):
                if done == 0 or not os.path.isdir(os.path.join(d, "latest")):
                    run(["train.py", "--stage", "contrastive", "--model", start() if callable(start) else start,
                         "--steps",
                         str(args.contrastive_steps), "--batch-size", str(args.contrastive_batch),
                         "--seed", str(seed), "--warmup", str(args.contrastive_steps // 10),
                         "--save-every", str(args.contrastive_steps), "--out", d, "--overwrite"]
                        + ["--stop-after", str(p)] + args.extra)
                else:
                    with open(os.path.join(d, "latest", "meta.json")) as f:
                        at = json.load(f)["step"]  # a stopped experiment may have trained further
                    if at < p:
                        run(["train.py", "--resume", d, "--stop-after", str(p - at)])
                return evaluate(os.path.join(d, "latest"), os.path.join(d, f"step{p}"))
            unit(f"{name}/s{seed}/contrastive@{p}", train_to)
            done = p

    def after_stage1(name, steps=args.recon_steps):
        """The diagnostic and the held-out score of the first seed's Stage I checkpoint."""
        ckpt = lambda: stage1(name, first, [], steps)
        unit(f"{name}/s{first}/recon/diagnostic", lambda: diagnostic(ckpt()))
        unit(f"{name}/s{first}/recon/eval", lambda: evaluate(ckpt(), os.path.dirname(ckpt())))

    first = args.seeds[0]
    after_stage1("ours")
    for seed in args.seeds:  # the main comparison for every seed (the first one's runs draw the curve)
        stage2("baseline", seed, base, curve=seed == first)
        stage2("ours", seed, lambda seed=seed: stage1("ours", seed, []), curve=seed == first)
    for seed in args.seeds:
        for name in [] if args.no_ablations else args.ablations:
            flags = ABLATIONS[name]
            stage2(name, seed, lambda name=name, flags=flags, seed=seed: stage1(name, seed, flags), curve=False)
        if seed == first and args.long_recon:  # does more Stage I make the anchor matter?
            name = f"ours-recon{args.long_recon}"
            after_stage1(name, args.long_recon)
            stage2(name, first, lambda name=name: stage1(name, first, [], args.long_recon), curve=False)
    report(results, args.out, first)


def report(results, out, first=0):
    """Markdown table (mean ± spread over seeds) and the convergence plot; single-seed rows and the
    curve are the `first` seed's."""
    import statistics

    longer = sorted({k.split("/")[0] for k in results if k.startswith("ours-recon")})
    arms = ["baseline", "ours"] + list(ABLATIONS) + longer
    final = {}
    for arm in arms:
        keys = sorted(k for k in results if k.startswith(f"{arm}/s") and "/contrastive@" in k
                      and not k.endswith(".seconds"))
        by_seed = {}
        for k in keys:  # the last Stage II point of each seed
            seed, step = k.split("/")[1], int(k.rsplit("@", 1)[1])
            if step >= by_seed.get(seed, (0, None))[0]:
                by_seed[seed] = (step, results[k]["ndcg_at_10"])
        if by_seed:
            vals = [v for _, (_, v) in sorted(by_seed.items(), key=lambda kv: int(kv[0][1:]))]
            final[arm] = (statistics.mean(vals), statistics.pstdev(vals), vals,
                          max(s for s, _ in by_seed.values()))
    print("| arm | nDCG@10 (mean) | spread (std) | per seed | seeds | Stage II steps |")
    print("| --- | --- | --- | --- | --- | --- |")
    if "base/eval" in results:
        print(f"| base model, no training | {results['base/eval']['ndcg_at_10']:.4f} | - | - | - | 0 |")
    for arm in ["ours"] + longer:
        if f"{arm}/s{first}/recon/eval" in results:
            v = results[f"{arm}/s{first}/recon/eval"]["ndcg_at_10"]
            print(f"| {arm}, after Stage I only | {v:.4f} | - | - | 1 | 0 |")
    for arm, (m, s, vals, steps) in final.items():
        print(f"| {arm} | {m:.4f} | {f'{s:.4f}' if len(vals) > 1 else '-'} | "
              f"{' / '.join(f'{v:.4f}' for v in vals)} | {len(vals)} | {steps} |")
    for name in ["base/diagnostic"] + [f"{a}/s{first}/recon/diagnostic" for a in ["ours"] + longer]:
        if name in results:
            d = results[name]
            print(f"{name}: " + ", ".join(f"{t} true {v['true']:.3f} vs shuffled {v['shuffled']:.3f}"
                                          for t, v in d.items()))
    curve = {}
    for arm, start in (("baseline", "base/eval"), ("ours", f"ours/s{first}/recon/eval")):
        pts = [(0, results[start]["ndcg_at_10"])] if start in results else []
        pts += sorted((int(k.rsplit("@", 1)[1]), v["ndcg_at_10"]) for k, v in results.items()
                      if k.startswith(f"{arm}/s{first}/contrastive@") and not k.endswith(".seconds"))
        curve[arm] = pts
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[plot]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm, pts in curve.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", label={"baseline": "Stage II only (baseline)",
                                                   "ours": "Stage I, then Stage II"}[arm])
    ax.set_xlabel("Stage II steps")
    ax.set_ylabel("held-out WordNet nDCG@10")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "convergence.png"), dpi=120)
    print(f"plot: {os.path.join(out, 'convergence.png')}")


if __name__ == "__main__":
    main()
