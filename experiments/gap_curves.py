"""
The held-out gap against pairs seen, from Stage I logs: every "gap at step N" block that train.py
prints (--sample-every, --gap-pairs), one line a run and task, one panel a dataset.

  python experiments/gap_curves.py experiments/results/stage1-search/*.log --out experiments/results/stage1-search/gap.png

Prints the table too (pairs seen = step x batch size, from the log's config line).
"""

import argparse
import json
import os
import re

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("logs", nargs="+")
parser.add_argument("--out", default=None, help="PNG to draw (needs matplotlib: pip install .[plot])")

HEAD = re.compile(r"gap at step (\d+), (\w+) \((\d+) pairs")
NEW = re.compile(r"EBD2Q ([+-]\d+\.\d+) \(own (\d+\.\d+).*?mean (\d+\.\d+)\) \| EBQ2D ([+-]\d+\.\d+) \(own (\d+\.\d+).*?mean (\d+\.\d+)\)")
OLD = re.compile(r"EBD2Q ([+-]\d+\.\d+) \(true (\d+\.\d+).*?mean anchor (\d+\.\d+)\) \| EBQ2D ([+-]\d+\.\d+) \(true (\d+\.\d+).*?mean anchor (\d+\.\d+)\)")


def read(log):
    """{dataset: [(pairs seen, d2q gap, q2d gap)]} and the run's config."""
    text = open(log).read()
    config = json.loads(re.search(r"^config: (.*)$", text, re.M).group(1))
    curves = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        head = HEAD.search(line)
        if not head:
            continue
        m = NEW.search(line) or OLD.search(line) or NEW.search(lines[i + 1])
        step, dataset = int(head.group(1)), head.group(2)
        curves.setdefault(dataset, []).append((step * config["batch_size"], float(m.group(1)), float(m.group(4))))
    return curves, config


def main():
    args = parser.parse_args()
    runs = {os.path.splitext(os.path.basename(log))[0]: read(log) for log in args.logs}
    print(f"{'run':<24} {'dataset':<9} pairs seen: EBD2Q gap / EBQ2D gap")
    for name, (curves, _) in runs.items():
        for dataset, points in curves.items():
            print(f"{name:<24} {dataset:<9} " + "  ".join(f"{n}: {a:+.3f}/{b:+.3f}" for n, a, b in points))
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        datasets = sorted({d for curves, _ in runs.values() for d in curves})
        fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
        for ax, dataset in zip(axes[0], datasets):
            for i, (name, (curves, _)) in enumerate(runs.items()):
                if dataset in curves:
                    n, a, b = zip(*curves[dataset])
                    ax.plot(n, a, "-o", color=f"C{i}", label=f"{name} EBD2Q")
                    ax.plot(n, b, "--x", color=f"C{i}", label=f"{name} EBQ2D")
            ax.axhline(0, color="grey", lw=0.5)
            ax.axhline(0.3, color="grey", lw=0.5, ls=":")
            ax.set(title=f"{dataset}: held-out gap (nats/token)", xlabel="pairs seen", ylabel="another's - own anchor loss")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
