"""
The held-out gap against pairs seen, from Stage I logs: every "gap at step N" block that train.py
prints (--sample-every, --gap-pairs), one line a run and task, one panel a dataset; where the log
gives the gap's range over several shufflings (which other pair's anchor each row decodes from),
a band around the line. Where the progress lines carry the training batches' gap before their update
("batch gap wordnet/d2q +0.412"), its mean over each line's batches is drawn thin beside it.

  python experiments/gap_curves.py default=out/recon/train.log paper=out/paper/train.log --out gap.png

A log is NAME=PATH or a PATH (its file name then names it); runs named "GROUP, seed N" share a
colour and one legend entry. Prints the table too (pairs seen = step x batch size, from the log's
config line).
"""

import argparse
import json
import os
import re

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("logs", nargs="+")
parser.add_argument("--out", default=None, help="PNG to draw (needs matplotlib: pip install .[plot])")

HEAD = re.compile(r"gap at step (\d+), (\w+) \((\d+) pairs")
GAP = r"([+-]\d+\.\d+)(?: \[([+-]\d+\.\d+), ([+-]\d+\.\d+)\])? \((?:own|true)"
CELLS = re.compile(rf"EBD2Q {GAP}.*?\| EBQ2D {GAP}")
STEP = re.compile(r"^step (\d+)/\d+ \|.*$", re.M)
BATCH_GAP = re.compile(r"(\w+)/(d2q|q2d) ([+-]\d+\.\d+)")


def read(log):
    """({dataset: [(pairs seen, (d2q gap, low, high), (q2d gap, low, high))]}; low and high are the
    gap itself where the log has no range; {(dataset, task): [(pairs seen, batches' gap)]})."""
    with open(log) as f:
        text = f.read()
    config = json.loads(re.search(r"^config: (.*)$", text, re.M).group(1))
    curves, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        head = HEAD.search(line)
        if not head:
            continue
        m = CELLS.search(line) or CELLS.search(lines[i + 1])
        v = [float(x) if x is not None else None for x in m.groups()]
        d2q, q2d = [(g, lo if lo is not None else g, hi if hi is not None else g)
                    for g, lo, hi in (v[:3], v[3:])]
        pairs = int(head.group(1)) * config["batch_size"]
        curves.setdefault(head.group(2), []).append((pairs, d2q, q2d))
    running = {}
    for m in STEP.finditer(text):
        gaps = m.group(0).partition("| batch gap ")[2].partition(" |")[0]
        for dataset, task, gap in BATCH_GAP.findall(gaps):
            running.setdefault((dataset, task), []).append(
                (int(m.group(1)) * config["batch_size"], float(gap)))
    return curves, running


def main():
    args = parser.parse_args()
    runs = {}
    for spec in args.logs:
        name, _, path = spec.rpartition("=")
        runs[name or os.path.splitext(os.path.basename(path))[0]] = read(path)
    print(f"{'run':<24} {'dataset':<9} pairs seen: EBD2Q gap / EBQ2D gap [range over shufflings]")
    for name, (curves, _) in runs.items():
        for dataset, points in curves.items():
            print(f"{name:<24} {dataset:<9} " + "  ".join(
                f"{n}: {a[0]:+.2f} [{a[1]:+.2f}, {a[2]:+.2f}] / {b[0]:+.2f} [{b[1]:+.2f}, {b[2]:+.2f}]"
                for n, a, b in points))
    if not args.out:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({d for curves, _ in runs.values() for d in curves}, reverse=True)
    group = {name: name.split(", seed")[0] for name in runs}
    colour = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(group.values()))}  # one a group
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets) + 3, 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for name, (curves, running) in runs.items():
            points = curves.get(dataset, [])
            n = [p[0] for p in points]
            for k, (task, style) in enumerate((("EBD2Q", "-o"), ("EBQ2D", "--x"))):
                batches = running.get((dataset, ("d2q", "q2d")[k]), [])
                ax.plot([b[0] for b in batches], [b[1] for b in batches], style[:-1],
                        color=colour[group[name]], lw=0.6, alpha=0.5)
                gap = [p[1 + k] for p in points]
                ax.plot(n, [g[0] for g in gap], style, color=colour[group[name]], ms=4,
                        label=f"{group[name]} {task}")
                ax.fill_between(n, [g[1] for g in gap], [g[2] for g in gap],
                                color=colour[group[name]], alpha=0.15)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axhline(0.3, color="grey", lw=0.5, ls=":")
        ax.set(title=f"{dataset}: held-out gap (nats/token)", xlabel="pairs seen (all datasets)",
               ylabel="another pair's anchor - own anchor")
    key = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}  # every run, once
    axes[0][-1].legend(key.values(), key.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
