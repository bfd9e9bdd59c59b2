"""data.py: chat formats and truncation, reading pair files, single-dataset resumable batches and
the Stage I task schedule."""

import gzip
import json
import math
import os

import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tok_models

import data
from data import INSTRUCTIONS, Batches, DataError, Pair, TextFormat, load_pairs, stage1_task
from model import load_tokenizer

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

INSTR = "Given a sentence, retrieve its definition"
TEXT = "the team is a unit"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>", "<|endoftext|>", "</s>"]


def byte_bpe(special_tokens, begin=None):
    """A tiny byte-level BPE tokenizer with the given special tokens; `begin`, if given, is
    prepended by a TemplateProcessing post-processor (as Llama-3 does with <|begin_of_text|>)."""
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, INSTR, "user query instruct"], trainer)
    if begin is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{begin} $A", special_tokens=[(begin, tok.token_to_id(begin))])
    return tok


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def special_ids(tok):
    return {tok.token_to_id(t) for t in CHAT_TOKENS} - {None}


# -----------------------------------------------------------------------------
# TextFormat


def test_chatml_format(tiny_model_dir):
    """A ChatML vocabulary gives one user turn closed by <|im_end|>; only queries are instructed."""
    tok, eos_ids = load_tokenizer(tiny_model_dir)
    fmt = TextFormat(tok, eos_ids)
    q, d = fmt.embed_ids(TEXT, INSTR), fmt.embed_ids(TEXT)
    assert decode(tok, q) == f"<|im_start|>user\nInstruct: {INSTR}\nQuery: {TEXT}<|im_end|>"
    assert decode(tok, d) == f"<|im_start|>user\n{TEXT}<|im_end|>"
    assert q[0] == d[0] == tok.token_to_id("<|im_start|>")
    assert q[-1] == d[-1] == fmt.eos_id == tok.token_to_id("<|im_end|>")


def test_instruction_and_text_are_tokenized_in_one_piece(tiny_model_dir):
    """A query is the template, then "Instruct: ...\nQuery: {text}" tokenized as one string (as
    sentence-transformers tokenizes a prompt and its text), then the EOS."""
    tok, eos_ids = load_tokenizer(tiny_model_dir)
    fmt = TextFormat(tok, eos_ids)
    q = fmt.embed_ids(TEXT, INSTR)
    assert q == fmt.head + fmt.ids(f"Instruct: {INSTR}\nQuery: {TEXT}") + [fmt.eos_id]
    assert q != fmt.head + fmt.ids(f"Instruct: {INSTR}\nQuery: ") + fmt.ids(TEXT) + [fmt.eos_id]


def test_llama3_header_format():
    """Llama-3 header tokens: <|begin_of_text|> from the post-processor, a user header, <|eot_id|>."""
    tok = byte_bpe(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   begin="<|begin_of_text|>")
    fmt = TextFormat(tok, [tok.token_to_id("<|eot_id|>")])
    head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    q, d = fmt.embed_ids(TEXT, INSTR), fmt.embed_ids(TEXT)
    assert decode(tok, q) == f"{head}Instruct: {INSTR}\nQuery: {TEXT}<|eot_id|>"
    assert decode(tok, d) == f"{head}{TEXT}<|eot_id|>"
    assert q[0] == d[0] == tok.token_to_id("<|begin_of_text|>")
    assert d.count(tok.token_to_id("<|begin_of_text|>")) == 1
    assert q[-1] == d[-1] == tok.token_to_id("<|eot_id|>")


def test_plain_tokenizer_ends_in_first_eos():
    """Without chat tokens a text is just its tokens followed by eos_ids[0]."""
    tok = byte_bpe(["</s>", "<|endoftext|>"])
    eos = [tok.token_to_id("<|endoftext|>"), tok.token_to_id("</s>")]
    fmt = TextFormat(tok, eos)
    d = fmt.embed_ids(TEXT)
    assert d == fmt.ids(TEXT) + [eos[0]]
    assert decode(tok, d) == TEXT + "<|endoftext|>"
    assert decode(tok, fmt.embed_ids(TEXT, INSTR)) == f"Instruct: {INSTR}\nQuery: {TEXT}<|endoftext|>"


@pytest.mark.parametrize("kind", ["chatml", "llama3", "plain"])
def test_targets_are_content_only(kind, tiny_model_dir):
    """Reconstruction targets hold the text's own tokens: no template or special token."""
    if kind == "chatml":
        tok, eos = load_tokenizer(tiny_model_dir)
    elif kind == "llama3":
        tok = byte_bpe(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                       begin="<|begin_of_text|>")
        eos = [tok.token_to_id("<|eot_id|>")]
    else:
        tok = byte_bpe(["</s>"])
        eos = [tok.token_to_id("</s>")]
    fmt = TextFormat(tok, eos)
    y = fmt.target_ids(TEXT)
    assert decode(tok, y) == TEXT
    assert not set(y) & special_ids(tok)
    assert not set(y) & set(fmt.head)


def test_truncation_keeps_the_eos(tiny_model_dir):
    """A long text is cut to exactly max_length ids, keeps its head and EOS, and is counted."""
    tok, eos_ids = load_tokenizer(tiny_model_dir)
    fmt = TextFormat(tok, eos_ids, max_length=32)
    long = " ".join([TEXT] * 40)
    for instruction in (None, "Find it"):
        ids = fmt.embed_ids(long, instruction)
        assert len(ids) == 32 and ids[-1] == fmt.eos_id
        prefix = f"Instruct: {instruction}\nQuery: " if instruction else ""
        assert ids[:-1] == (fmt.head + fmt.ids(prefix + long))[:31]  # the end of the text goes, nothing else
    assert fmt.truncated == 2
    assert len(fmt.embed_ids(TEXT)) < 32 and fmt.truncated == 2  # short texts are not counted
    y = fmt.target_ids(long)
    assert len(y) == 31 and y == fmt.ids(long)[:31]  # the anchor takes the 32nd position
    assert fmt.truncated == 3
    assert fmt.target_ids(TEXT) == fmt.ids(TEXT) and fmt.truncated == 3


def test_max_length_below_the_template_is_refused(tiny_model_dir):
    """An instruction that leaves no room for the text raises instead of overshooting max_length."""
    tok, eos_ids = load_tokenizer(tiny_model_dir)
    fmt = TextFormat(tok, eos_ids, max_length=32)
    assert len(fmt.head + fmt.ids(f"Instruct: {INSTR}\nQuery: ")) > 32
    with pytest.raises(ValueError, match="max_length=32 leaves no room"):
        fmt.embed_ids(TEXT, INSTR)


# -----------------------------------------------------------------------------
# load_pairs


def write(path, lines, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def row(i, **extra):
    return dict(query=f"query {i}", positive=f"positive {i}", negative=f"negative {i}", **extra)


def test_builtin_and_per_line_instructions(tmp_path):
    """File stems pick the built-in instruction; allnli alternates line by line; an "instruction"
    field overrides it and lets unknown datasets in; .jsonl.gz is read."""
    write(tmp_path / "nq.jsonl", [row(0), row(1, instruction="Own instruction")])
    write(tmp_path / "allnli.jsonl.gz", [row(i) for i in range(5)], gz=True)
    write(tmp_path / "my_data.jsonl", [row(0, instruction="Find the match")])
    data = load_pairs(str(tmp_path))
    assert sorted(data) == ["allnli", "my_data", "nq"]
    assert data["nq"][0] == Pair("query 0", "positive 0", "negative 0", INSTRUCTIONS["nq"])
    assert data["nq"][1].instruction == "Own instruction"
    a, b = INSTRUCTIONS["allnli"]
    assert [p.instruction for p in data["allnli"]] == [a, b, a, b, a]
    assert [p.query for p in data["allnli"]] == [f"query {i}" for i in range(5)]
    assert data["my_data"][0].instruction == "Find the match"


def test_negative_is_optional_per_file(tmp_path):
    """A file without negatives (plain sentence pairs) loads with negative None; a file whose
    lines disagree is refused at the first line that differs, naming both lines."""
    write(tmp_path / "nq.jsonl", [dict(query="q", positive="p")] * 2)
    assert [p.negative for p in load_pairs(str(tmp_path))["nq"]] == [None, None]
    write(tmp_path / "nq.jsonl", [row(0), row(1), dict(query="q", positive="p")])
    with pytest.raises(DataError, match=r"nq\.jsonl:3: has no \"negative\" but line 1 has one"):
        load_pairs(str(tmp_path))
    write(tmp_path / "nq.jsonl", [dict(query="q", positive="p"), row(1)])
    with pytest.raises(DataError, match=r"nq\.jsonl:2: has \"negative\" but line 1 has none"):
        load_pairs(str(tmp_path))


def test_a_single_file_is_a_dataset(tmp_path):
    """--data may name one .jsonl / .jsonl.gz file: its stem is the dataset's name."""
    write(tmp_path / "nq.jsonl", [row(0), row(1)])
    write(tmp_path / "fever.jsonl.gz", [row(2)], gz=True)
    assert list(load_pairs(str(tmp_path / "nq.jsonl"))) == ["nq"]
    assert load_pairs(str(tmp_path / "fever.jsonl.gz"))["fever"][0].query == "query 2"
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match=r"notes\.txt: not a \.jsonl or \.jsonl\.gz file"):
        load_pairs(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize("name, lines, message", [
    ("unknown.jsonl", [row(0, instruction="ok"), row(1)],
     r"unknown\.jsonl:2: no instruction for dataset 'unknown'"),
    ("nq.jsonl", [row(0), "{not json", row(2)], r"nq\.jsonl:2: not valid JSON"),
    ("nq.jsonl", [row(0), row(1), dict(query="q", negative="n")], r"nq\.jsonl:3: missing field 'positive'"),
    ("nq.jsonl", [dict(query=" \t ", positive="p")], r"nq\.jsonl:1: field 'query' is empty"),
    ("nq.jsonl", [dict(query="q", positive="p", negative="\n")], r"nq\.jsonl:1: field 'negative' is empty"),
    ("nq.jsonl", [row(0), "[1, 2]"], r"nq\.jsonl:2: expected a JSON object"),
])
def test_bad_lines_are_named(tmp_path, name, lines, message):
    """Each kind of bad line raises DataError with file:line and what is wrong."""
    write(tmp_path / name, lines)
    with pytest.raises(DataError, match=message):
        load_pairs(str(tmp_path))


def test_bad_gzip_line_is_named(tmp_path):
    """Line numbers are reported inside .jsonl.gz files too."""
    write(tmp_path / "fever.jsonl.gz", [row(0), row(1), "oops"], gz=True)
    with pytest.raises(DataError, match=r"fever\.jsonl\.gz:3: not valid JSON"):
        load_pairs(str(tmp_path))


def test_non_utf8_file_is_named(tmp_path):
    """A file that is not UTF-8 text raises DataError naming it."""
    (tmp_path / "nq.jsonl").write_bytes(json.dumps(row(0)).encode() + b'\n{"query": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"nq\.jsonl: not UTF-8"):
        load_pairs(str(tmp_path))


def test_empty_or_missing_folder(tmp_path):
    """No data files, an empty file or no folder at all: DataError, not an empty dataset."""
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match="no .jsonl or .jsonl.gz files"):
        load_pairs(str(tmp_path))
    with pytest.raises(DataError, match="no such data file or folder"):
        load_pairs(str(tmp_path / "absent"))
    (tmp_path / "nq.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"nq\.jsonl: file holds no pairs"):
        load_pairs(str(tmp_path))


# -----------------------------------------------------------------------------
# Batches


def two_datasets():
    """alpha: 20 pairs (5 batches of 4), beta: 13 pairs (3 full batches, one pair left over)."""
    return {name: [Pair(f"{name} q{i}", f"{name} p{i}", None, "x") for i in range(n)]
            for name, n in (("alpha", 20), ("beta", 13))}


def take(batches, n):
    return [(name, tuple(p.query for p in pairs)) for name, pairs in (next(batches) for _ in range(n))]


def test_batches_are_single_dataset_and_cover_each_epoch():
    """Every batch is one dataset's; an epoch holds each full batch once and no pair twice."""
    stream = Batches(two_datasets(), batch_size=4, seed=0)
    for epoch in range(3):
        got = take(stream, 8)
        for name, queries in got:
            assert len(queries) == 4 and all(q.startswith(name + " ") for q in queries)
        queries = [q for _, qs in got for q in qs]
        assert len(set(queries)) == len(queries) == 32
        assert {q for q in queries if q.startswith("alpha")} == {f"alpha q{i}" for i in range(20)}
        assert sum(name == "beta" for name, _ in got) == 3
        assert stream.state_dict() == {"epoch": epoch, "index": 8}


def test_batches_follow_the_seed():
    """Same seed, same stream; another seed or the next epoch, another order."""
    a = take(Batches(two_datasets(), 4, seed=0), 16)
    assert a == take(Batches(two_datasets(), 4, seed=0), 16)
    assert a != take(Batches(two_datasets(), 4, seed=1), 16)
    assert a[:8] != a[8:]  # each epoch is reshuffled


def test_equal_mix_visits_datasets_equally():
    """mix="equal": beta (3 batches per pass) comes as often as alpha (5), passing over its pairs
    again, freshly shuffled; every pass is a whole pass, no pair twice within one."""
    stream = Batches(two_datasets(), batch_size=4, seed=0, mix="equal")
    got = take(stream, 10)
    assert stream.state_dict() == {"epoch": 0, "index": 10}
    assert [sum(n == name for n, _ in got) for name in ("alpha", "beta")] == [5, 5]
    beta = [qs for n, qs in got if n == "beta"]
    seen = [q for qs in beta for q in qs]
    assert all(q.startswith("beta ") for q in seen) and len(seen) == 20
    assert len(set(seen)) >= 12  # one whole pass (12 of the 13 pairs), then 8 of a second
    assert max(seen.count(q) for q in seen) <= 2
    assert take(stream, 10) != got  # the next epoch is reshuffled


@pytest.mark.parametrize("mix", ["size", "equal"])
@pytest.mark.parametrize("stop", [0, 3, 7, 8, 9, 15, 21])
def test_resume_gives_the_same_batches(stop, mix):
    """Restarting from state_dict() after `stop` batches continues the uninterrupted stream,
    across epoch boundaries too (8 batches per epoch by size, 10 by equal mix)."""
    whole = take(Batches(two_datasets(), 4, seed=5, mix=mix), stop + 12)
    first = Batches(two_datasets(), 4, seed=5, mix=mix)
    take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = Batches(two_datasets(), 4, seed=5, mix=mix)
    take(resumed, 2)  # a stream elsewhere in its life must still land on the same position
    resumed.load_state_dict(state)
    assert take(resumed, 12) == whole[stop:]


def test_dataset_smaller_than_a_batch():
    """A dataset that cannot fill one batch is refused by name."""
    data = two_datasets()
    with pytest.raises(DataError, match="beta"):
        Batches(data, batch_size=16)
    Batches(data, batch_size=13)  # exactly one batch is enough


# -----------------------------------------------------------------------------
# Stage I task schedule


def tasks(w_d2q, w_q2d, n=100):
    return [stage1_task(step, w_d2q, w_q2d) for step in range(n)]


def test_schedule_official_ratio():
    """The official code's 0.8 : 0.2 gives 80 EBD2Q and 20 EBQ2D batches per 100, as d2q d2q d2q
    d2q q2d."""
    t = tasks(0.8, 0.2)
    assert t.count("d2q") == 80 and t.count("q2d") == 20
    assert t[:5] == ["d2q", "d2q", "d2q", "d2q", "q2d"]
    assert t == t[:5] * 20


def test_schedule_other_ratios():
    """Equal weights alternate, a zero weight switches a task off, 0.7 : 0.3 gives 70 / 30."""
    assert tasks(0.5, 0.5) == ["d2q", "q2d"] * 50
    assert tasks(1, 0) == ["d2q"] * 100
    assert tasks(0, 1) == ["q2d"] * 100
    t = tasks(0.7, 0.3)
    assert t.count("d2q") == 70 and t.count("q2d") == 30
    assert all(t[i:i + 10].count("q2d") == 3 for i in range(0, 100, 10))  # spread evenly


def test_bm25_by_hand(tmp_path):
    """Three documents, two queries. "cat" is in d0 (3 words) and d2 (5 words): BM25 puts the
    shorter d0 first, so the relevant d2 is at rank 2 and scores 1 / log2(3) = 0.6309. "dogs"
    matches d1 only ("dog" in d2 is another token: no stemming): rank 1, 1.0. Mean 0.8155."""
    rows = lambda texts: "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items())
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt") as f:
        f.write(rows({"d0": "the cat sat", "d1": "dogs bark loudly", "d2": "a cat and a dog"}))
    with gzip.open(tmp_path / "queries.jsonl.gz", "wt") as f:
        f.write(rows({"q0": "Cat?", "q1": "dogs"}))
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td2\t1\nq1\td1\t1\n")
    assert data.bm25_ndcg10(str(tmp_path)) == pytest.approx((1 / math.log2(3) + 1) / 2)


def test_written_side_reads_the_bundled_texts_form():
    """data.written_side on the bundled training pairs: WordNet's "lemma: sentence" queries and
    glosses nearly all by their form (the check is what says which side a Stage I decoder wrote),
    the man pages' rougher (lower-case summary against a description naming its function)."""
    from data import written_side

    for name, at_least in (("wordnet", 0.999), ("manpages", 0.9)):
        pairs = load_pairs(os.path.join(HERE, name, "train"))[name]
        for side, texts in (("query", [p.query for p in pairs]), ("document", [p.positive for p in pairs])):
            right = sum(written_side(name, t) == side for t in texts) / len(texts)
            assert right >= at_least, (name, side, right)
    assert written_side("wordnet", "The original sentence is:") is None  # neither side's form
    assert written_side("elsewhere", "fold: fold it") is None
