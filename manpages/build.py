"""
Build the bundled man-page dataset: a manual page's one-line summary -> its description.

Each page of the Linux man-pages project (sections 2-7: system calls, library functions, devices,
file formats, overviews) has a NAME line, `strcpy, strcat \\- copy or catenate a string`, and a
DESCRIPTION section. The summary after the dash is the query (it never names the function), the
opening of the DESCRIPTION, cut to MAX_WORDS words at a sentence end, is the document. The hard
negative is the description of a page the SEE ALSO section points to (a related interface), else of
a page of the same section. Pages are split into train, validation and test; a held-out page
contributes nothing to train. Only pages under the Linux-man-pages-copyleft licence are used, so
one notice covers the data (LICENSE, with every page's copyright line).

Outputs (next to this file unless --out-dir says otherwise):
    train/manpages.jsonl.gz  {"query", "positive", "negative"} per line, the training format
    test/queries.jsonl.gz    {"id", "text"}: the summary of each held-out page
    test/corpus.jsonl.gz     {"id", "text"}: the description of every page used (all splits)
    test/qrels.tsv           query-id, corpus-id, score: exactly one relevant document per query
    validation/...           the same three files for other held-out pages (for tuning)
    LICENSE                  the licence notice and the copyright lines of the pages used

The pages come from the Debian packages manpages and manpages-dev: `apt-get download manpages
manpages-dev`, `dpkg-deb -x` each into DIR, and pass --man-dir DIR/usr/share/man. Seeded, and
gzip headers carry no timestamp, so a rebuild is byte-identical.
"""
import argparse
import gzip
import json
import os
import random
import re

SECTIONS = ["2", "3", "4", "5", "7"]
LICENCE = "Linux-man-pages-copyleft"
HELD_OUT = {"test": 150, "validation": 100}  # pages per held-out split, one query each
MAX_WORDS = 80  # document length cap: the opening of a description says what the page is about

ESCAPES = [(r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\\(em|\\\(en", "-"), (r"\\\(aq", "'"), (r"\\\(dq|\\\(lq|\\\(rq", '"'),
           (r"\\\(.." , ""), (r"\\\[[^\]]*\]", ""), (r"\\[-]", "-"), (r"\\e", "\\\\"), (r"\\[ ~0]", " "),
           (r"\\[&|^c:]", ""), (r"\\\*(\(..|\[[^\]]*\]|.)", "")]


def plain(text):
    """Inline troff escapes -> plain text (fonts dropped, dashes and quotes kept)."""
    for pattern, repl in ESCAPES:
        text = re.sub(pattern, repl, text)
    return text


def macro_text(line):
    """`.BR open (2)` -> `open(2)`; `.B O_CREAT` -> `O_CREAT`: the text a font macro sets."""
    name, _, rest = line[1:].partition(" ")
    args = re.findall(r'"([^"]*)"|(\S+)', rest)
    args = [a or b for a, b in args]
    if name in ("B", "I", "SM", "SB"):
        return " ".join(args)
    if name in ("BR", "RB", "IR", "RI", "BI", "IB"):  # alternating fonts: no space between
        return "".join(args)
    return None  # any other request: layout only


def sections(source):
    """{section name: [lines]} of a page's troff source."""
    out, name = {}, None
    for line in source.splitlines():
        if line.startswith(".SH"):
            name = line[3:].strip().strip('"').upper()
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


def paragraphs(lines):
    """Troff lines -> paragraphs of plain text; example code (.EX/.nf blocks) is dropped."""
    paras, cur, code = [], [], False
    for line in lines:
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".EX", ".nf")):
            code = True
        elif line.startswith((".EE", ".fi")):
            code = False
        elif code:
            continue
        elif line.startswith((".PP", ".P ", ".LP", ".TP", ".IP", ".SS", ".sp")) or line in (".P",):
            if cur:
                paras.append(" ".join(cur))
            cur = []
            if line.startswith(".IP") and len(line) > 4:
                cur.append(macro_text(".B" + line[3:]) or "")
        elif line.startswith((".", "'")):
            text = macro_text(line)
            if text:
                cur.append(text)
        else:
            cur.append(line)
    if cur:
        paras.append(" ".join(cur))
    return [" ".join(plain(p).split()) for p in paras if plain(p).strip()]


def opening(paras):
    """The first paragraphs of a description, cut to MAX_WORDS words at the end of a sentence."""
    words = " ".join(paras).split()
    if len(words) <= MAX_WORDS:
        return " ".join(words)
    cut = " ".join(words[:MAX_WORDS])
    end = max(cut.rfind(". "), cut.rfind(".) "))
    return cut[:end + 1] if end > len(cut) // 3 else cut


def read_pages(man_dir):
    """Yields dict(name, section, summary, description, see_also, copyright) for each page."""
    for section in SECTIONS:
        folder = os.path.join(man_dir, f"man{section}")
        for file in sorted(os.listdir(folder)):
            path = os.path.join(folder, file)
            if os.path.islink(path) or not file.endswith(".gz"):
                continue  # links name other entry points of a page read under its own name
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                source = f.read()
            if source.startswith(".so") or f"SPDX-License-Identifier: {LICENCE}\n" not in source:
                continue
            secs = sections(source)
            name_line = " ".join(plain(" ".join(secs.get("NAME", []))).split())
            names, dash, summary = name_line.partition(" - ")
            description = opening(paragraphs(secs.get("DESCRIPTION", [])))
            if not dash or len(summary.split()) < 2 or len(description.split()) < 8:
                continue
            see_also = re.findall(r"^\.BR\s+(\S+)\s+\((\d)\w*\)", "\n".join(secs.get("SEE ALSO", [])), re.M)
            copyright = [" ".join(l[3:].split()) for l in source.splitlines() if l.startswith('.\\" Copyright')]
            yield dict(name=file[:-3], section=section, summary=summary, description=description,
                       see_also=[f"{n}.{s}" for n, s in see_also], copyright=copyright)


def write_jsonl(path, rows):
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
parser.add_argument("--man-dir", default="/usr/share/man", help="folder holding man2 .. man7")
parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)),
                    help="where train/, validation/, test/ and LICENSE are written (default: this file's folder)")
args = parser.parse_args()

pages = list(read_pages(args.man_dir))
# one page per summary and per description: a query with two right answers is not well posed
seen_summary, seen_description, unique = set(), set(), []
for p in pages:
    if p["summary"].lower() not in seen_summary and p["description"] not in seen_description:
        unique.append(p)
        seen_summary.add(p["summary"].lower())
        seen_description.add(p["description"])
pages = unique
by_name = {p["name"]: p for p in pages}
rng = random.Random(0)
order = list(range(len(pages)))
rng.shuffle(order)
held_out, at = {}, 0
for split, n in HELD_OUT.items():
    held_out[split] = [pages[i] for i in order[at:at + n]]
    at += n
train_pages = [pages[i] for i in sorted(order[at:])]
train_names = {p["name"] for p in train_pages}

train = []
for p in train_pages:
    related = [n for n in p["see_also"] if n in train_names and n != p["name"]]
    same_section = [q["name"] for q in train_pages if q["section"] == p["section"] and q["name"] != p["name"]]
    negative = by_name[rng.choice(related or same_section)]["description"]
    train.append({"query": p["summary"], "positive": p["description"], "negative": negative})

documents = [p["description"] for p in pages]
rng.shuffle(documents)  # ids say nothing about which documents are relevant or held out
doc_id = {d: f"d{i}" for i, d in enumerate(documents)}
os.makedirs(os.path.join(args.out_dir, "train"), exist_ok=True)
write_jsonl(os.path.join(args.out_dir, "train", "manpages.jsonl.gz"), train)
for split, chosen in held_out.items():
    folder = os.path.join(args.out_dir, split)
    os.makedirs(folder, exist_ok=True)
    write_jsonl(os.path.join(folder, "queries.jsonl.gz"), [{"id": f"q{i}", "text": p["summary"]}
                                                           for i, p in enumerate(chosen)])
    write_jsonl(os.path.join(folder, "corpus.jsonl.gz"), [{"id": doc_id[d], "text": d} for d in documents])
    with open(os.path.join(folder, "qrels.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"q{i}\t{doc_id[p['description']]}\t1\n" for i, p in enumerate(chosen))

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTICE")) as f:
    notice = f.read()
copyrights = sorted({c for p in pages for c in p["copyright"]})
with open(os.path.join(args.out_dir, "LICENSE"), "w", encoding="utf-8") as f:
    f.write(notice + "\nThe pages used, and the copyright lines they carry:\n\n")
    f.write(", ".join(sorted(p["name"] for p in pages)) + "\n\n" + "\n".join(copyrights) + "\n")

print(f"pages used       {len(pages):,} (sections {', '.join(SECTIONS)}, licence {LICENCE})")
print(f"train pairs      {len(train):,}")
for split, chosen in held_out.items():
    print(f"{split:<16} {len(chosen):,} queries, {len(documents):,} documents")
