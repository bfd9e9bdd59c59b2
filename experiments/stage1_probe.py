"""
Can a Stage I of this size teach the decoder to read the anchor? One Stage I run (train.py's
recipe, or its flags after --, the decoder options among them), then the reconstruction diagnostic
on held-out validation pairs: target loss per token given the true anchor against another pair's.
A gap is what a healthy Stage I leaves (experiments/README.md: the record of every probe).

  python experiments/stage1_probe.py                          # train.py's Stage I
  python experiments/stage1_probe.py -- --anchor-input paper  # with train.py flags
  python experiments/stage1_probe.py --report

The untrained model is measured once per decoder input (the flags' bireco.Decoding), the trained
one as its checkpoint decodes (bireco.checkpoint_decoding). Each finished run is recorded at once
in --results; a re-run skips it. (The records "rescale" and "sink" come from an earlier version
that changed the decoder input by hand: the anchor scaled to the token embeddings' norm, and
<|endoftext|> before it.)
"""

import argparse
import json
import os
import re
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bireco  # noqa: E402
from train import STAGE_DEFAULTS  # noqa: E402

STAGE2_STEPS = STAGE_DEFAULTS["contrastive"]["steps"]  # where compare.py's arms are scored last

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default=None, help="base model folder (default: embedded SmolLM2)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--pairs", type=int, default=64, help="validation pairs per dataset for the diagnostic")
parser.add_argument("--out", default=os.path.join(ROOT, "out", "probe"), help="the Stage I runs")
parser.add_argument("--results", default=os.path.join(ROOT, "experiments", "results", "stage1-probe.json"))
parser.add_argument("--stage2", choices=["validation", "test"], default=None,
                    help="then train.py's Stage II from the Stage I checkpoint (same seed) and nDCG@10 on this split")
parser.add_argument("--report", action="store_true", help="only print the table")
parser.add_argument("train_flags", nargs="*", help="train.py flags for Stage I, after --")


def report(results):
    from compare import loss_summary

    compared = os.path.join(ROOT, "experiments", "results", "compare.json")
    arms = json.load(open(compared)) if os.path.isfile(compared) else {}
    print(f"{'run':<40} {'seconds':>7}  {'dataset':<9} EBD2Q true / shuffled / gap   EBQ2D true / shuffled / gap")
    for name, r in results.items():
        for i, (ds, d) in enumerate(r["diagnostic"].items()):
            a, b = d["d2q"], d["q2d"]
            print(f"{name if i == 0 else '':<40} {r['seconds'] if i == 0 else '':>7}  {ds:<9} "
                  f"{a['true']:.3f} / {a['shuffled']:.3f} / {a['shuffled'] - a['true']:+.3f}     "
                  f"{b['true']:.3f} / {b['shuffled']:.3f} / {b['shuffled'] - b['true']:+.3f}")
        if "stage2" in r:  # beside compare.py's arms of the same seed, where they were scored on that split
            s2, seed = r["stage2"], name.rsplit(" s", 1)[1]
            line = f"  then Stage II: {s2['split']} nDCG@10 " + " / ".join(f"{v:.3f}" for v in s2["scores"].values())
            line += f", loss {loss_summary(s2['losses'])}"
            for arm in ("baseline", "ours"):
                at = arms.get(f"{arm}/s{seed}/contrastive@{STAGE2_STEPS}-{s2['split']}")
                if at:
                    line += f"; {arm} s{seed} " + " / ".join(f"{at[t]['ndcg_at_10']:.3f}" for t in s2["scores"])
            print(line)


def main():
    args = parser.parse_args()
    results = json.load(open(args.results)) if os.path.isfile(args.results) else {}
    if args.report:
        return report(results)
    import compare
    import train
    from smollm2 import default_model_dir

    def save():
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        with open(args.results + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.results + ".tmp", args.results)

    model = args.model or default_model_dir()
    flags = vars(train.parser.parse_args(["--stage", "recon", *args.train_flags]))
    flags["anchor_input"] = flags["anchor_input"] or STAGE_DEFAULTS["recon"]["anchor_input"]
    base = "base " + ("paper" if flags["anchor_input"] == "paper" else "sink centre_anchors")
    if base not in results:  # the untrained model, as the run's decoder reads anchors
        fmt = bireco.Embedder.from_pretrained(model).fmt
        how = bireco.Decoding.from_flags(flags, fmt).at_inference()
        results[base] = dict(flags="", seconds=0, diagnostic=compare.diagnostic(model, "validation", args.pairs, how))
        save()
    name = f"{shlex.join(args.train_flags) or 'defaults'} s{args.seed}"
    run = os.path.join(args.out, re.sub(r"[^\w.-]+", "_", name.replace("--", "")))
    if name not in results:
        t0 = time.time()
        train.main(["--stage", "recon", "--model", model, "--seed", str(args.seed), "--out", run, "--overwrite",
                    "--sample-every", "0", *args.train_flags])
        results[name] = dict(flags=shlex.join(args.train_flags), seconds=round(time.time() - t0),
                             diagnostic=compare.diagnostic(os.path.join(run, "latest"), "validation", args.pairs))
        save()
    if args.stage2 and "stage2" not in results[name]:  # train.py's Stage II from this checkpoint, as compare.py's arms
        d = run + "-contrastive"
        compare.run(["train.py", "--stage", "contrastive", "--model", os.path.join(run, "latest"), "--seed",
                     str(args.seed), "--out", d, "--overwrite", "--log-every", "1"], os.path.join(d, "train.log"))
        scores = compare.evaluate(os.path.join(d, "latest"), d, args.stage2)
        results[name]["stage2"] = {"split": args.stage2, "losses": compare.losses(os.path.join(d, "train.log")),
                                   "scores": {t: v["ndcg_at_10"] for t, v in scores.items()}}
        save()
    report(results)


if __name__ == "__main__":
    main()
