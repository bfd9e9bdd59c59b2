"""experiments/compare.py on the tiny model: every unit of a paired two-seed comparison of the
three arms recorded once, the report (BM25, the untrained model, the arms, the paired differences
against the baseline and ours against the control, the curve), and a continued run that retrains a
deleted Stage I checkpoint to the same scores."""

import json
import os
import shutil
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("WordNetSenseRetrieval", "ManPageRetrieval")


def experiment(model, out):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "compare.py"), "--model", model, "--out", str(out),
           "--results", str(out / "results.json"),
           "--seeds", "0", "1", "--split", "validation", "--curve", "2",
           "--recon", "--steps 2 --batch-size 2 --lr 3e-5 --dtype float32",
           "--contrastive", "--steps 2 --batch-size 2 --dtype float32"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return proc.stdout, json.load(f)


def test_experiment_records_resumes_and_reports(tiny_model_dir, tmp_path):
    out = tmp_path / "exp"
    stdout, results = experiment(tiny_model_dir, out)
    scores = {k: v for k, v in results.items() if not k.endswith((".seconds", ".flags"))}
    arms = ("baseline", "ours", "control")  # the default arms; only the first seed's first two draw the curve
    evals = ["base/validation"] + [f"{arm}/s0/contrastive@{p}-validation" for arm in arms[:2] for p in (0, 1, 2)] \
        + ["control/s0/contrastive@2-validation"] + [f"{arm}/s1/contrastive@2-validation" for arm in arms]
    diagnostics = ["base/diagnostic-validation"] + [f"{arm}/s{s}/recon/diagnostic-validation"
                                                    for arm in arms[1:] for s in (0, 1)]
    others = {"settings", "bm25/validation"} | {f"{arm}/s{s}/recon" for arm in arms[1:] for s in (0, 1)} | {
        f"{arm}/s{s}/losses" for arm in arms for s in (0, 1)}
    assert set(scores) == set(evals) | set(diagnostics) | others
    for k in evals:
        assert set(scores[k]) == set(TASKS)
        for t in TASKS:
            assert 0.0 <= scores[k][t]["ndcg_at_10"] <= 1.0 and scores[k][t]["recall_at_100"] >= scores[k][t]["recall_at_10"]
    for k in diagnostics:
        assert set(scores[k]) == {"wordnet", "manpages"}
        assert all(g["true"] > 0 and g["shuffled"] > 0 and len(g["each"]) == 3 for d in scores[k].values()
                   for g in d.values())
    assert [s for s, _ in scores["baseline/s0/losses"]] == [1, 2]  # the log of the whole run, resumed at step 1
    assert scores["baseline/s0/contrastive@0-validation"] == scores["base/validation"]  # the curve starts at the base
    with open(os.path.join(out, "ours-s1", "recon", "latest", "meta.json")) as f:
        meta = json.load(f)
    assert meta["step"] == 2 and meta["args"]["lr"] == 3e-5 and meta["args"]["seed"] == 1
    # each training run records its own flags; the settings hold only the split
    recon = "--steps 2 --batch-size 2 --lr 3e-5 --dtype float32"
    contrastive = "--steps 2 --batch-size 2 --dtype float32"
    flags = {k: v for k, v in results.items() if k.endswith(".flags")}
    assert flags == {**{f"ours/s{s}/recon.flags": recon for s in (0, 1)},
                     **{f"control/s{s}/recon.flags": "--shuffle-anchors " + recon for s in (0, 1)},
                     **{f"{arm}/s{s}/contrastive.flags": contrastive for arm in arms for s in (0, 1)}}
    assert results["settings"] == {"split": "validation"}

    # the report: both arms' mean with its interval, and the paired difference seed by seed
    lines = stdout.splitlines()
    row = next(line for line in lines if line.startswith("| baseline |"))
    wn = [scores[f"baseline/s{s}/contrastive@2-validation"]["WordNetSenseRetrieval"]["ndcg_at_10"] for s in (0, 1)]
    assert row.split("|")[2].strip().startswith(f"{sum(wn) / 2:.3f} ± ") and row.rstrip().endswith("| 2 |")
    assert any(line.startswith("| BM25 |") for line in lines) and any(line.startswith("| ours |") for line in lines)
    paired = next(line for line in lines if line.startswith("ours - baseline, paired by seed (2 pairs)"))
    diff = [scores[f"ours/s{s}/contrastive@2-validation"]["WordNetSenseRetrieval"]["ndcg_at_10"] - wn[s] for s in (0, 1)]
    assert f"WordNetSenseRetrieval {sum(diff) / 2:.3f}" in paired
    row = next(line for line in lines if line.startswith("| ours - control, paired by seed |"))
    diff = [scores[f"ours/s{s}/contrastive@2-validation"]["WordNetSenseRetrieval"]["ndcg_at_10"]
            - scores[f"control/s{s}/contrastive@2-validation"]["WordNetSenseRetrieval"]["ndcg_at_10"] for s in (0, 1)]
    assert row.split("|")[2].strip().startswith(f"{sum(diff) / 2:.3f}") and row.rstrip().endswith("| 2 |")
    assert f"recon flags --shuffle-anchors {recon}: control s0, control s1" in lines

    # nothing left to do: a second run trains nothing
    again, results2 = experiment(tiny_model_dir, out)
    assert "train.py" not in again and results2 == results

    # a lost Stage I checkpoint and a missing unit: the run trains both stages again, seeded, to the same score
    shutil.rmtree(out / "ours-s1")
    del results["ours/s1/contrastive@2-validation"]
    with open(out / "results.json", "w") as f:
        json.dump(results, f)
    third, results3 = experiment(tiny_model_dir, out)
    assert "--stage recon" in third and "--stage contrastive" in third
    assert results3["ours/s1/contrastive@2-validation"] == scores["ours/s1/contrastive@2-validation"]


def test_gpu_check_quick_on_cpu():
    """experiments/gpu_check.py, the script a GPU machine runs, in its CPU mode on tiny shapes: every
    correctness row passes, and every section prints its rows."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "gpu_check.py"), "--device", "cpu",
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("tiny ", "tiny-1b "))]
    checks = [r for r in rows if r.startswith("tiny ")]
    # bf16 is checked where the CPU has bf16 matmul units (and torch uses them), else skipped
    assert len(checks) == 4 and all(r.rstrip().endswith((" ok", "no bf16 matmul units")) for r in checks), checks
    assert sum(r.rstrip().endswith(" ok") for r in checks) >= 2
    for metric in ("Stage I step, sum (s)", "encode, ours length-sorted", "MFU, Stage I sum step",
                   "Stage II cached step, 8 queries x 3 x 64 tokens (s)"):
        assert any(metric in r for r in rows), metric


def test_eos_spread_matches_direct_counts(tiny_model_dir):
    """experiments/eos_spread.py's figures against the same embeddings counted directly: the mean
    cosine over every pair of different texts, the first principal direction's share from the
    covariance's eigenvalues, and recall@10 from each query's full ranking."""
    import importlib.util

    import numpy as np

    sys.path.insert(0, ROOT)
    import data
    from bireco import Embedder

    spec = importlib.util.spec_from_file_location("eos_spread", os.path.join(ROOT, "experiments", "eos_spread.py"))
    eos_spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eos_spread)
    embedder = Embedder.from_pretrained(str(tiny_model_dir), max_length=64)
    dd, qq, pc1, r10 = eos_spread.spread(embedder, "wordnet", "validation", 12)

    queries, corpus, qrels = data.read_split(os.path.join(ROOT, "wordnet", "validation"))
    ids, asked = list(corpus), list(qrels)[:12]
    docs = embedder.encode([corpus[d] for d in ids])
    q = embedder.encode([queries[i] for i in asked], data.INSTRUCTIONS["wordnet"])
    pairs = [(i, j) for i in range(len(q)) for j in range(len(q)) if i != j]
    assert abs(qq - np.mean([q[i] @ q[j] for i, j in pairs])) < 1e-4
    cos = docs.astype(np.float64) @ docs.T.astype(np.float64)
    assert abs(dd - (cos.sum() - np.trace(cos)) / (len(docs) * (len(docs) - 1))) < 1e-4
    eig = np.linalg.eigvalsh(np.cov(docs.T))
    assert abs(pc1 - eig[-1] / eig.sum()) < 1e-4
    hits = 0
    for qid, row in zip(asked, q @ docs.T):
        best = sorted(range(len(ids)), key=lambda i: -row[i])[:10]
        hits += any(ids[i] in qrels[qid] for i in best)
    assert r10 == hits / len(asked)
    assert 0 < pc1 < 1 and -1 <= dd <= 1
