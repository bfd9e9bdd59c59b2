"""
Evaluate checkpoints as text embedders through MTEB's own evaluators (paper: Evaluation).

  python eval.py                                     # default model, the bundled tasks, offline
  python eval.py --model base/ --model run/latest    # side by side: rows metrics, columns models
  python eval.py --model DIR --tasks SciFact STS16   # any MTEB task (its data from the HF hub)
  python eval.py --model DIR --benchmark "MTEB(eng, v1)"
  python eval.py --model DIR --show 3                # what it retrieves for 3 test queries a task

- Embedding: the final hidden state at the EOS token (bireco.Embedder); cosine similarity.
- Instructions: one per task, as "Instruct: {instruction}\\nQuery: {text}". Retrieval and reranking
  documents get none; queries and every text of other task types get it. instructions.json holds the
  E5-Mistral wording for the 56 tasks of MTEB(eng, v1); other tasks use their mteb prompt, else
  their description (with a printed note). mteb_tasks.py holds the encoder and the bundled tasks.
- The bundled tasks (the default): WordNetSenseRetrieval (wordnet/: word + usage example -> the
  gloss of its sense) and ManPageRetrieval (manpages/: a man page's one-line summary -> its
  description), the held-out test split or, with --split validation, the split used for tuning.
  BM25 on the same split is printed beside the models: the lexical bar.
- Results: mteb's layout, OUTPUT/results/bireco__<folder>/<revision>/<Task>.json + model_meta.json;
  the revision hashes the weights, and every run recomputes and overwrites.
Left out: multi-GPU encoding, reusing embeddings between runs, bidirectional attention.
"""

import argparse
import errno
import os
import re
import socket
import sys
import time
from math import nan
from urllib.parse import urlparse

import hardware  # first: the OpenMP wait policy, before torch loads
import data
import torch
from bireco import Embedder, checkpoint_decoding, heldout_report
from smollm2 import default_model_dir

ROOT = os.path.dirname(os.path.abspath(__file__))
METRICS = ["ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_10", "recall_at_100"]  # retrieval

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
arg = parser.add_argument
arg("--model", action="append", help="checkpoint folder; repeat to compare (none: SmolLM2-135M)")
arg("--tasks", nargs="+", default=list(data.BUNDLED_TASKS), help="MTEB task names")
arg("--split", choices=["test", "validation"], default="test",
    help="split of the bundled tasks: validation to choose settings, test to report")
arg("--benchmark", help='MTEB benchmark name, e.g. "MTEB(eng, v1)" (replaces --tasks)')
arg("--batch-size", type=int, default=32, help="texts per forward pass")
arg("--max-length", type=int, default=512,
    help="tokens per text, template and EOS included (the paper trims MTEB texts to 400)")
arg("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
    help="auto: bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16, else float32")
arg("--device", help="none: cuda if available, else cpu")
arg("--output", default="results", help="mteb result folder")
arg("--reconstruct", type=int, default=0, metavar="N",
    help="instead of scoring: N held-out pairs of the bundled tasks regenerated from their "
    "[EOS] vectors, then the gap (true vs another pair's anchor) and the form check")
arg("--show", type=int, default=0, metavar="N",
    help="instead of scoring: what the model retrieves for the first N queries of each bundled "
    "task's --split, the top 3 of the split's corpus and the relevant document's rank")
arg("--gap-pairs", type=int, default=128, metavar="N",
    help="--reconstruct: the gap and the form check over the split's first N pairs of each task, "
    "as train.py's reports; 0 = the whole split")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub (or the configured proxy), instead of mteb's retries."""
    proxies = [os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")]
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(next((p for p in proxies if p), hub))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout).close()
        return True
    except OSError:
        return False


def download_failed(e: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) is the hub or the network failing."""
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(
                ("huggingface_hub", "httpx", "requests", "urllib3")):
            return True
        e = e.__cause__ or e.__context__
    return False


def run_name(path: str) -> str:
    """A column's name: the run's folder for <run>/latest, <run>/step-N for other checkpoints."""
    path = os.path.normpath(path)
    if os.path.basename(path) == "latest":
        return os.path.basename(os.path.dirname(path))
    if re.fullmatch(r"step-\d+", os.path.basename(path)):
        return "/".join(path.split(os.sep)[-2:])
    return os.path.basename(path)


def reconstruction_report(path: str, names: list[str], args):
    """--reconstruct N: what a checkpoint's [EOS] vectors carry on the bundled tasks' --split:
    N pairs regenerated both ways, the gap and the form check over --gap-pairs of the split
    (bireco.heldout_report)."""
    embedder = Embedder.from_pretrained(path, args.device, args.dtype, args.max_length)
    n = args.gap_pairs or None
    folders = (data.BUNDLED_TASKS[name] for name in names)  # dataset names, as data.SIDE_FORMS's
    sets = {d: data.split_pairs(os.path.join(ROOT, d, args.split), data.INSTRUCTIONS[d], n)
            for d in folders}
    how = checkpoint_decoding(path, embedder.fmt)  # as the checkpoint's Stage I decoded
    lines = heldout_report(embedder.model, embedder.fmt, sets, how, args.reconstruct,
                           f"{args.split} pairs")
    print(f"\n{run_name(path)}:", *lines, sep="\n")


def retrieval_samples(path: str, names: list[str], args):
    """--show N: the first N queries of each bundled task's --split, each with the three documents
    of the split's corpus nearest to it by cosine (* marks a relevant one) and the first relevant
    document's rank, as nDCG@10 sees them."""
    embedder = Embedder.from_pretrained(path, args.device, args.dtype, args.max_length)
    print(f"\n{run_name(path)}:")
    for name in names:
        folder = data.BUNDLED_TASKS[name]
        queries, corpus, qrels = data.read_split(os.path.join(ROOT, folder, args.split))
        ids, asked = list(corpus), list(qrels)[:args.show]
        docs = embedder.encode([corpus[d] for d in ids], batch_size=args.batch_size)
        q = embedder.encode([queries[i] for i in asked], data.INSTRUCTIONS[folder], args.batch_size)
        for qid, row in zip(asked, q @ docs.T):
            ranking = sorted(range(len(ids)), key=lambda i: -row[i])
            first = next(r for r, i in enumerate(ranking) if ids[i] in qrels[qid])
            print(f"\n{name} query: {queries[qid]}  (relevant at rank {first + 1} of {len(ids)})")
            top = list(range(min(3, len(ids))))
            for r in top + ([first] if first not in top else []):  # the top 3, then the relevant one
                i = ranking[r]
                mark = "*" if ids[i] in qrels[qid] else " "
                print(f"  {r + 1}{mark} {row[i]:.3f}  {' '.join(corpus[ids[i]].split())[:100]}")


def add_average(scores: dict, tasks: list, columns: list[str]):
    """MTEB's headline number, the mean main score over the tasks, as the row ("average", "main
    score") of scores[(task, metric)][column]; for the columns that score every task (BM25 scores
    the bundled tasks only), and only where there are several tasks."""
    if len(tasks) > 1:
        mains = [scores[(t.metadata.name, t.metadata.main_score)] for t in tasks]
        scores[("average", "main score")] = {c: sum(m[c] for m in mains) / len(mains)
                                             for c in columns if all(c in m for m in mains)}


def print_table(scores: dict, columns: list[str]):
    """Rows (task, metric), one column a model (and BM25); "-" where a column has no score."""
    width = max(len(f"{t} {m}") for t, m in scores) + 2
    cols = [max(12, len(c) + 2) for c in columns]
    print("\n" + " " * width + "".join(f"{c:>{w}}" for c, w in zip(columns, cols)))
    for (task, metric), row in scores.items():
        cells = (f"{row[c]:>{w}.4f}" if c in row else " " * (w - 1) + "-"
                 for c, w in zip(columns, cols))
        print(f"{task} {metric}".ljust(width) + "".join(cells))


def main(argv=None):
    args = parser.parse_args(argv)
    if args.show < 0 or args.reconstruct < 0:
        parser.error("--show and --reconstruct take a count of 1 or more (0: score instead)")
    if args.show and args.reconstruct:
        parser.error("--show and --reconstruct are two different reports: give one of them")
    if args.gap_pairs < 0:
        parser.error(f"--gap-pairs must be 0 (the whole split) or more, got {args.gap_pairs}")
    for path in args.model or []:  # before the slow imports
        if not os.path.isfile(os.path.join(path, "config.json")):
            sys.exit(f"eval.py: --model {path} is not a checkpoint folder (no config.json in it)")
    # offline, a task whose data is not in the local cache should fail at once instead of retrying
    # for half a minute: decided here, since huggingface_hub reads HF_HUB_OFFLINE when imported
    hub_tasks = args.benchmark or set(args.tasks) - set(data.BUNDLED_TASKS)
    if hub_tasks and not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
        print("note: the Hugging Face hub is unreachable; only data in the local cache can be used")
        os.environ["HF_HUB_OFFLINE"] = "1"
    import mteb_tasks  # mteb and the Hugging Face libraries load here, after the decision

    try:
        tasks = mteb_tasks.get_tasks(args.tasks, args.benchmark, args.split)
    except ValueError as e:
        sys.exit(f"eval.py: {e}")
    bundled = [t for t in tasks if t.metadata.name in mteb_tasks.TASKS]
    args.model = args.model or [default_model_dir()]
    args.device = device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    auto = args.dtype == "auto"
    args.dtype = dtype = hardware.auto_dtype(device) if auto else getattr(torch, args.dtype)
    if args.reconstruct or args.show:
        flag = "--reconstruct" if args.reconstruct else "--show"
        if not bundled:
            sys.exit(f"eval.py: {flag} reads the held-out splits of the bundled tasks; none is "
                     "among --tasks")
        for path in args.model:
            report = reconstruction_report if args.reconstruct else retrieval_samples
            report(path, [t.metadata.name for t in bundled], args)
        return
    try:  # a folder results cannot be written to fails now, before any encoding
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, ".write-test"), "w"):
            pass
        os.remove(os.path.join(args.output, ".write-test"))
    except OSError as e:
        sys.exit(f"eval.py: cannot write results to {args.output}: {e.strerror or e}")
    print(f"models: {args.model}\ntasks: {[t.metadata.name for t in tasks]}\ndevice {device}, "
          f"dtype {dtype}, max length {args.max_length}, batch size {args.batch_size}, "
          f"output {args.output}")

    columns, scores = [], {}  # scores[(task, metric)][column]
    for path in args.model:
        try:
            encoder = mteb_tasks.Encoder(path, device, dtype, args.max_length, args.batch_size)
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"eval.py: --model {path} is not a usable checkpoint: {e}")
        column = run_name(path)  # the same name twice: the second with its weights' hash
        column = f"{column}@{encoder.mteb_model_meta.revision}" if column in columns else column
        columns.append(column)
        for task in tasks:
            t0, name = time.time(), task.metadata.name
            try:
                res = mteb_tasks.evaluate(encoder, task, args.output, args.batch_size)
            except Exception as e:
                full = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)  # or read-only
                if isinstance(e, OSError) and e.errno in full:
                    sys.exit(f"eval.py: cannot write results to {args.output}: {e.strerror}")
                if name in mteb_tasks.TASKS or not download_failed(e):
                    raise
                sys.exit(f"eval.py: task {name} could not download its data (no network or hub "
                         f"unreachable): {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            metrics = [task.metadata.main_score] + METRICS * (task.metadata.type == "Retrieval")
            for metric in dict.fromkeys(metrics):
                score = res.get_score(getter=lambda s: s.get(metric, nan))
                scores.setdefault((name, metric), {})[column] = score
            fmt = encoder.embedder.fmt
            print(f"{column} {name}: {task.metadata.main_score} {res.get_score():.4f} "
                  f"({time.time() - t0:.0f} s, {fmt.truncated} texts trimmed to "
                  f"{args.max_length} tokens)")
            fmt.truncated = 0
        del encoder

    for task in bundled:  # the lexical bar beside the models
        scores[(task.metadata.name, "ndcg_at_10")]["BM25"] = data.bm25_ndcg10(task.path)
    columns += ["BM25"] if bundled else []
    add_average(scores, tasks, columns)
    print_table(scores, columns)
    print(f"\nresults: {os.path.join(args.output, 'results')}")


if __name__ == "__main__":
    main()
