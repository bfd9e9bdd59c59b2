"""experiments/wordnet.py on the tiny model: every unit of the main comparison recorded once, the
report, and a continued run that retrains a deleted Stage I checkpoint to the same scores."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(model, out):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "wordnet.py"), "--model", model, "--out", str(out),
           "--seeds", "0", "--no-ablations", "--recon-steps", "2", "--recon-batch", "2",
           "--contrastive-steps", "2", "--contrastive-batch", "2", "--eval-every", "1", "--long-recon", "3", "--recon-lr", "3e-5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return proc.stdout, json.load(f)


def test_experiment_records_resumes_and_reports(tiny_model_dir, tmp_path):
    out = tmp_path / "exp"
    stdout, results = experiment(tiny_model_dir, out)
    scores = {k: v for k, v in results.items() if not k.endswith(".seconds")}
    evals = ["base/eval", "ours/s0/recon/eval", "ours-recon3/s0/recon/eval", "ours-recon3/s0/contrastive@2"] + [
        f"{arm}/s0/contrastive@{p}" for arm in ("baseline", "ours") for p in (1, 2)]
    diagnostics = ["base/diagnostic", "ours/s0/recon/diagnostic", "ours-recon3/s0/recon/diagnostic"]
    assert set(scores) == set(evals) | set(diagnostics) | {"ours/s0/recon", "ours-recon3/s0/recon"}
    for k in evals:
        assert 0.0 <= scores[k]["ndcg_at_10"] <= 1.0 and scores[k]["recall_at_100"] >= scores[k]["recall_at_10"]
    for k in diagnostics:
        assert set(scores[k]) == {"d2q", "q2d"} and all(v["true"] > 0 and v["shuffled"] > 0 for v in scores[k].values())
    # the table of the last Stage II point per arm
    row = next(line for line in stdout.splitlines() if line.startswith("| baseline |"))
    assert f"{scores['baseline/s0/contrastive@2']['ndcg_at_10']:.4f}" in row and row.rstrip().endswith("| 1 | 2 |")
    assert any(line.startswith("| ours-recon3 |") for line in stdout.splitlines())
    with open(os.path.join(out, "ours-recon3-s0", "recon", "latest", "meta.json")) as f:
        meta = json.load(f)
    assert meta["step"] == 3 and meta["args"]["lr"] == 3e-5  # its own step count, and --recon-lr

    # nothing left to do: a second run trains nothing
    again, results2 = experiment(tiny_model_dir, out)
    assert "train.py" not in again and results2 == results

    # a lost Stage I checkpoint and a missing unit: the run trains both stages again, seeded, to the same score
    shutil.rmtree(out / "ours-s0")
    del results["ours/s0/contrastive@2"]
    with open(out / "results.json", "w") as f:
        json.dump(results, f)
    third, results3 = experiment(tiny_model_dir, out)
    assert "--stage recon" in third and "--stage contrastive" in third
    assert results3["ours/s0/contrastive@2"] == scores["ours/s0/contrastive@2"]
