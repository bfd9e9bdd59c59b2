"""
What a checkpoint's [EOS] anchors hold, on held-out validation pairs of each bundled dataset:

- spread: mean pairwise cosine of the documents' anchors and the share of their squared norm
  that lies off their mean (anchors that all point one way leave a decoder little to read);
- retrieval with the raw anchors: top-1 accuracy of each query's anchor among the documents';
- the reconstruction gap per target position: target loss given another pair's anchor minus
  given the true one, at positions 1, 2, 3, 4-8, 9-16, 17-32 and 33-64 and over all tokens, for
  EBD2Q and EBQ2D, and the loss given the batch's mean anchor;
- the same with the source as text: the decoder given everything the encoder read (template,
  instruction, text, EOS) in place of its one vector, against another pair's text. The ceiling
  of what any anchor can tell this decoder: a gap the text itself does not reach is out of reach.

  python experiments/anchor_probe.py CHECKPOINT [CHECKPOINT ...] [--pairs 64] [--split train]

--split train probes training pairs instead (a seeded sample: the files list related pairs
together, and a neighbour's anchor would tell too much): what Stage I fitted. A gap or loss much
better there than on held-out pairs is the decoder remembering its training texts, not reading.
"""

import argparse
import os
import random
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bireco import Embedder, _decode, _stage1_inputs, checkpoint_decoding, stage1_sides, target_cross_entropy  # noqa: E402
from data import INSTRUCTIONS, load_pairs, pad, split_pairs  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("checkpoints", nargs="+")
parser.add_argument("--pairs", type=int, default=64, help="pairs per dataset")
parser.add_argument("--split", choices=["validation", "train"], default="validation",
                    help="held-out pairs, or a seeded sample of training pairs")
parser.add_argument("--batch", type=int, default=16, help="pairs decoded together (anchors rolled within)")


def position_losses(model, anchor, targets, mask, how):
    """Target loss per position (B, n), zero at padding."""
    h, y = _decode(model, anchor, targets, mask, how)
    out = torch.zeros(mask.shape)
    out[mask] = target_cross_entropy(model, h, y)[1].float()
    return out


def text_position_losses(model, fmt, sources, targets):
    """Target loss per position (B, n) given the source's token ids in context instead of its
    anchor: each row [source ids, target ids], right-padded; zero past each target's end."""
    ids, mask = pad([s + t for s, t in zip(sources, targets)], fmt.pad_id)
    device = model.lm_head.weight.device
    h = model(ids.to(device), padding_mask=mask.to(device))
    out = torch.zeros(len(targets), max(map(len, targets)))
    for i, (src, tgt) in enumerate(zip(sources, targets)):  # the states that predict the target
        logits = model.lm_head(h[i, len(src) - 1:len(src) + len(tgt) - 1]).float()
        out[i, :len(tgt)] = F.cross_entropy(logits, ids[i, len(src):len(src) + len(tgt)].to(device),
                                            reduction="none").cpu()
    return out


def text_inputs(fmt, pairs, task):
    """What the encoder reads (its ids) and the target ids of each pair (bireco.stage1_sides)."""
    sources, targets = stage1_sides(pairs, task)
    return [fmt.embed_ids(text, instruction) for instruction, text in sources], [fmt.target_ids(t) for t in targets]


def accumulate(sums, kind, loss, m):
    """Adds the losses (B, n) of the real tokens (mask m) to sums[kind], per position."""
    sums.setdefault(kind, torch.zeros(POSITIONS))[:loss.shape[1]] += (loss * m).sum(0)


def gap_line(label, sums, counts):
    """One printed line: the losses over all tokens and the gap (shuffled - true) by position span."""
    per = {k: v.sum() / counts.sum() for k, v in sums.items()}
    gap = sums["shuffled"] - sums["true"]  # summed over pairs, per position
    spans = [(lo, hi) for lo, hi in SPANS if counts[lo - 1:hi].sum() > 0]
    mean = f", mean anchor {per['mean']:.3f}" if "mean" in per else ""
    return (f"  {label}: true {per['true']:.3f}, shuffled {per['shuffled']:.3f}{mean}, gap "
            f"{per['shuffled'] - per['true']:+.3f}; gap by target position " + ", ".join(
                f"{lo}{'-' + str(hi) if hi > lo else ''} {gap[lo - 1:hi].sum() / counts[lo - 1:hi].sum():+.2f}"
                for lo, hi in spans))


@torch.no_grad()
def probe(path, pairs_by_dataset, batch):
    model, fmt = (lambda e: (e.model, e.fmt))(Embedder.from_pretrained(path))
    how = checkpoint_decoding(path, fmt)  # decoded as the checkpoint trained (sink, centred anchors)
    print(f"decoding: {how}")
    for name, pairs in pairs_by_dataset.items():
        q = torch.cat([_stage1_inputs(model, fmt, pairs[i:i + batch], "q2d")[0] for i in range(0, len(pairs), batch)])
        d = torch.cat([_stage1_inputs(model, fmt, pairs[i:i + batch], "d2q")[0] for i in range(0, len(pairs), batch)])
        off = ~torch.eye(len(d), dtype=torch.bool)
        cos = lambda x: (F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T)[off].mean().item()
        top1 = ((F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T).argmax(1) == torch.arange(len(q))).float().mean()
        spread = (d - d.mean(0)).pow(2).sum(-1).mean() / d.pow(2).sum(-1).mean()
        print(f"{name}: documents' anchors norm {d.norm(dim=-1).mean():.1f}, cosine {cos(d):.3f}, "
              f"off the mean {spread:.3f}; raw-anchor retrieval top-1 {top1:.3f} of {len(q)}")
        for task, label in (("d2q", "EBD2Q"), ("q2d", "EBQ2D")):
            sums, text, counts = {}, {}, torch.zeros(POSITIONS)  # per target position 1 .. POSITIONS
            for i in range(0, len(pairs), batch):
                anchor, targets, mask = _stage1_inputs(model, fmt, pairs[i:i + batch], task)
                m = mask.float()[:, :POSITIONS]
                for kind, a in (("true", anchor), ("shuffled", anchor.roll(1, 0)),
                                ("mean", anchor.mean(0, keepdim=True).expand_as(anchor))):
                    accumulate(sums, kind, position_losses(model, a, targets, mask, how)[:, :POSITIONS], m)
                sources, ids = text_inputs(fmt, pairs[i:i + batch], task)
                for kind, src in (("true", sources), ("shuffled", sources[-1:] + sources[:-1])):  # roll(1)
                    accumulate(text, kind, text_position_losses(model, fmt, src, ids)[:, :POSITIONS], m)
                counts[:m.shape[1]] += m.sum(0)
            print(gap_line(label, sums, counts))
            print(gap_line(f"{label} given the source as text", text, counts))


POSITIONS = 64  # train.py's default --max-length
SPANS = [(1, 1), (2, 2), (3, 3), (4, 8), (9, 16), (17, 32), (33, 64)]


def probe_pairs(split, n):
    """{dataset: n pairs}: the first of its held-out split, or a seeded sample of its training
    pairs (a training file keeps a word's senses, or a section's pages, together)."""
    out = {}
    for ds in ("wordnet", "manpages"):
        folder = os.path.join(ROOT, ds, split)
        if split == "validation":
            out[ds] = split_pairs(folder, INSTRUCTIONS[ds], n)
        else:
            pairs = load_pairs(folder)[ds]
            out[ds] = random.Random(0).sample(pairs, min(n, len(pairs)))
    return out


def main():
    args = parser.parse_args()
    pairs = probe_pairs(args.split, args.pairs)
    print(f"{args.split} pairs: " + ", ".join(f"{ds} {len(p)}" for ds, p in pairs.items()))
    for path in args.checkpoints:
        print(f"== {path}", flush=True)
        probe(path, pairs, args.batch)


if __name__ == "__main__":
    main()
