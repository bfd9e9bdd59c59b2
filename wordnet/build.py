"""
Build the bundled WordNet 3.0 dataset: word + usage example -> gloss, with a hard negative.

WordNet glosses look like `definition; "example one"; "example two"`. Each usage example becomes a
query that names the word it illustrates, `whole: how big is that part compared to the whole?`
(without the word, a sentence does not say which of its words to define). Its positive is the
definition of its own sense, its hard negative the definition of another sense of the same word.
Definitions are written without their lemmas, so matching words gets little: finding the right
one needs the meaning of the sentence. Synsets are split into train, validation and test; a
held-out synset contributes nothing to train.

Outputs (next to this file unless --out-dir says otherwise):
    train/wordnet.jsonl.gz   {"query", "positive", "negative"} per line, the training format
    test/queries.jsonl.gz    {"id", "text"}: one usage example per held-out synset
    test/corpus.jsonl.gz     {"id", "text"}: held-out glosses plus the other senses of their lemmas
    test/qrels.tsv           query-id, corpus-id, score: exactly one relevant document per query
    validation/...           the same three files for another 500 held-out synsets (for tuning)

The WordNet files come from the Debian package wordnet-base: `apt-get install wordnet-base` puts
them in /usr/share/wordnet; without installing, `apt-get download wordnet-base` then
`dpkg-deb -x wordnet-base_*.deb DIR` and pass --wordnet-dir DIR/usr/share/wordnet.
Everything is seeded, and gzip headers carry no timestamp, so a rebuild is byte-identical.
"""
import argparse
import collections
import gzip
import json
import os
import random
import re

TEST_QUERIES = 500  # held-out synsets, one query each (and as many again for validation)
MAX_DOCS = 1000     # test corpus size cap (kept small so a CPU evaluates it in minutes); distractors beyond it are dropped
MIN_WORDS = 3       # shorter examples ("a dead town") say too little to retrieve a sense

Synset = collections.namedtuple("Synset", "key lemmas definition examples")


def split_gloss(gloss):
    """'def; "ex one"; "ex two"- Author' -> ('def', ['ex one', 'ex two']), despite stray quotes."""
    definition, quote, rest = gloss.partition('"')
    examples = []
    # a new example starts where a semicolon touches a quote; semicolons inside an example stay
    for piece in re.split(r'"\s*;\s*"?|;\s*"', quote + rest):
        text = " ".join(piece.strip().lstrip('"').split('"')[0].split())  # drops "- Author" tails
        if text:
            examples.append(text)
    # "of a path e.g." / "reward as in": such a lead-in introduces the examples, drop it
    definition = re.sub(r"[\s;:,]*(\be\.g\.|\bas in)?[\s;:,]*$", "", " ".join(definition.split()))
    return definition, examples


def read_synsets(wordnet_dir):
    """Yield every synset of data.{noun,verb,adj,adv}, in file order."""
    for pos in ["noun", "verb", "adj", "adv"]:
        with open(os.path.join(wordnet_dir, f"data.{pos}"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                head, gloss = line.split(" | ", 1)
                fields = head.split()  # offset lex_filenum ss_type w_cnt word lex_id ... pointers
                words = fields[4:4 + 2 * int(fields[3], 16):2]
                # "galore(ip)" -> "galore": adjective position markers are not part of the word
                lemmas = [re.sub(r"\((a|p|ip)\)$", "", w).replace("_", " ") for w in words]
                definition, examples = split_gloss(gloss.strip())
                yield Synset((pos, fields[0]), list(dict.fromkeys(lemmas)), definition, examples)


def mentions(example, lemma):
    """Does the example use the lemma, allowing a short inflection ("run" in "running")?"""
    return re.search(r"\b" + re.escape(lemma.lower()) + r"\w{0,4}\b", example.lower()) is not None


def write_jsonl(path, rows):
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
parser.add_argument("--wordnet-dir", default="/usr/share/wordnet",
                    help="WordNet dictionary folder, the one holding data.noun")
parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)),
                    help="where train/ and test/ are written (default: this file's folder)")
args = parser.parse_args()

synsets = {s.key: s for s in read_synsets(args.wordnet_dir)}
text = {k: s.definition for k, s in synsets.items()}
defined = collections.Counter(text.values())  # a few definitions are shared by several synsets
senses = collections.defaultdict(list)  # lowercased lemma -> keys of all its synsets, file order
for k, s in synsets.items():
    for lemma in s.lemmas:
        senses[lemma.lower()].append(k)
owners = collections.Counter(e for s in synsets.values() for e in set(s.examples))
rng = random.Random(0)


def other_senses(s, lemmas, exclude=()):
    return list(dict.fromkeys(k for l in lemmas for k in senses[l.lower()]
                              if k != s.key and k not in exclude and text[k] != text[s.key]))


def usable(e):
    return len(e.split()) >= MIN_WORDS


def marked(s, example):
    """The query: the word the example illustrates (one of its lemmas that the example uses, else
    the first), then the example. Returns (query, lemma)."""
    lemma = next((l for l in s.lemmas if mentions(example, l)), s.lemmas[0])
    return f"{lemma}: {example}", lemma


# held-out splits: synsets with another sense (so the corpus has distractors) and an example that
# belongs to this synset alone (so no other gloss in the corpus is equally right for it)
eligible = [s for s in synsets.values() if other_senses(s, s.lemmas) and defined[text[s.key]] == 1
            and any(usable(e) and owners[e] == 1 for e in s.examples)]
rng.shuffle(eligible)
held_out = {"test": eligible[:TEST_QUERIES], "validation": eligible[TEST_QUERIES:2 * TEST_QUERIES]}
held_keys = {s.key for split in held_out.values() for s in split}


def retrieval_split(chosen):
    """(queries, documents, relevant document of each query) for a list of held-out synsets."""
    queries = [marked(s, next(e for e in s.examples if usable(e) and owners[e] == 1))[0] for s in chosen]
    positives = [text[s.key] for s in chosen]
    assert len(set(positives)) == len(positives), "two held-out senses have the same gloss"
    # the corpus: the held-out glosses plus every other sense of their lemmas, capped at MAX_DOCS
    distractors = sorted({text[k] for s in chosen for k in other_senses(s, s.lemmas)} - set(positives))
    rng.shuffle(distractors)
    documents = positives + distractors[:max(0, MAX_DOCS - len(positives))]
    rng.shuffle(documents)  # ids say nothing about which documents are relevant
    return queries, documents, positives


splits = {name: retrieval_split(chosen) for name, chosen in held_out.items()}

# train: every other example; the negative never comes from a held-out synset
train, seen = [], set()
for s in synsets.values():
    if s.key in held_keys:
        continue
    for e in s.examples:
        if not usable(e) or (e, text[s.key]) in seen:
            continue
        query, lemma = marked(s, e)
        negatives = other_senses(s, [lemma], held_keys) or other_senses(s, s.lemmas, held_keys)
        if not negatives:
            continue
        seen.add((e, text[s.key]))
        train.append({"query": query, "positive": text[s.key], "negative": text[rng.choice(negatives)]})
for queries, _, positives in splits.values():
    assert not set(queries) & {r["query"] for r in train}
    assert not set(positives) & {r["positive"] for r in train}

os.makedirs(os.path.join(args.out_dir, "train"), exist_ok=True)
write_jsonl(os.path.join(args.out_dir, "train", "wordnet.jsonl.gz"), train)
for name, (queries, documents, positives) in splits.items():
    folder = os.path.join(args.out_dir, name)
    os.makedirs(folder, exist_ok=True)
    doc_id = {d: f"d{i}" for i, d in enumerate(documents)}
    write_jsonl(os.path.join(folder, "queries.jsonl.gz"), [{"id": f"q{i}", "text": q} for i, q in enumerate(queries)])
    write_jsonl(os.path.join(folder, "corpus.jsonl.gz"), [{"id": doc_id[d], "text": d} for d in documents])
    with open(os.path.join(folder, "qrels.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"q{i}\t{doc_id[p]}\t1\n" for i, p in enumerate(positives))

print(f"synsets read     {len(synsets):,}")
print(f"usage examples   {sum(len(s.examples) for s in synsets.values()):,}")
print(f"train pairs      {len(train):,}")
for name, (queries, documents, positives) in splits.items():
    print(f"{name:<16} {len(queries):,} queries, {len(documents):,} documents "
          f"({len(documents) - len(positives):,} distractors)")
