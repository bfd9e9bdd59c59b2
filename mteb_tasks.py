"""
What eval.py hands to MTEB (paper: Evaluation): the two bundled held-out datasets as MTEB retrieval
tasks, and a checkpoint folder as an encoder that follows MTEB's protocol. Everything that imports
mteb is here, so eval.py can decide whether the hub is reachable before mteb and the Hugging Face
libraries read HF_HUB_OFFLINE (they read it once, when imported).

- WordNetSenseRetrieval (wordnet/: a word and a usage example -> the gloss of its sense) and
  ManPageRetrieval (manpages/: a man page's one-line summary -> the opening of its description):
  the test split to report, the validation split to choose settings; each split's files are
  hashed into the task's revision.
- Encoder: the final hidden state at the EOS token (bireco.Embedder), compared by cosine. One
  instruction per task, "Instruct: {instruction}\\nQuery: {text}", on queries and on every text of
  other task types, never on retrieval documents (the paper's convention, from E5-Mistral).
Left out: mteb's own model loaders (a checkpoint is read by model.load_model only).
"""

import difflib
import hashlib
import json
import os
import time

import mteb
import torch
from datasets import Dataset
from mteb.abstasks import AbsTaskRetrieval
from mteb.abstasks.aggregated_task import AbsTaskAggregate
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.cache import ResultCache
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType

import data
from bireco import Embedder

ROOT = os.path.dirname(os.path.abspath(__file__))
INSTRUCTIONS = data.task_instructions()  # task name -> query instruction


def digest(paths: list[str]) -> str:
    """Short content hash of files: a result's revision changes exactly when the weights do."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:12]


# -----------------------------------------------------------------------------
# The bundled tasks


class BundledRetrieval(AbsTaskRetrieval):
    """A held-out split of a bundled dataset as an mteb retrieval task: <folder>/<split>/."""
    folder = None

    def __init__(self, split: str = "test", **kwargs):
        self.split, self.path = split, os.path.join(ROOT, self.folder, split)
        files = [os.path.join(self.path, f) for f in ("queries.jsonl.gz", "corpus.jsonl.gz",
                                                      "qrels.tsv")]
        self.metadata = self.metadata.model_copy(update=dict(
            eval_splits=[split],
            dataset={"path": f"{self.folder}/{split}", "revision": digest(files)}))
        super().__init__(**kwargs)

    def load_data(self, num_proc=None, **kwargs):
        queries, corpus, qrels = data.read_split(self.path)
        def as_rows(texts):  # {id: text} -> mteb's rows
            return Dataset.from_list([{"id": k, "text": v} for k, v in texts.items()])
        self.dataset = {"default": {self.split: RetrievalSplitData(
            queries=as_rows(queries), corpus=as_rows(corpus), relevant_docs=qrels,
            top_ranked=None)}}
        self.data_loaded = True


def bundled_metadata(name, description, reference, license, date):
    return TaskMetadata(
        name=name, type="Retrieval", category="t2t", modalities=["text"], main_score="ndcg_at_10",
        description=description, dataset={"path": "", "revision": ""}, reference=reference,
        eval_splits=["test"], eval_langs=["eng-Latn"], date=date, domains=["Written"],
        task_subtypes=[], license=license, annotations_creators="expert-annotated", dialect=[],
        sample_creation="found", bibtex_citation="")


class WordNetSenseRetrieval(BundledRetrieval):
    """wordnet/README.md: word + usage example -> the gloss of its sense."""
    folder = "wordnet"
    metadata = bundled_metadata(
        "WordNetSenseRetrieval", "Given a word and a usage example from WordNet 3.0, retrieve the "
        "gloss of the sense it illustrates among the glosses of other senses of its lemmas "
        "(synsets held out from training).", "https://wordnet.princeton.edu/",
        "https://wordnet.princeton.edu/license-and-commercial-use", ("2006-01-01", "2006-12-31"))


class ManPageRetrieval(BundledRetrieval):
    """manpages/README.md: a man page's one-line summary -> the opening of its description."""
    folder = "manpages"
    metadata = bundled_metadata(
        "ManPageRetrieval", "Given the one-line summary of a Linux man page (sections 2-7), "
        "retrieve the opening of its DESCRIPTION among all pages' (pages held out from training).",
        "https://www.kernel.org/doc/man-pages/",
        "https://spdx.org/licenses/Linux-man-pages-copyleft.html", ("2023-01-01", "2023-04-30"))


TASKS = {cls.metadata.name: cls for cls in (WordNetSenseRetrieval, ManPageRetrieval)}


def get_tasks(names: list[str], benchmark: str | None, split: str) -> list:
    """The tasks to score: a benchmark's, or the named ones (the bundled ones on `split`).
    ValueError for an unknown name, with the closest known names."""
    if benchmark:
        try:
            return list(mteb.get_benchmark(benchmark).tasks)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
    known = {t.metadata.name for t in mteb.get_tasks()} | set(TASKS)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown task {name!r}{hint}")
    return [TASKS[n](split) if n in TASKS else mteb.get_task(n) for n in names]


def evaluate(encoder, task, output: str, batch_size: int):
    """mteb's score of one task (its result also written under output/results/), loading the
    task's data first, so a failed download costs no encoding."""
    if not isinstance(task, AbsTaskAggregate):  # an aggregate loads its subtasks' data itself
        task.load_data()
    result = mteb.evaluate(encoder, task, cache=ResultCache(output), overwrite_strategy="always",
                           co2_tracker=False, encode_kwargs={"batch_size": batch_size})
    if task.data_loaded:  # mteb leaves data it did not load itself
        task.unload_data()
    return result.task_results[0]


# -----------------------------------------------------------------------------
# A checkpoint as an mteb encoder


class Encoder(AbsEncoder):
    """mteb's encoder protocol for one checkpoint folder."""

    def __init__(self, path: str, device: str, dtype: torch.dtype, max_length: int = 512,
                 batch_size: int = 32):
        self.embedder = Embedder.from_pretrained(path, device, dtype, max_length)
        self.batch_size, self.noted = batch_size, set()
        model = self.embedder.model
        cfg, n_params = model.config, sum(p.numel() for p in model.parameters())
        weights = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        meta = {}
        if os.path.isfile(os.path.join(path, "meta.json")):  # train.py's checkpoints: their data
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
        # mteb files results under the model's name and revision: here the folder and a hash of
        # its weights, so new weights never land in an old result folder
        self.mteb_model_meta = ModelMeta(
            loader=None, name="bireco/" + os.path.basename(os.path.realpath(path)),
            revision=digest([os.path.join(path, f) for f in ["config.json"] + weights]),
            release_date=time.strftime("%Y-%m-%d", time.gmtime(os.path.getmtime(
                os.path.join(path, weights[0])))),
            languages=None, n_parameters=n_params,
            n_embedding_parameters=cfg.vocab_size * cfg.hidden_size,
            memory_usage_mb=round(n_params * dtype.itemsize / 2**20, 1),
            max_tokens=cfg.max_position_embeddings, embed_dim=cfg.hidden_size, license=None,
            open_weights=True, public_training_code=None, public_training_data=None,
            framework=["PyTorch"], similarity_fn_name="cosine", use_instructions=True,
            training_datasets=set(meta.get("training_datasets", [])))

    def instruction_for(self, task_metadata: TaskMetadata, prompt_type=None) -> str | None:
        """instructions.json's for the task; else its mteb prompt, else the first line of its
        description (with a note, once per task)."""
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
