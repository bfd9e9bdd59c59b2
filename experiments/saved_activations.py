"""
What Stage II's forward pass keeps for backward: every tensor autograd saves while one default
batch (train.py's Stage II: 32 pairs of a bundled dataset, 96 texts of at most 64 tokens, LoRA r16
with dropout 0.05, fp32) is embedded with autograd, each storage counted once, grouped by its last
dimension (576 hidden, 1,536 MLP, 64 attention head in SmolLM2-135M).

  python experiments/saved_activations.py [--data manpages] [--lora-dropout 0.05]
"""

import argparse
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import train  # noqa: E402
from bireco import embed  # noqa: E402
from data import TextFormat, load_pairs, pad  # noqa: E402
from model import load_model, load_tokenizer  # noqa: E402
from smollm2 import default_model_dir  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--data", default="manpages", choices=["manpages", "wordnet"])
parser.add_argument("--lora-dropout", type=float, default=0.05)

if __name__ == "__main__":
    args = parser.parse_args()
    torch.manual_seed(0)
    path = default_model_dir()
    model = load_model(path)
    train.add_lora(model, 16, 32.0, args.lora_dropout)
    model.train()
    fmt = TextFormat(*load_tokenizer(path), max_length=64)
    batch = random.Random(0).sample(load_pairs(os.path.join(ROOT, args.data, "train"))[args.data], 32)
    items = [(p.instruction, p.query) for p in batch] + [(None, p.positive) for p in batch]
    items += [(None, p.negative) for p in batch if p.negative]
    ids, mask = pad([fmt.embed_ids(text, instruction) for instruction, text in items], fmt.pad_id)
    sizes, by_width = {}, {}

    def keep(t):
        key = t.untyped_storage().data_ptr()
        if key not in sizes:
            sizes[key] = t.untyped_storage().nbytes()
            width = (str(t.dtype).removeprefix("torch."), t.shape[-1] if t.dim() else 0)
            by_width[width] = by_width.get(width, 0) + sizes[key]
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        embed(model, ids, mask, fmt.eos_id)
    total = sum(sizes.values())
    print(f"{len(items)} texts, {ids.numel()} padded tokens ({int(mask.sum())} real): saved {total / 2**30:.2f} "
          f"GiB, {total / ids.numel() / 1e6:.2f} MB a padded token")
    for (dtype, width), n in sorted(by_width.items(), key=lambda kv: -kv[1]):
        print(f"  {dtype} last dim {width}: {n / 2**30:.2f} GiB")
