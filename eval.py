"""
Evaluate checkpoints as text embedders through MTEB's own evaluators (paper: Evaluation).

  python eval.py                                       # default model on the bundled WordNet task, offline
  python eval.py --model base/ --model run/latest      # side by side: rows = metrics, columns = models
  python eval.py --model DIR --tasks SciFact STS16     # any MTEB task (its data comes from the HF hub)
  python eval.py --model DIR --benchmark "MTEB(eng, v1)"

- Embedding: the final hidden state at the EOS token (bireco.Embedder); cosine similarity.
- Instructions: one per task, as "Instruct: {instruction}\\nQuery: {text}". Retrieval and reranking
  documents get none; queries and every text of other task types get it. instructions.json holds the
  E5-Mistral wording for the 56 tasks of MTEB(eng, v1); other tasks use their mteb prompt, else
  their description (with a printed note).
- WordNetSenseRetrieval: the held-out split in wordnet/test as an mteb retrieval task.
- Results: mteb's layout, OUTPUT/results/bireco__<folder>/<revision>/<Task>.json + model_meta.json;
  the revision hashes the weights, and every run recomputes and overwrites.
Left out: multi-GPU encoding, reusing embeddings between runs, bidirectional attention.
"""

import argparse
import difflib
import hashlib
import json
import os
import socket
import sys
import time
from math import nan
from urllib.parse import urlparse

ROOT = os.path.dirname(os.path.abspath(__file__))
WORDNET_TASK = "WordNetSenseRetrieval"
METRICS = ["ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_10", "recall_at_100"]  # retrieval rows

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", action="append", default=None,
                    help="checkpoint folder; repeat to compare (none: the embedded SmolLM2-135M-Instruct)")
parser.add_argument("--tasks", nargs="+", default=[WORDNET_TASK], help="MTEB task names")
parser.add_argument("--benchmark", default=None, help='MTEB benchmark name, e.g. "MTEB(eng, v1)" (replaces --tasks)')
parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
parser.add_argument("--max-length", type=int, default=512,
                    help="tokens per text, template and EOS included (the paper trims MTEB texts to 400)")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 on CUDA, float32 on CPU")
parser.add_argument("--device", default=None, help="none: cuda if available, else cpu")
parser.add_argument("--output", default="results", help="mteb result folder")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub (or the configured proxy), instead of mteb's retries."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY") if os.environ.get(k)), None)
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    args = parser.parse_args()
    for path in args.model or []:  # before the slow imports
        if not os.path.isfile(os.path.join(path, "config.json")):
            sys.exit(f"eval.py: --model {path} is not a checkpoint folder (no config.json in it)")
    # huggingface_hub and datasets read HF_HUB_OFFLINE at import, so decide before `import mteb`: offline,
    # a task whose data is not in the local cache fails at once instead of retrying for half a minute
    if (args.benchmark or set(args.tasks) - {WORDNET_TASK}) and not os.environ.get("HF_HUB_OFFLINE") \
            and not hub_reachable():
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

import data  # noqa: E402
from bireco import Embedder  # noqa: E402
from model import load_model, load_tokenizer  # noqa: E402

with open(os.path.join(ROOT, "instructions.json")) as f:
    INSTRUCTIONS = json.load(f) | {WORDNET_TASK: data.INSTRUCTIONS["wordnet"]}  # the training instruction


def digest(paths: list[str]) -> str:
    """Short content hash of files: a result's revision changes exactly when the weights do."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:12]


class WordNetSenseRetrieval(AbsTaskRetrieval):
    """The bundled held-out task (wordnet/README.md): usage example -> gloss of its sense."""
    files = [os.path.join(ROOT, "wordnet", "test", f) for f in ("queries.jsonl.gz", "corpus.jsonl.gz", "qrels.tsv")]
    metadata = TaskMetadata(
        name=WORDNET_TASK, type="Retrieval", category="t2t", modalities=["text"], main_score="ndcg_at_10",
        description="Given a usage example from WordNet 3.0, retrieve the gloss of the sense it illustrates "
                    "among the glosses of other senses of its lemmas (synsets held out from training).",
        dataset={"path": "wordnet/test", "revision": digest(files)}, reference="https://wordnet.princeton.edu/",
        eval_splits=["test"], eval_langs=["eng-Latn"], date=("2006-01-01", "2006-12-31"), domains=["Written"],
        task_subtypes=[], license="https://wordnet.princeton.edu/license-and-commercial-use",
        annotations_creators="expert-annotated", dialect=[], sample_creation="found", bibtex_citation="")

    def load_data(self, num_proc=None, **kwargs):
        queries, corpus = ([row for _, row in data.read_jsonl(p)] for p in self.files[:2])
        qrels = {}
        with open(self.files[2]) as f:
            for q, d, score in (line.split("\t") for line in list(f)[1:]):  # header: query-id corpus-id score
                qrels.setdefault(q, {})[d] = int(score)
        self.dataset = {"default": {"test": RetrievalSplitData(queries=Dataset.from_list(queries),
                        corpus=Dataset.from_list(corpus), relevant_docs=qrels, top_ranked=None)}}
        self.data_loaded = True


class Encoder(AbsEncoder):
    """mteb's encoder protocol for one checkpoint folder."""

    def __init__(self, path: str, device: str, dtype: torch.dtype, max_length: int = 512, batch_size: int = 32):
        tokenizer, eos_ids = load_tokenizer(path)
        model = load_model(path, device, dtype)
        self.embedder = Embedder(model, data.TextFormat(tokenizer, eos_ids, max_length))
        self.batch_size, self.noted = batch_size, set()
        weights = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        meta = {}
        if os.path.isfile(os.path.join(path, "meta.json")):  # train.py's checkpoints declare their data
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
        cfg, n_params = model.config, sum(p.numel() for p in model.parameters())
        self.mteb_model_meta = ModelMeta(
            loader=None, name="bireco/" + os.path.basename(os.path.realpath(path)),
            revision=digest([os.path.join(path, f) for f in ["config.json"] + weights]),
            release_date=time.strftime("%Y-%m-%d", time.gmtime(os.path.getmtime(os.path.join(path, weights[0])))),
            languages=None, n_parameters=n_params, n_embedding_parameters=cfg.vocab_size * cfg.hidden_size,
            memory_usage_mb=round(n_params * dtype.itemsize / 2**20, 1), max_tokens=cfg.max_position_embeddings,
            embed_dim=cfg.hidden_size, license=None, open_weights=True, public_training_code=None,
            public_training_data=None, framework=["PyTorch"], similarity_fn_name="cosine", use_instructions=True,
            training_datasets=set(meta.get("training_datasets", [])))

    def instruction_for(self, task_metadata: TaskMetadata, prompt_type: PromptType | None = None) -> str | None:
        if prompt_type == PromptType.document:
            return None  # paper: retrieval documents carry no instruction
        name = task_metadata.name
        if name in INSTRUCTIONS:
            return INSTRUCTIONS[name]
        prompt, source = task_metadata.prompt, "its mteb metadata"
        instruction = prompt.get("query") if isinstance(prompt, dict) else prompt
        if not instruction:
            instruction, source = task_metadata.description.strip().split("\n")[0].rstrip("."), "its description"
        if name not in self.noted:
            self.noted.add(name)
            print(f"note: {name} is not in instructions.json; instruction from {source}: {instruction!r}")
        return instruction

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]  # all at once: Embedder sorts by length
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


def main(args):
    names = {t.metadata.name for t in mteb.get_tasks()} | {WORDNET_TASK}
    for name in [] if args.benchmark else args.tasks:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            sys.exit(f"eval.py: unknown task {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        tasks = list(mteb.get_benchmark(args.benchmark).tasks) if args.benchmark else [
            WordNetSenseRetrieval() if n == WORDNET_TASK else mteb.get_task(n) for n in args.tasks]
    except KeyError as e:
        sys.exit(f"eval.py: {e.args[0]}")
    if args.model is None:
        from smollm2 import default_model_dir
        args.model = [default_model_dir()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bfloat16" or (args.dtype == "auto" and device.startswith("cuda")) \
        else torch.float32
    print(f"models: {args.model}\ntasks: {[t.metadata.name for t in tasks]}\ndevice {device}, dtype {dtype}, "
          f"max length {args.max_length}, batch size {args.batch_size}, output {args.output}")

    columns, scores = [], {}  # scores[(task, metric)][column]
    for path in args.model:
        try:
            encoder = Encoder(path, device, dtype, args.max_length, args.batch_size)
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"eval.py: --model {path} is not a usable checkpoint: {e}")
        column = encoder.mteb_model_meta.name.removeprefix("bireco/")
        column = f"{column}@{encoder.mteb_model_meta.revision}" if column in columns else column
        columns.append(column)
        for task in tasks:
            t0 = time.time()
            try:  # data first (an aggregate loads per subtask), so a failed download costs no encoding
                if not isinstance(task, AbsTaskAggregate):
                    task.load_data()
                result = mteb.evaluate(encoder, task, cache=ResultCache(args.output), overwrite_strategy="always",
                                       encode_kwargs={"batch_size": args.batch_size}, co2_tracker=False)
            except Exception as e:
                if task.metadata.name == WORDNET_TASK or not download_failed(e):
                    raise
                sys.exit(f"eval.py: task {task.metadata.name} could not download its data (no network or hub "
                         f"unreachable): {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            res, name = result.task_results[0], task.metadata.name
            metrics = [task.metadata.main_score] + (METRICS if task.metadata.type == "Retrieval" else [])
            for metric in dict.fromkeys(metrics):
                scores.setdefault((name, metric), {})[column] = res.get_score(getter=lambda s: s.get(metric, nan))
            fmt = encoder.embedder.fmt
            print(f"{column} {name}: {task.metadata.main_score} {res.get_score():.4f} ({time.time() - t0:.0f} s, "
                  f"{fmt.truncated} texts trimmed to {args.max_length} tokens)")
            fmt.truncated = 0
            if task.data_loaded:  # mteb leaves data it did not load itself
                task.unload_data()
        del encoder

    if len(tasks) > 1:  # MTEB's headline number: the mean main score over tasks
        mains = [scores[(t.metadata.name, t.metadata.main_score)] for t in tasks]
        scores[("average", "main score")] = {c: sum(m[c] for m in mains) / len(mains) for c in columns}
    width, cols = max(len(f"{t} {m}") for t, m in scores) + 2, [max(12, len(c) + 2) for c in columns]
    print("\n" + " " * width + "".join(f"{c:>{w}}" for c, w in zip(columns, cols)))
    for (task, metric), row in scores.items():
        print(f"{task} {metric}".ljust(width) + "".join(f"{row[c]:>{w}.4f}" for c, w in zip(columns, cols)))
    print(f"\nresults: {os.path.join(args.output, 'results')}")


if __name__ == "__main__":
    main(args)
