"""
Can the untrained decoder read one vector at all? Stage I's decode path with hand-made anchors,
no training: the target loss per token given each pair's own anchor against the anchor of another
pair (anchors rolled by one), on 64 validation pairs of each bundled dataset and both tasks, and
that gap at the first three target positions (where an anchor should matter most).

  python experiments/oracle_anchors.py > experiments/results/oracle-anchors.txt

Anchors: E(source) as the paper feeds it (a final-norm state, norm ~46 in SmolLM2); the same
rescaled to the mean token-embedding norm (~3.2); either after one real token (<|endoftext|>, id
0) that takes position 0, where pretrained LMs park attention; and oracles that hold the answer:
E(target) itself, the mean of the target's own token embeddings, the first target token's embedding.
"""

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bireco import Embedder, embed_texts, target_cross_entropy  # noqa: E402
from data import INSTRUCTIONS, pad, split_pairs  # noqa: E402
from smollm2 import default_model_dir  # noqa: E402


def decode_losses(model, anchor, targets, mask, sink=False):
    """Per-position target losses (B, n) with `anchor` (B, D) in front of the targets, and
    <|endoftext|> in front of the anchor when `sink`."""
    W = model.model.embed_tokens.weight
    pre = anchor[:, None, :]
    if sink:
        pre = torch.cat([W[0].expand(len(pre), 1, -1), pre], 1)
    P = pre.shape[1]
    padding = torch.cat([torch.ones(len(mask), P - 1, dtype=torch.bool), mask], 1)
    h = model(inputs_embeds=torch.cat([pre, W[targets[:, :-1]]], 1), padding_mask=padding)[:, P - 1:]
    full = torch.zeros(mask.shape)
    full[mask] = target_cross_entropy(model, h[mask], targets[mask])[1].float()
    return full


def report(model, name, anchor, targets, mask, sink=False):
    t = decode_losses(model, anchor, targets, mask, sink)
    s = decode_losses(model, anchor.roll(1, 0), targets, mask, sink)
    m = mask.float()
    true, shuffled = (t * m).sum() / m.sum(), (s * m).sum() / m.sum()
    first = [((s[:, k] - t[:, k]) * m[:, k]).sum().item() / m[:, k].sum().item() for k in range(3)]
    print(f"{name:<40} true {true:.3f} shuf {shuffled:.3f} gap {shuffled - true:+.3f} | gap pos1..3 "
          + " ".join(f"{g:+.2f}" for g in first), flush=True)


@torch.no_grad()
def main():
    t0 = time.time()
    emb = Embedder.from_pretrained(default_model_dir())
    model, fmt = emb.model, emb.fmt
    W = model.model.embed_tokens.weight
    tok_norm = W.norm(dim=-1).mean()
    print("token norm", tok_norm.item())
    rescale = lambda a, n: a * (n / a.norm(dim=-1, keepdim=True))
    for ds in ("wordnet", "manpages"):
        pairs = split_pairs(os.path.join(ROOT, ds, "validation"), INSTRUCTIONS[ds], 64)
        for task in ("d2q", "q2d"):
            print("==", ds, task)
            if task == "d2q":
                src = embed_texts(model, fmt, [(None, p.positive) for p in pairs])
                texts = [p.query for p in pairs]
                own = embed_texts(model, fmt, [(None, p.query) for p in pairs])
            else:
                src = embed_texts(model, fmt, [(p.instruction, p.query) for p in pairs])
                texts = [p.positive for p in pairs]
                own = embed_texts(model, fmt, [(None, p.positive) for p in pairs])
            targets, mask = pad([fmt.target_ids(t) for t in texts], fmt.pad_id)
            mean_tok = (W[targets] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            norm = src.norm(dim=-1).mean()
            print("anchor norm", norm.item(), "meantok norm", mean_tok.norm(dim=-1).mean().item())
            report(model, "paper E(src)", src, targets, mask)
            report(model, "E(src) @tok norm", rescale(src, tok_norm), targets, mask)
            report(model, "E(src) sink", src, targets, mask, True)
            report(model, "E(src) @tok norm sink", rescale(src, tok_norm), targets, mask, True)
            report(model, "oracle E(target) raw", own, targets, mask)
            report(model, "oracle E(target) @tok", rescale(own, tok_norm), targets, mask)
            report(model, "oracle meantok @tok", rescale(mean_tok, tok_norm), targets, mask)
            report(model, "oracle meantok @anchor", rescale(mean_tok, norm), targets, mask)
            report(model, "oracle meantok @tok sink", rescale(mean_tok, tok_norm), targets, mask, True)
            report(model, "oracle first-token emb", W[targets[:, 0]], targets, mask)
    print("seconds", time.time() - t0)


if __name__ == "__main__":
    main()
