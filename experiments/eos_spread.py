"""
How spread out a checkpoint's [EOS] vectors are, and whether they already retrieve: for each bundled
dataset's held-out split, the mean cosine between two different documents and between two different
queries (1.0: every text gets the same vector), the share of the documents' variance along their
first principal direction, and the share of queries whose relevant document is among the 10 nearest
of the split's corpus (recall@10, the model as it is: no Stage II needed).

  python experiments/eos_spread.py SmolLM2-135M-Instruct out/recon/latest out/control/latest

Written to tell whether a Stage I left vectors that Stage II can start from: a shuffled-anchor
Stage I, whose decoder never profits from a pair's own vector, is pushed towards one vector for all.
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from bireco import Embedder  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("models", nargs="+", help="checkpoint or model folders")
parser.add_argument("--split", default="test", choices=["validation", "test"])
parser.add_argument("--queries", type=int, default=256, help="queries a dataset (all documents)")
parser.add_argument("--max-length", type=int, default=64)


def mean_off_diagonal(x):
    """Mean cosine between two different rows of unit vectors x."""
    n = len(x)
    s = x.astype(np.float64).sum(0)  # |sum|^2 = n (the diagonal) + every off-diagonal pair
    return float((s @ s - n) / (n * (n - 1)))


def spread(embedder, folder, split, n):
    queries, corpus, qrels = data.read_split(os.path.join(ROOT, folder, split))
    ids, asked = list(corpus), list(qrels)[:n]
    docs = embedder.encode([corpus[d] for d in ids])
    q = embedder.encode([queries[i] for i in asked], data.INSTRUCTIONS[folder])
    centred = docs - docs.mean(0)
    s = np.linalg.svd(centred, compute_uv=False) ** 2
    top10 = np.argsort(-(q @ docs.T), axis=1, kind="stable")[:, :10]  # ties: corpus order
    hits = [any(ids[i] in qrels[qid] for i in row) for qid, row in zip(asked, top10)]
    return mean_off_diagonal(docs), mean_off_diagonal(q), float(s[0] / s.sum()), float(np.mean(hits))


if __name__ == "__main__":
    args = parser.parse_args()
    print(f"{args.split} split; {args.queries} queries a dataset, all documents; texts cut to "
          f"{args.max_length} tokens")
    print(f"{'model':<48} {'dataset':<9} {'doc-doc cos':>11} {'q-q cos':>8} {'PC1 share':>9} {'recall@10':>9}")
    for path in args.models:
        embedder = Embedder.from_pretrained(path, max_length=args.max_length)
        for name, folder in data.BUNDLED_TASKS.items():
            dd, qq, pc1, r10 = spread(embedder, folder, args.split, args.queries)
            label = path if len(path) <= 48 else "..." + path[-45:]
            print(f"{label:<48} {folder:<9} {dd:>11.3f} {qq:>8.3f} {pc1:>9.3f} {r10:>9.3f}")
