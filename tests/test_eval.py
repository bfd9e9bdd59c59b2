"""eval.py: the offline WordNet task end to end through mteb, the instruction convention, the
comparison table, and the errors a user meets (unknown task, no network, not a checkpoint)."""

import glob
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_eval(*argv, env=None, timeout=300):
    # one thread: the tiny model is overhead-bound, and two threads crawl when the CPU is shared
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_model_run(tiny_model_dir, tmp_path_factory):
    """One CLI run on the bundled task with two checkpoints: the tiny model and a renamed copy."""
    tmp = tmp_path_factory.mktemp("eval")
    other = shutil.copytree(tiny_model_dir, tmp / "tiny-copy")
    proc = run_eval("--model", tiny_model_dir, "--model", str(other), "--output", str(tmp / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, tmp / "out"


def test_default_task_end_to_end_in_mteb_layout(two_model_run, tiny_model_dir):
    proc, out = two_model_run
    name = os.path.basename(tiny_model_dir)
    files = glob.glob(str(out / "results" / f"bireco__{name}" / "*" / "WordNetSenseRetrieval.json"))
    assert len(files) == 1
    revision_dir = os.path.dirname(files[0])
    assert os.path.isfile(os.path.join(revision_dir, "model_meta.json"))
    with open(files[0]) as f:
        result = json.load(f)
    (scores,) = result["scores"]["test"]
    assert 0.0 <= scores["ndcg_at_10"] <= 1.0 and scores["main_score"] == scores["ndcg_at_10"]
    # the printed table carries the same number the file holds
    row = next(line for line in proc.stdout.splitlines() if line.startswith("WordNetSenseRetrieval ndcg_at_10"))
    assert float(row.split()[2]) == pytest.approx(scores["ndcg_at_10"], abs=5e-5)
    with open(os.path.join(revision_dir, "model_meta.json")) as f:
        meta = json.load(f)
    assert meta["name"] == f"bireco/{name}" and meta["embed_dim"] == 64
    assert meta["revision"] == os.path.basename(revision_dir)


def test_mteb_reads_the_results_back(two_model_run, tiny_model_dir):
    """mteb's own result loading (ResultCache) finds both models' results with their model meta,
    and the score it reads is the one the table printed."""
    from mteb.cache import ResultCache

    proc, out = two_model_run
    cache = ResultCache(out)
    models = dict(cache.get_models(include_remote=False))  # {folder name ("/" as "__"): revision}
    name = f"bireco/{os.path.basename(tiny_model_dir)}"
    assert {name, "bireco/tiny-copy"} <= {m.replace("__", "/") for m in models}
    result = cache.load_task_result("WordNetSenseRetrieval", name, models[name.replace("/", "__")],
                                    raise_if_not_found=True)
    row = next(line for line in proc.stdout.splitlines() if line.startswith("WordNetSenseRetrieval ndcg_at_10"))
    assert result.get_score() == pytest.approx(float(row.split()[2]), abs=5e-5)
    loaded = cache.load_results(models=[name], tasks=["WordNetSenseRetrieval"], include_remote=False)
    assert [m.model_name for m in loaded.model_results] == [name]


def test_two_models_make_one_table(two_model_run, tiny_model_dir):
    proc, _ = two_model_run
    lines = proc.stdout.splitlines()
    header = lines[next(i for i, line in enumerate(lines) if line.startswith("WordNetSenseRetrieval ndcg")) - 1]
    assert header.split() == [os.path.basename(tiny_model_dir), "tiny-copy", "BM25"]
    import data
    import mteb_tasks

    for task in ("WordNetSenseRetrieval", "ManPageRetrieval"):
        for metric in ("ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_10", "recall_at_100"):
            row = next(line for line in lines if line.startswith(f"{task} {metric} "))
            a, b, bm25 = row.split()[2:]
            assert float(a) == float(b)  # the copy holds the same weights
            if metric == "ndcg_at_10":  # BM25 on the same split, beside the models
                assert float(bm25) == pytest.approx(data.bm25_ndcg10(mteb_tasks.TASKS[task]("test").path), abs=5e-5)
            else:
                assert bm25 == "-"


def test_instruction_convention(tiny_model_dir):
    """Retrieval: queries get the task instruction, documents none. Other task types: every text."""
    import mteb
    import torch
    from torch.utils.data import DataLoader

    import data
    import mteb_tasks

    encoder = mteb_tasks.Encoder(tiny_model_dir, "cpu", torch.float32)
    scifact, sts, banking = (mteb.get_task(n).metadata for n in ("SciFact", "STS16", "Banking77Classification"))
    assert encoder.instruction_for(scifact, "query") == mteb_tasks.INSTRUCTIONS["SciFact"]
    assert encoder.instruction_for(scifact, "document") is None
    assert encoder.instruction_for(sts, None) == "Retrieve semantically similar text."
    assert encoder.instruction_for(banking, None) == "Given a online banking query, find the corresponding intents"
    wordnet = mteb_tasks.WordNetSenseRetrieval().metadata
    assert encoder.instruction_for(wordnet, "query") == data.INSTRUCTIONS["wordnet"]  # the training one

    # encode() applies it: same vectors as encoding "Instruct: ...\nQuery: text" directly
    texts = ["a legal document signed and sealed", "he signed the deed", "the weak link in the chain"]
    loader = DataLoader([{"text": t} for t in texts], batch_size=2)
    query = encoder.encode(loader, task_metadata=scifact, hf_split="test", hf_subset="default", prompt_type="query")
    doc = encoder.encode(loader, task_metadata=scifact, hf_split="test", hf_subset="default", prompt_type="document")
    assert query.shape == (3, 64)
    assert abs(query - encoder.embedder.encode(texts, mteb_tasks.INSTRUCTIONS["SciFact"])).max() < 1e-5
    assert abs(doc - encoder.embedder.encode(texts, None)).max() < 1e-5
    assert abs(query - doc).max() > 1e-3
    ids = encoder.embedder.fmt.embed_ids("he signed the deed", encoder.instruction_for(sts))
    assert "Instruct: Retrieve semantically similar text.\nQuery: he signed the deed" in \
        encoder.embedder.fmt.tok.decode(ids, skip_special_tokens=False)

    # a task outside instructions.json gets one from its metadata, with a note
    other = mteb.get_task("NanoSciFactRetrieval").metadata
    assert other.name not in mteb_tasks.INSTRUCTIONS and encoder.instruction_for(other, "query")


def test_revision_follows_the_weights(tiny_model_dir, tmp_path):
    """Results live under a hash of the weights: new weights never land in an old result folder."""
    import torch

    import mteb_tasks
    from model import load_model, save_model

    same = shutil.copytree(tiny_model_dir, tmp_path / "same")
    changed = shutil.copytree(tiny_model_dir, tmp_path / "changed")
    model = load_model(str(changed))
    with torch.no_grad():
        model.model.norm.weight[0] += 0.01
    save_model(model, str(changed))
    revision = lambda path: mteb_tasks.Encoder(str(path), "cpu", torch.float32).mteb_model_meta.revision
    assert revision(tiny_model_dir) == revision(same) != revision(changed)


def test_unknown_task_suggests_close_names(tiny_model_dir):
    import eval as ev  # in-process: the check runs before any model or data is touched

    with pytest.raises(SystemExit) as info:
        ev.main(["--model", tiny_model_dir, "--tasks", "SciFakt"])
    assert isinstance(info.value.code, str)  # sys.exit(message): exit status 1, message on stderr
    assert "unknown task 'SciFakt'" in info.value.code and "SciFact" in info.value.code


def test_task_without_reachable_data_fails_fast(tiny_model_dir, tmp_path):
    """No hub (an endpoint that refuses connections) and an empty cache: a clear error, quickly."""
    cache = str(tmp_path / "hf")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": cache, "HF_HUB_CACHE": cache, "HF_DATASETS_CACHE": cache,
           "HF_HUB_OFFLINE": "", "HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": ""}
    t0 = time.time()
    proc = run_eval("--model", tiny_model_dir, "--tasks", "STS16", "--output", str(tmp_path / "out"), env=env)
    assert time.time() - t0 < 60
    assert proc.returncode != 0
    assert "STS16 could not download its data (no network or hub unreachable)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_not_a_checkpoint_folder(tiny_model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    proc = run_eval("--model", str(tmp_path))
    assert proc.returncode != 0
    assert str(tmp_path) in proc.stderr and "not a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr

    import eval as ev  # config and tokenizer without weights: past the first check, not past loading

    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        shutil.copy(os.path.join(tiny_model_dir, name), tmp_path)
    with pytest.raises(SystemExit) as info:
        ev.main(["--model", str(tmp_path)])
    assert f"--model {tmp_path} is not a usable checkpoint" in info.value.code
    assert "model.safetensors not found" in info.value.code


def test_real_smollm2_base_on_the_held_out_task(tmp_path):
    """`python eval.py` as a user runs it: the real SmolLM2 base model on the bundled tasks.

    The untrained [EOS] vector is a weak embedder (the premise of the method: that token was never
    trained to summarise its context), but a working pipeline ranks the true answer above chance;
    a broken one (wrong pooled token, missing EOS, misaligned padding) falls to chance. Chance,
    exactly: one relevant document among n, so a random ranking's expected nDCG@10 is
    (1/n) * sum over ranks r=1..10 of 1/log2(r+1), 0.0045 on WordNet (n = 1,000), and its
    expected recall@100 is 100/n, 0.166 on the man pages (n = 601). Measured (bf16): WordNet
    nDCG@10 0.0180, man pages recall@100 0.247; BM25 scores 0.095 and 0.652 nDCG@10."""
    chance = {}
    for folder in ("wordnet", "manpages"):
        with open(os.path.join(ROOT, folder, "test", "qrels.tsv")) as f:
            qrels = [line.split("\t") for line in f.read().splitlines()[1:]]
        n_docs = sum(1 for _ in gzip.open(os.path.join(ROOT, folder, "test", "corpus.jsonl.gz"), "rt"))
        assert len({q for q, _, _ in qrels}) == len(qrels)  # one relevant document per query
        chance[folder] = (sum(1 / math.log2(r + 1) for r in range(1, 11)) / n_docs, 100 / n_docs)

    proc = run_eval("--output", str(tmp_path), env={"OMP_NUM_THREADS": str(min(4, os.cpu_count()))}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = {}
    for task in ("WordNetSenseRetrieval", "ManPageRetrieval"):
        (path,) = glob.glob(str(tmp_path / "results" / "*" / "*" / f"{task}.json"))
        with open(path) as f:
            (scores[task],) = json.load(f)["scores"]["test"]
    assert scores["WordNetSenseRetrieval"]["ndcg_at_10"] > 2 * chance["wordnet"][0], (scores, chance)
    assert scores["ManPageRetrieval"]["recall_at_100"] > 1.2 * chance["manpages"][1], (scores, chance)


def test_results_folder_that_cannot_be_written(tiny_model_dir, tmp_path):
    """--output on a read-only folder (a read-only mount as root, no write bits otherwise), and on
    a disk with no room left: one line naming the folder and the cause, no traceback."""
    import eval as ev

    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir(), full.mkdir()
    if os.geteuid() == 0:
        mounts = [["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                  ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(full)]]
        for m in mounts:
            done = subprocess.run(m, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot mount here: {done.stderr.strip()}")
        causes = [(ro, "Read-only file system"), (full, "No space left on device")]
    else:
        os.chmod(ro, 0o555)
        causes = [(ro, "Permission denied")]
    try:
        for folder, cause in causes:
            with pytest.raises(SystemExit) as info:
                ev.main(["--model", tiny_model_dir, "--output", str(folder / "results")])
            assert info.value.code == f"eval.py: cannot write results to {folder / 'results'}: {cause}"
    finally:
        for folder in (ro, full):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        os.chmod(ro, 0o755)


def test_reconstruct_prints_samples_and_the_diagnostic(tiny_model_dir):
    """--reconstruct 2: the first two held-out pairs with their four regenerated sides, then the
    gap over the split's first 128 pairs (--gap-pairs), batches of 16: another pair's anchor
    (rolled by 1, 2 and 3: their mean and range) against the own one's loss, each decoded by hand;
    then the form check."""
    import torch

    import bireco
    import data
    from model import load_model, load_tokenizer

    proc = run_eval("--model", tiny_model_dir, "--reconstruct", "2", "--tasks", "WordNetSenseRetrieval",
                    "--split", "validation", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = data.split_pairs(os.path.join(ROOT, "wordnet", "validation"), data.INSTRUCTIONS["wordnet"],
                             128)
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("samples (validation pairs;"))
    block = [line.split(None, 1) for line in lines[start + 1:start + 13]]
    assert [k for k, _ in block] == ["query", "document", "EBQ2D", "shuffled", "EBD2Q", "shuffled"] * 2
    assert [block[0][1], block[1][1], block[6][1]] == [pairs[0].query, pairs[0].positive, pairs[1].query]
    assert lines[start + 13].startswith(f"validation pairs gap, wordnet ({len(pairs)} pairs;")
    model = load_model(tiny_model_dir).eval()
    fmt = data.TextFormat(*load_tokenizer(tiny_model_dir))
    for task, label in (("d2q", "EBD2Q"), ("q2d", "EBQ2D")):
        true, rolled = [], []  # per batch of 16: the own anchor's loss, and anchors rolled by 1, 2, 3
        with torch.no_grad():
            for i in range(0, len(pairs), 16):
                anchor, targets, mask = bireco._stage1_inputs(model, fmt, pairs[i:i + 16], task)
                true.append(bireco.reconstruction_loss(model, anchor, targets, mask).item())
                assert len(anchor) > 3  # so rolls by 1, 2 and 3 are three other pairs' anchors
                rolled.append([bireco.reconstruction_loss(model, anchor.roll(k, 0), targets, mask).item()
                               for k in (1, 2, 3)])
        own = sum(true) / len(true)
        each = [sum(r[k] for r in rolled) / len(rolled) - own for k in range(3)]
        shuffled = own + sum(each) / 3
        assert (f"{label} {shuffled - own:+.3f} [{min(each):+.3f}, {max(each):+.3f}] (own {own:.3f}, "
                f"another's {shuffled:.3f}") in lines[start + 14]
    # then the form check of the bundled dataset's regenerations (data.written_side)
    assert re.fullmatch(r"validation pairs form, wordnet: \d+% of 128 EBQ2D regenerations read as "
                        r"documents, \d+% of EBD2Q ones as queries", lines[start + 15])


def test_average_of_bundled_and_mteb_tasks():
    """A bundled task (scored by BM25 too) beside an MTEB task (not): the average row covers the
    models over both tasks and leaves BM25 out, where it used to fail with KeyError: 'BM25'."""
    import mteb

    import eval as ev
    import mteb_tasks

    tasks = [mteb_tasks.WordNetSenseRetrieval("validation"), mteb.get_task("SciFact")]
    scores = {("WordNetSenseRetrieval", "ndcg_at_10"): {"model": 0.4, "BM25": 0.1},
              ("SciFact", "ndcg_at_10"): {"model": 0.6}}
    ev.add_average(scores, tasks, ["model", "BM25"])
    assert scores[("average", "main score")] == {"model": pytest.approx(0.5)}
    one = {("SciFact", "ndcg_at_10"): {"model": 0.6}}
    ev.add_average(one, tasks[1:], ["model"])  # one task: no average row
    assert ("average", "main score") not in one


def test_show_prints_the_nearest_documents(tiny_model_dir):
    """--show 2: each query with the three nearest documents of the split's corpus, by cosine of
    [EOS] vectors computed here one text at a time (no batching, no length sorting), the relevant
    ones marked, and the first relevant document's rank."""
    import torch

    import bireco
    import data
    from model import load_model, load_tokenizer

    proc = run_eval("--model", tiny_model_dir, "--show", "2", "--tasks", "WordNetSenseRetrieval",
                    "--split", "validation", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    queries, corpus, qrels = data.read_split(os.path.join(ROOT, "wordnet", "validation"))
    model = load_model(tiny_model_dir).eval()
    fmt = data.TextFormat(*load_tokenizer(tiny_model_dir))
    one = lambda instruction, text: torch.nn.functional.normalize(
        bireco.embed_texts(model, fmt, [(instruction, text)])[0].float(), dim=-1)
    with torch.no_grad():
        ids = list(corpus)
        docs = torch.stack([one(None, corpus[d]) for d in ids])
        for qid in list(qrels)[:2]:
            cos = docs @ one(data.INSTRUCTIONS["wordnet"], queries[qid])
            ranking = cos.argsort(descending=True).tolist()
            first = next(r for r, i in enumerate(ranking) if ids[i] in qrels[qid]) + 1
            head = f"WordNetSenseRetrieval query: {queries[qid]}  (relevant at rank {first} of {len(ids)})"
            lines = proc.stdout.split(head + "\n")[1].splitlines()
            for r, i in enumerate(ranking[:3]):
                rank, score, text = lines[r].split(None, 2)
                assert rank == f"{r + 1}{'*' if ids[i] in qrels[qid] else ''}"
                assert abs(float(score) - cos[i].item()) < 2e-3 and text == " ".join(corpus[ids[i]].split())[:100]
            if first > 3:
                assert lines[3].split(None, 1)[0] == f"{first}*"
