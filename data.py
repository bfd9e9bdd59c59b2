"""
Training data: (query, positive, negative) pairs, how texts become token ids, and batching.

- Files: a folder of JSONL files (optionally .jsonl.gz), one per source dataset, or one such file,
  each line {"query": ..., "positive": ..., "negative": ...} as in the E5 data curated by the
  echo-embeddings authors (PAPER.md, "Data"). "negative" is optional: a file without negatives
  (plain sentence pairs) trains Stage II on in-batch negatives only. Queries get the
  E5-Mistral instruction of their dataset (built in below) or a per-line "instruction" field.
- Texts: an (instruction, text) pair becomes one user turn of the model's own chat format,
  "Instruct: {instruction}\\nQuery: {text}" for queries and "{text}" for documents, always ending
  in the model's end-of-turn / EOS token, whose final hidden state is the embedding. Long texts
  lose tokens from the end of the text, never the EOS.
- Batches: every batch comes from a single source dataset (in-batch negatives stay in-domain),
  shuffled from a seed; the position in the stream is a small dict that a checkpoint stores.
- Stage I task schedule: whole batches alternate between EBD2Q and EBQ2D in a fixed pattern whose
  ratio equals the task weights (the official code's 0.8 : 0.2 gives 4 EBD2Q batches, then 1 EBQ2D;
  train.py's default is 1 : 1).
"""

import gzip
import json
import os
import random
import re
from dataclasses import dataclass
from fractions import Fraction

import torch

# E5-Mistral style query instructions for the echo-embeddings training files (the file stem is
# the key). allnli and quora_duplicates alternate between two instructions, line by line.
INSTRUCTIONS = {
    "allnli": ["Given a premise, retrieve a hypothesis that is entailed by the premise",
               "Retrieve semantically similar text"],
    "dureader": "Given a Chinese search query, retrieve web passages that answer the question",
    "eli5_question_answer":
        "Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "hotpot_qa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "miracl": "Given a question, retrieve Wikipedia passages that answer the question",
    "mrtydi": "Given a question, retrieve Wikipedia passages that answer the question",
    "msmarco_passage": "Given a web search query, retrieve relevant passages that answer the query",
    "msmarco_document":
        "Given a web search query, retrieve relevant documents that answer the query",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question",
    "quora_duplicates": ["Given a question, retrieve questions that are semantically equivalent to "
                         "the given question",
                         "Find questions that have the same meaning as the input question"],
    "squad": "Retrieve Wikipedia passages that answer the question",
    "t2ranking": "Given a Chinese search query, retrieve web passages that answer the question",
    "trivia_qa": "Retrieve Wikipedia passages that answer the question",
    # the bundled default data: word + usage example -> gloss of its sense (wordnet/), a man page's
    # one-line summary -> the opening of its description (manpages/)
    # (short instructions: on these short queries the instruction's tokens are most of the cost)
    "wordnet": "Define the word as the sentence uses it",
    "manpages": "Retrieve the man page described by the summary",
}


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass
class Pair:
    query: str
    positive: str
    negative: str | None
    instruction: str


# eval task -> its folder and dataset name
BUNDLED_TASKS = {"WordNetSenseRetrieval": "wordnet", "ManPageRetrieval": "manpages"}


def task_instructions() -> dict[str, str]:
    """The query instruction of every evaluation task: E5-Mistral's for the MTEB(eng, v1) tasks
    (instructions.json) and the training instruction for the two bundled tasks."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "instructions.json")) as f:
        return json.load(f) | {task: INSTRUCTIONS[name] for task, name in BUNDLED_TASKS.items()}


def read_jsonl(path: str):
    """Yields (line_number, dict) from a .jsonl or .jsonl.gz file, naming the line on bad input."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                yield n, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def load_pairs(*sources: str) -> dict[str, list[Pair]]:
    """Reads each source, a .jsonl / .jsonl.gz file or a folder of them; returns {dataset name
    (the file's stem): pairs}. Within a file, either every line has a "negative" or none has
    (then Stage II contrasts against in-batch negatives only)."""
    data = {}
    for source in sources:
        for name, pairs in _load_source(source).items():
            if name in data:
                raise DataError(f"{source}: a second dataset named {name!r}: give each file its "
                                "own name")
            data[name] = pairs
    return data


def _load_source(source):
    if os.path.isfile(source):
        if not source.endswith((".jsonl", ".jsonl.gz")):
            raise DataError(f"{source}: not a .jsonl or .jsonl.gz file")
        folder, files = os.path.dirname(source), [os.path.basename(source)]
    elif os.path.isdir(source):
        folder = source
        files = sorted(f for f in os.listdir(folder) if f.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise DataError(f"{folder}: no .jsonl or .jsonl.gz files in this folder")
    else:
        raise DataError(f"{source}: no such data file or folder")
    data = {}
    for file in files:
        path, name = os.path.join(folder, file), file.split(".")[0]
        pairs, first_negative = [], None  # first_negative: whether line 1 had one, and its number
        for n, row in read_jsonl(path):
            for key in ("query", "positive", "negative", "instruction"):
                if row.get(key) is None:
                    if key in ("query", "positive"):
                        raise DataError(f"{path}:{n}: missing field {key!r} (each line needs "
                                        "query, positive; negative is optional)")
                elif not isinstance(row[key], str) or not row[key].strip():
                    raise DataError(f"{path}:{n}: field {key!r} is empty or not a string")
            has = row.get("negative") is not None
            if first_negative is None:
                first_negative = (has, n)
            elif has != first_negative[0]:
                raise DataError(f"{path}:{n}: {'has' if has else 'has no'} \"negative\" but line "
                                f"{first_negative[1]} {'has none' if has else 'has one'}: give "
                                "every line of a file a negative or none")
            instruction = row.get("instruction") or INSTRUCTIONS.get(name)
            if instruction is None:
                raise DataError(f"{path}:{n}: no instruction for dataset {name!r}: add an "
                                f"\"instruction\" field or use one of {sorted(INSTRUCTIONS)}")
            if isinstance(instruction, list):
                instruction = instruction[len(pairs) % len(instruction)]
            pairs.append(Pair(row["query"], row["positive"], row.get("negative"), instruction))
        if not pairs:
            raise DataError(f"{path}: file holds no pairs")
        data[name] = pairs
    return data


# -----------------------------------------------------------------------------
# Texts to token ids


class TextFormat:
    """Turns (instruction, text) pairs into token ids the same way everywhere.

    Embedding input:
      [begin-of-text] [user-turn opening] ["Instruct: {instruction}\\nQuery: "] text EOS
    Reconstruction target: the text's own tokens only (Stage I predicts content, not templates).
    The chat format is recognised from the vocabulary: ChatML (Qwen, SmolLM2) or Llama-3 headers;
    any other tokenizer gets the plain text followed by its EOS."""

    def __init__(self, tokenizer, eos_ids: list[int], max_length: int = 512):
        self.tok, self.max_length = tokenizer, max_length
        has = lambda *ts: all(tokenizer.token_to_id(t) is not None for t in ts)
        if has("<|im_start|>", "<|im_end|>"):
            self.turn, self.eos_id = "<|im_start|>{role}\n", tokenizer.token_to_id("<|im_end|>")
        elif has("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
            self.turn = "<|start_header_id|>{role}<|end_header_id|>\n\n"
            self.eos_id = tokenizer.token_to_id("<|eot_id|>")
        else:
            self.turn, self.eos_id = "", eos_ids[0]
        opening = self.turn.format(role="user")
        # what the tokenizer's own post-processor puts around a text: nothing, Llama-3's
        # <|begin_of_text|>, or the whole template where save_sentence_transformers wrote it
        probe, full = self.ids("x"), tokenizer.encode("x", add_special_tokens=True).ids
        at = next(i for i in range(len(full)) if full[i:i + len(probe)] == probe)
        before, after = full[:at], full[at + len(probe):]
        opening_ids = self.ids(opening)
        ends_in_opening = before[len(before) - len(opening_ids):] == opening_ids
        templated = after == [self.eos_id] and ends_in_opening
        self.head = before if templated else before + opening_ids
        self.pad_id = self.eos_id  # pads are masked out; any valid id does
        self.truncated = 0  # texts shortened to fit max_length, reported by the caller
        self._prefix_len = {}  # instruction prefix -> its token count

    def turn_ids(self, role: str) -> list[int]:
        """The opening of a chat turn of `role` ("user", "assistant"): [] without a chat format."""
        return self.ids(self.turn.format(role=role))

    def ids(self, text: str) -> list[int]:  # the text's own tokens, nothing added
        return self.tok.encode(text, add_special_tokens=False).ids

    def _fit(self, ids: list[int], room: int) -> list[int]:
        if len(ids) > room:
            self.truncated += 1
            return ids[:room]
        return ids

    def embed_ids(self, text: str, instruction: str | None = None) -> list[int]:
        # instruction and text are one string, tokenized in one piece, as sentence-transformers
        # tokenizes a prompt and its text (tokenized apart, "Query: " would end in a lone space)
        prefix = f"Instruct: {instruction}\nQuery: " if instruction else ""
        if prefix not in self._prefix_len:
            self._prefix_len[prefix] = len(self.ids(prefix))
        template = len(self.head) + self._prefix_len[prefix]
        if template + 2 > self.max_length:  # else the cut would eat the instruction
            raise ValueError(f"max_length={self.max_length} leaves no room for text after the "
                             f"{template}-token template and instruction {instruction!r}")
        room = self.max_length - len(self.head) - 1
        return self.head + self._fit(self.ids(prefix + text), room) + [self.eos_id]

    def target_ids(self, text: str) -> list[int]:
        return self._fit(self.ids(text), self.max_length - 1)  # the anchor takes one position


def pad(seqs: list[list[int]], pad_id: int):
    """Right-pads to the longest sequence: ids (B, T) long, mask (B, T) bool."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask


def read_split(folder: str):
    """A held-out split as the bundled datasets store it (queries.jsonl.gz, corpus.jsonl.gz,
    qrels.tsv): (queries {id: text}, corpus {id: text}, qrels {query id: {doc id: score}})."""
    queries, corpus = ({r["id"]: r["text"] for _, r in read_jsonl(os.path.join(folder, f))}
                       for f in ("queries.jsonl.gz", "corpus.jsonl.gz"))
    qrels = {}
    with open(os.path.join(folder, "qrels.tsv")) as f:
        rows = (line.split("\t") for line in list(f)[1:])  # header: query-id corpus-id score
        for q, d, score in rows:
            qrels.setdefault(q, {})[d] = int(score)
    return queries, corpus, qrels


def split_pairs(folder: str, instruction: str | None, n: int | None = None) -> list[Pair]:
    """The first n (query, relevant document) pairs of a held-out split, for reconstruction
    samples and diagnostics."""
    queries, corpus, qrels = read_split(folder)
    return [Pair(queries[q], corpus[d], None, instruction)
            for q, relevant in list(qrels.items())[:n] for d in relevant][:n]


def bm25_ndcg10(folder: str, k1: float = 1.5, b: float = 0.75) -> float:
    """nDCG@10 of BM25 (lowercased word tokens, no stemming) on a bundled split: the lexical bar."""
    import numpy as np

    queries, corpus, qrels = read_split(folder)
    words = lambda text: re.findall(r"\w+", text.lower())
    ids, docs = list(corpus), [words(corpus[d]) for d in corpus]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    tf = np.zeros((len(docs), len(vocab)))
    for i, d in enumerate(docs):
        for w in d:
            tf[i, vocab[w]] += 1
    df = (tf > 0).sum(0)
    idf = np.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
    length = tf.sum(1, keepdims=True)
    weight = idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / length.mean()))  # (docs, vocab)
    total = 0.0
    for q, rel in qrels.items():
        terms = [vocab[w] for w in words(queries[q]) if w in vocab]
        ranking = np.argsort(-weight[:, terms].sum(1), kind="stable")[:10]
        gains = [rel.get(ids[i], 0) for i in ranking]
        ideal = sorted(rel.values(), reverse=True)[:10]
        dcg = lambda g: sum(x / np.log2(r + 2) for r, x in enumerate(g))
        total += dcg(gains) / dcg(ideal)
    return total / len(qrels)


def heldout_sets(sources: list[str], n: int) -> dict[str, list[Pair]]:
    """Up to n pairs of the validation split beside each training folder that has one (the bundled
    datasets: <name>/train beside <name>/validation), by dataset name."""
    sets = {}
    for source in sources:
        source = os.path.normpath(source)
        held_out = os.path.join(os.path.dirname(source), "validation")
        has_split = os.path.isfile(os.path.join(held_out, "qrels.tsv"))
        if os.path.basename(source) == "train" and has_split:
            instruction = next(iter(load_pairs(source).values()))[0].instruction
            sets[os.path.basename(os.path.dirname(source))] = split_pairs(held_out, instruction, n)
    return sets


# Which side of a bundled dataset a text's form says it is, for checking which side a Stage I
# decoder writes ("query", "document" or None: neither). WordNet: a query is "lemma: example
# sentence", a gloss starts in lower case or with "(" (right on 99.99% of the training queries and
# 99.96% of the glosses). Man pages: a description names its function ("pread() reads") or starts
# a sentence with a capital, a query is a lower-case summary (right on 97.7% of the training
# descriptions and 92.3% of the queries: a rougher check).
def _wordnet_side(t):
    if re.match(r"[\w'. -]{1,40}: \S", t):
        return "query"
    return "document" if t[:1].islower() or t[:1] == "(" else None


def _manpages_side(t):
    if re.search(r"\w\(\)", t[:50]) or t[:1].isupper():
        return "document"
    return "query" if t[:1].islower() else None


SIDE_FORMS = {"wordnet": _wordnet_side, "manpages": _manpages_side}


def written_side(dataset: str, text: str) -> str | None:
    """"query", "document" or None: which side of `dataset` the text's form says it is
    (SIDE_FORMS); None also for a dataset without a form check."""
    return SIDE_FORMS[dataset](text.strip()) if dataset in SIDE_FORMS else None


def sample_sets(sources: list[str], data: dict, n: int) -> tuple[str, dict[str, list[Pair]]]:
    """The pairs Stage I shows its progress on: n held-out pairs of each dataset that has a
    validation split (heldout_sets), else the first n training pairs of each dataset."""
    sets = heldout_sets(sources, n)
    if sets:
        return "held-out pairs", sets
    return "training pairs", {name: pairs[:n] for name, pairs in data.items()}


# -----------------------------------------------------------------------------
# Batches and the Stage I task schedule


class Batches:
    """An endless, resumable stream of batches, each drawn from one source dataset.

    Each epoch shuffles every dataset's pairs, cuts them into full batches, and shuffles the batches
    of all datasets together. mix="size" visits datasets in proportion to their size (the official
    code's E5 loader); mix="equal" visits each as often as the largest, a smaller dataset passing
    over its pairs again, freshly shuffled, as many times as it takes."""

    def __init__(self, data: dict[str, list[Pair]], batch_size: int, seed: int = 0,
                 mix: str = "size"):
        small = {k: len(v) for k, v in data.items() if len(v) < batch_size}
        if small:
            raise DataError(f"datasets smaller than one batch of {batch_size}: {small}; "
                            "lower --batch-size or add data")
        if mix not in ("size", "equal"):
            raise ValueError(f"mix must be 'size' or 'equal', got {mix!r}")
        self.data, self.batch_size, self.seed, self.mix = data, batch_size, seed, mix
        self.epoch, self.index = 0, 0
        self.plan = self._plan()

    def _plan(self):
        rng = random.Random(self.seed * 100003 + self.epoch)
        bs = self.batch_size
        most = max(len(pairs) // bs for pairs in self.data.values())
        plan = []
        for name in sorted(self.data):
            size = len(self.data[name])
            want = most if self.mix == "equal" else size // bs
            rows = []
            while len(rows) < want:  # whole passes over the dataset, each freshly shuffled
                order = list(range(size))
                rng.shuffle(order)
                rows += [order[i:i + bs] for i in range(0, size - bs + 1, bs)]
            plan += [(name, r) for r in rows[:want]]
        rng.shuffle(plan)
        return plan

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, list[Pair]]:
        if self.index == len(self.plan):
            self.epoch, self.index = self.epoch + 1, 0
            self.plan = self._plan()
        name, rows = self.plan[self.index]
        self.index += 1
        return name, [self.data[name][i] for i in rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict):
        self.epoch, self.index = state["epoch"], state["index"]
        self.plan = self._plan()


def stage1_task(step: int, w_d2q: float, w_q2d: float) -> str:
    """The task of Stage I batch `step` under interleaving: "d2q" (EBD2Q) or "q2d" (EBQ2D).

    A pure function of the step, spread evenly: with p = w_q2d / (w_d2q + w_q2d) as a fraction,
    batch `step` is EBQ2D exactly when floor((step + 1) p) > floor(step p). For 0.8 : 0.2, p = 1/5
    and the pattern is d2q d2q d2q d2q q2d, repeated."""
    p = Fraction(w_q2d / (w_d2q + w_q2d)).limit_denominator(100)
    return "q2d" if (step + 1) * p // 1 > step * p // 1 else "d2q"


# -----------------------------------------------------------------------------
# The text format as sentence-transformers reads it


def st_prompts(instructions: dict[str, str]) -> dict[str, str]:
    """sentence-transformers prompts under the keys mteb looks up, giving eval.py's convention: a
    task's documents get nothing ("{task}-document"), its queries and the texts of tasks without
    queries and documents get "Instruct: {instruction}\nQuery: " ("{task}-query", "{task}")."""
    prompts = {}
    for task, instruction in instructions.items():
        prompts |= {f"{task}-query": f"Instruct: {instruction}\nQuery: ", f"{task}-document": "",
                    task: f"Instruct: {instruction}\nQuery: "}
    return prompts


def save_sentence_transformers(path: str, fmt: TextFormat, dim: int, max_length: int = 512):
    """Makes the model folder `path` load as sentence_transformers.SentenceTransformer(path) and
    embed as Embedder does: its tokenizer.json gets a post-processor that wraps every text in the
    user-turn template and the EOS (so the instruction and the text are one string, tokenized in
    one piece, as in TextFormat); then last-token pooling and normalisation; prompts as
    st_prompts."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer.from_str(fmt.tok.to_str())  # a copy: fmt's tokenizer stays as it is
    eos = tok.id_to_token(fmt.eos_id)
    head = [dict(id="[TEMPLATE]", ids=fmt.head, tokens=[tok.id_to_token(i) for i in fmt.head])]
    head = head if fmt.head else []
    single = ("[TEMPLATE] " if head else "") + f"$A {eos}"
    tok.post_processor = TemplateProcessing(single=single, pair=f"{single} $B:1 {eos}:1",
                                            special_tokens=head + [(eos, fmt.eos_id)])
    tok.save(os.path.join(path, "tokenizer.json"))
    config_path = os.path.join(path, "tokenizer_config.json")
    config = json.load(open(config_path)) if os.path.isfile(config_path) else {}
    # PreTrainedTokenizerFast: the class that takes tokenizer.json as it is
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_length,
                  eos_token=eos, pad_token=eos, padding_side="right")
    files = {
        "tokenizer_config.json": config,
        "modules.json": [
            dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
            dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling"),
            dict(idx=2, name="2", path="2_Normalize",
                 type="sentence_transformers.models.Normalize")],
        "sentence_bert_config.json": dict(max_seq_length=max_length, do_lower_case=False),
        "1_Pooling/config.json": dict(word_embedding_dimension=dim, pooling_mode_cls_token=False,
                                      pooling_mode_mean_tokens=False, pooling_mode_max_tokens=False,
                                      pooling_mode_mean_sqrt_len_tokens=False,
                                      pooling_mode_weightedmean_tokens=False,
                                      pooling_mode_lasttoken=True, include_prompt=True),
        "config_sentence_transformers.json": dict(
            prompts=st_prompts(task_instructions()),
            default_prompt_name=None, similarity_fn_name="cosine"),
    }
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f, indent=2)


if __name__ == "__main__":
    import argparse
    import shutil

    from model import load_tokenizer
    from smollm2 import default_model_dir

    parser = argparse.ArgumentParser(
        description="Copy a model folder (default: the embedded SmolLM2-135M-Instruct) into OUT "
        "as a folder sentence-transformers loads; train.py's checkpoints are such folders already.")
    parser.add_argument("out")
    parser.add_argument("--model", default=None, help="HF checkpoint folder (Llama / Qwen)")
    args = parser.parse_args()
    args.model = args.model or default_model_dir()
    model_files = [f for f in os.listdir(args.model) if f.endswith((".safetensors", ".json"))]
    os.makedirs(args.out, exist_ok=True)
    for f in model_files:
        shutil.copy(os.path.join(args.model, f), args.out)
    tokenizer, eos_ids = load_tokenizer(args.out)
    with open(os.path.join(args.out, "config.json")) as f:
        dim = json.load(f)["hidden_size"]
    save_sentence_transformers(args.out, TextFormat(tokenizer, eos_ids), dim)
    print(f"{args.out}: SentenceTransformer({args.out!r}) loads it")

