"""
Evaluate checkpoints as text embedders through MTEB's own evaluators (paper: Evaluation).

  python eval.py                                     # default model, the bundled tasks, offline
  python eval.py --model base/ --model run/latest    # side by side: rows metrics, columns models
  python eval.py --model DIR --tasks SciFact STS16   # any MTEB task (its data from the HF hub)
  python eval.py --model DIR --benchmark "MTEB(eng, v1)"

- Embedding: the final hidden state at the EOS token (bireco.Embedder); cosine similarity.
- Instructions: one per task, as "Instruct: {instruction}\\nQuery: {text}". Retrieval and reranking
  documents get none; queries and every text of other task types get it. instructions.json holds the
  E5-Mistral wording for the 56 tasks of MTEB(eng, v1); other tasks use their mteb prompt, else
  their description (with a printed note).
- The bundled tasks (the default): WordNetSenseRetrieval (wordnet/: word + usage example -> the
  gloss of its sense) and ManPageRetrieval (manpages/: a man page's one-line summary -> its
  description), the held-out test split or, with --split validation, the split used for tuning.
  BM25 on the same split is printed beside the models: the lexical bar.
- Results: mteb's layout, OUTPUT/results/bireco__<folder>/<revision>/<Task>.json + model_meta.json;
  the revision hashes the weights, and every run recomputes and overwrites.
Left out: multi-GPU encoding, reusing embeddings between runs, bidirectional attention.
"""

import argparse
import difflib
import errno
import hashlib
import json
import os
import re
import socket
import sys
import time
from math import nan
from urllib.parse import urlparse

import hardware  # first: the OpenMP wait policy, before torch loads
import data  # torch, not mteb: mteb reads HF_HUB_OFFLINE at import
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
    "[EOS] vectors, and the gap (true vs another pair's anchor) over the split")


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


if __name__ == "__main__":
    args = parser.parse_args()
    for path in args.model or []:  # before the slow imports
        if not os.path.isfile(os.path.join(path, "config.json")):
            sys.exit(f"eval.py: --model {path} is not a checkpoint folder (no config.json in it)")
    # huggingface_hub and datasets read HF_HUB_OFFLINE at import, so decide before `import mteb`:
    # offline, a task whose data is not in the local cache fails at once instead of retrying for
    # half a minute (hence two __main__ blocks: this one before the imports, main after them)
    hub_tasks = args.benchmark or set(args.tasks) - set(data.BUNDLED_TASKS)
    if hub_tasks and not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable():
        print("note: the Hugging Face hub is unreachable; only data in the local cache can be used")
        os.environ["HF_HUB_OFFLINE"] = "1"

import mteb  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from mteb.abstasks import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.aggregated_task import AbsTaskAggregate  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.cache import ResultCache  # noqa: E402
from mteb.models import ModelMeta  # noqa: E402
from mteb.models.abs_encoder import AbsEncoder  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from bireco import Embedder, checkpoint_decoding, heldout_report  # noqa: E402

INSTRUCTIONS = data.task_instructions()


def digest(paths: list[str]) -> str:
    """Short content hash of files: a result's revision changes exactly when the weights do."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:12]


class BundledRetrieval(AbsTaskRetrieval):
    """A held-out split of a bundled dataset as an mteb retrieval task: <folder>/<split>/."""
    folder = None

    def __init__(self, split: str = "test", **kwargs):
        self.split, self.path = split, os.path.join(ROOT, self.folder, split)
        names = ("queries.jsonl.gz", "corpus.jsonl.gz", "qrels.tsv")
        files = [os.path.join(self.path, f) for f in names]
        self.metadata = self.metadata.model_copy(update=dict(
            eval_splits=[split],
            dataset={"path": f"{self.folder}/{split}", "revision": digest(files)}))
        super().__init__(**kwargs)

    def load_data(self, num_proc=None, **kwargs):
        queries, corpus, qrels = data.read_split(self.path)
        as_rows = lambda texts: Dataset.from_list([{"id": k, "text": v} for k, v in texts.items()])
        self.dataset = {"default": {self.split: RetrievalSplitData(
            queries=as_rows(queries), corpus=as_rows(corpus), relevant_docs=qrels,
            top_ranked=None)}}
        self.data_loaded = True


def bundled_metadata(name, description, reference, license, date):
    return TaskMetadata(
        name=name, type="Retrieval", category="t2t", modalities=["text"], main_score="ndcg_at_10",
        description=description, dataset={"path": "", "revision": ""}, reference=reference,
        eval_splits=["test"],
        eval_langs=["eng-Latn"], date=date, domains=["Written"], task_subtypes=[], license=license,
        annotations_creators="expert-annotated", dialect=[], sample_creation="found",
        bibtex_citation="")


class WordNetSenseRetrieval(BundledRetrieval):
    """wordnet/README.md: word + usage example -> the gloss of its sense."""
    folder = "wordnet"
    metadata = bundled_metadata(
        "WordNetSenseRetrieval", "Given a word and a usage example from WordNet 3.0, retrieve the "
        "gloss of the sense it illustrates among the glosses of other senses of its lemmas "
        "(synsets held out from training).", "https://wordnet.princeton.edu/",
        "https://wordnet.princeton.edu/license-and-commercial-use",
        ("2006-01-01", "2006-12-31"))


class ManPageRetrieval(BundledRetrieval):
    """manpages/README.md: a man page's one-line summary -> the opening of its description."""
    folder = "manpages"
    metadata = bundled_metadata(
        "ManPageRetrieval", "Given the one-line summary of a Linux man page (sections 2-7), "
        "retrieve the opening "
        "of its DESCRIPTION among all pages' (pages held out from training).",
        "https://www.kernel.org/doc/man-pages/",
        "https://spdx.org/licenses/Linux-man-pages-copyleft.html",
        ("2023-01-01", "2023-04-30"))


TASKS = {cls.metadata.name: cls for cls in (WordNetSenseRetrieval, ManPageRetrieval)}


class Encoder(AbsEncoder):
    """mteb's encoder protocol for one checkpoint folder."""

    def __init__(self, path: str, device: str, dtype: torch.dtype, max_length: int = 512,
                 batch_size: int = 32):
        self.embedder = Embedder.from_pretrained(path, device, dtype, max_length)
        model = self.embedder.model
        self.batch_size, self.noted = batch_size, set()
        weights = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        meta = {}
        if os.path.isfile(os.path.join(path, "meta.json")):  # train.py's checkpoints: their data
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
        cfg, n_params = model.config, sum(p.numel() for p in model.parameters())
        self.mteb_model_meta = ModelMeta(
            loader=None, name="bireco/" + os.path.basename(os.path.realpath(path)),
            revision=digest([os.path.join(path, f) for f in ["config.json"] + weights]),
            release_date=time.strftime("%Y-%m-%d", time.gmtime(os.path.getmtime(
                os.path.join(path, weights[0])))),
            languages=None, n_parameters=n_params,
            n_embedding_parameters=cfg.vocab_size * cfg.hidden_size,
            memory_usage_mb=round(n_params * dtype.itemsize / 2**20, 1),
            max_tokens=cfg.max_position_embeddings,
            embed_dim=cfg.hidden_size, license=None, open_weights=True, public_training_code=None,
            public_training_data=None, framework=["PyTorch"], similarity_fn_name="cosine",
            use_instructions=True,
            training_datasets=set(meta.get("training_datasets", [])))

    def instruction_for(self, task_metadata: TaskMetadata, prompt_type=None) -> str | None:
        if prompt_type == PromptType.document:
            return None  # paper: retrieval documents carry no instruction
        name = task_metadata.name
        if name in INSTRUCTIONS:
            return INSTRUCTIONS[name]
        prompt, source = task_metadata.prompt, "its mteb metadata"
        instruction = prompt.get("query") if isinstance(prompt, dict) else prompt
        if not instruction:
            instruction = task_metadata.description.strip().split("\n")[0].rstrip(".")
            source = "its description"
        if name not in self.noted:
            self.noted.add(name)
            print(f"note: {name} is not in instructions.json; instruction from {source}: "
                  f"{instruction!r}")
        return instruction

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]  # Embedder sorts them
        instruction = self.instruction_for(task_metadata, prompt_type)
        return self.embedder.encode(texts, instruction, self.batch_size, progress=True)


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


def reconstruction_report(path: str, names: list[str], n: int, args):
    """--reconstruct N: what a checkpoint's [EOS] vectors carry on the bundled tasks' --split:
    N pairs regenerated both ways and the gap over the whole split (bireco.heldout_report)."""
    embedder = Embedder.from_pretrained(path, args.device, args.dtype, args.max_length)
    sets = {name: data.split_pairs(os.path.join(ROOT, data.BUNDLED_TASKS[name], args.split),
                                   data.INSTRUCTIONS[data.BUNDLED_TASKS[name]]) for name in names}
    how = checkpoint_decoding(path, embedder.fmt)  # as the checkpoint's Stage I decoded
    lines = heldout_report(embedder.model, embedder.fmt, sets, how, n, f"{args.split} pairs")
    print(f"\n{run_name(path)}:", *lines, sep="\n")


def add_average(scores: dict, tasks: list, columns: list[str]):
    """MTEB's headline number, the mean main score over the tasks, as the row ("average", "main
    score") of scores[(task, metric)][column]; for the columns that score every task (BM25 scores
    the bundled tasks only), and only where there are several tasks."""
    if len(tasks) > 1:
        mains = [scores[(t.metadata.name, t.metadata.main_score)] for t in tasks]
        scores[("average", "main score")] = {c: sum(m[c] for m in mains) / len(mains)
                                             for c in columns if all(c in m for m in mains)}


def main(args):
    names = {t.metadata.name for t in mteb.get_tasks()} | set(TASKS)
    for name in [] if args.benchmark else args.tasks:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            sys.exit(f"eval.py: unknown task {name!r}{hint}")
    try:
        tasks = list(mteb.get_benchmark(args.benchmark).tasks) if args.benchmark else [
            TASKS[n](args.split) if n in TASKS else mteb.get_task(n) for n in args.tasks]
    except KeyError as e:
        sys.exit(f"eval.py: {e.args[0]}")
    args.model = args.model or [default_model_dir()]
    args.device = device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    auto = args.dtype == "auto"
    args.dtype = dtype = hardware.auto_dtype(device) if auto else getattr(torch, args.dtype)
    if args.reconstruct:
        names = [t.metadata.name for t in tasks if t.metadata.name in TASKS]
        if not names:
            sys.exit("eval.py: --reconstruct reads the held-out pairs of the bundled tasks; "
                     "none is among --tasks")
        for path in args.model:
            reconstruction_report(path, names, args.reconstruct, args)
        return
    try:  # a folder results cannot be written to fails now, before any encoding
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, ".write-test"), "w"):
            pass
        os.remove(os.path.join(args.output, ".write-test"))
    except OSError as e:
        sys.exit(f"eval.py: cannot write results to {args.output}: {e.strerror or e}")
    print(f"models: {args.model}\ntasks: {[t.metadata.name for t in tasks]}\ndevice {device}, "
          f"dtype {dtype}, "
          f"max length {args.max_length}, batch size {args.batch_size}, output {args.output}")

    columns, scores = [], {}  # scores[(task, metric)][column]
    for path in args.model:
        try:
            encoder = Encoder(path, device, dtype, args.max_length, args.batch_size)
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"eval.py: --model {path} is not a usable checkpoint: {e}")
        column = run_name(path)
        column = f"{column}@{encoder.mteb_model_meta.revision}" if column in columns else column
        columns.append(column)
        for task in tasks:
            t0 = time.time()
            try:  # data first (an aggregate loads per subtask): a failed download costs no encoding
                if not isinstance(task, AbsTaskAggregate):
                    task.load_data()
                result = mteb.evaluate(encoder, task, cache=ResultCache(args.output),
                                       overwrite_strategy="always", co2_tracker=False,
                                       encode_kwargs={"batch_size": args.batch_size})
            except Exception as e:
                full = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)  # or read-only
                if isinstance(e, OSError) and e.errno in full:
                    sys.exit(f"eval.py: cannot write results to {args.output}: {e.strerror}")
                if task.metadata.name in TASKS or not download_failed(e):
                    raise
                sys.exit(f"eval.py: task {task.metadata.name} could not download its data (no "
                         "network or hub "
                         f"unreachable): {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            res, name = result.task_results[0], task.metadata.name
            metrics = [task.metadata.main_score] + METRICS * (task.metadata.type == "Retrieval")
            for metric in dict.fromkeys(metrics):
                score = res.get_score(getter=lambda s: s.get(metric, nan))
                scores.setdefault((name, metric), {})[column] = score
            fmt = encoder.embedder.fmt
            print(f"{column} {name}: {task.metadata.main_score} {res.get_score():.4f} "
                  f"({time.time() - t0:.0f} s, "
                  f"{fmt.truncated} texts trimmed to {args.max_length} tokens)")
            fmt.truncated = 0
            if task.data_loaded:  # mteb leaves data it did not load itself
                task.unload_data()
        del encoder

    bundled = [t for t in tasks if t.metadata.name in TASKS]
    for task in bundled:  # the lexical bar beside the models
        scores[(task.metadata.name, "ndcg_at_10")]["BM25"] = data.bm25_ndcg10(task.path)
    columns += ["BM25"] if bundled else []
    add_average(scores, tasks, columns)
    width = max(len(f"{t} {m}") for t, m in scores) + 2
    cols = [max(12, len(c) + 2) for c in columns]
    print("\n" + " " * width + "".join(f"{c:>{w}}" for c, w in zip(columns, cols)))
    for (task, metric), row in scores.items():
        cells = (f"{row[c]:>{w}.4f}" if c in row else " " * (w - 1) + "-"
                 for c, w in zip(columns, cols))
        print(f"{task} {metric}".ljust(width) + "".join(cells))
    print(f"\nresults: {os.path.join(args.output, 'results')}")


if __name__ == "__main__":
    main(args)
