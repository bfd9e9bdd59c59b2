"""
Build the bundled WordNet 3.0 dataset: usage example -> gloss, with a hard negative.

WordNet glosses look like `definition; "example one"; "example two"`. Each usage example becomes a
query whose positive is the definition of its own sense, and whose hard negative is the definition
of another sense of one of the same lemmas (preferring a lemma the example mentions). Definitions
are written without their lemmas, so matching words gets little: finding the right one needs the
meaning of the sentence. Synsets are split into train
and test; a held-out synset contributes nothing to train.

Outputs (next to this file unless --out-dir says otherwise):
    train/wordnet.jsonl.gz   {"query", "positive", "negative"} per line, the training format
    test/queries.jsonl.gz    {"id", "text"}: one usage example per held-out synset
    test/corpus.jsonl.gz     {"id", "text"}: held-out glosses plus the other senses of their lemmas
    test/qrels.tsv           query-id, corpus-id, score: exactly one relevant document per query

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

TEST_QUERIES = 500  # held-out synsets, one query each
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


# test split: synsets with another sense (so the corpus has distractors) and an example that
# belongs to this synset alone (so no other gloss in the corpus is equally right for it)
eligible = [s for s in synsets.values() if other_senses(s, s.lemmas) and defined[text[s.key]] == 1
            and any(usable(e) and owners[e] == 1 for e in s.examples)]
rng.shuffle(eligible)
test = eligible[:TEST_QUERIES]
test_keys = {s.key for s in test}
queries = [next(e for e in s.examples if usable(e) and owners[e] == 1) for s in test]
positives = [text[s.key] for s in test]
assert len(set(positives)) == len(positives), "two held-out senses have the same gloss"

# train: every other example; the negative never comes from a held-out synset
train, seen = [], set()
for s in synsets.values():
    if s.key in test_keys:
        continue
    for e in s.examples:
        if not usable(e) or (e, text[s.key]) in seen:
            continue
        preferred = [l for l in s.lemmas if mentions(e, l)]
        negatives = other_senses(s, preferred, test_keys) or other_senses(s, s.lemmas, test_keys)
        if not negatives:
            continue
        seen.add((e, text[s.key]))
        train.append({"query": e, "positive": text[s.key], "negative": text[rng.choice(negatives)]})
assert not set(queries) & {r["query"] for r in train}
assert not set(positives) & {r["positive"] for r in train}

# test corpus: the held-out glosses plus every other sense of their lemmas, capped at MAX_DOCS
distractors = sorted({text[k] for s in test for k in other_senses(s, s.lemmas)} - set(positives))
rng.shuffle(distractors)
documents = positives + distractors[:max(0, MAX_DOCS - len(positives))]
rng.shuffle(documents)  # ids say nothing about which documents are relevant
doc_id = {d: f"d{i}" for i, d in enumerate(documents)}

os.makedirs(os.path.join(args.out_dir, "train"), exist_ok=True)
os.makedirs(os.path.join(args.out_dir, "test"), exist_ok=True)
write_jsonl(os.path.join(args.out_dir, "train", "wordnet.jsonl.gz"), train)
write_jsonl(os.path.join(args.out_dir, "test", "queries.jsonl.gz"),
            [{"id": f"q{i}", "text": q} for i, q in enumerate(queries)])
write_jsonl(os.path.join(args.out_dir, "test", "corpus.jsonl.gz"),
            [{"id": doc_id[d], "text": d} for d in documents])
with open(os.path.join(args.out_dir, "test", "qrels.tsv"), "w", encoding="utf-8") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    f.writelines(f"q{i}\t{doc_id[p]}\t1\n" for i, p in enumerate(positives))

print(f"synsets read     {len(synsets):,}")
print(f"usage examples   {sum(len(s.examples) for s in synsets.values()):,}")
print(f"train pairs      {len(train):,}")
print(f"test queries     {len(queries):,}")
print(f"test corpus      {len(documents):,} ({len(documents) - len(positives):,} distractors)")
