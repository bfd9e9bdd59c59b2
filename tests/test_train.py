"""train.py on the tiny fp32 model: CLI smoke runs of both stages, loss falling on a tiny overfit
set, resume equal to an uninterrupted run,
LoRA (identity at init, merge on save), the non-finite loss stop and the Ctrl-C save."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import make_data_dir, wordnet_rows

import train
import bireco
from data import TextFormat, load_pairs, sample_sets
from model import ModelConfig, Transformer, load_model, load_tokenizer, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one progress line: "step 2/2 | d2q 6.0755 | lr 2.67e-06 | 454 tok/s | eta 0.0 min"
PROGRESS = re.compile(r"^step (\d+)/(\d+) \| ((?:\w+ -?\d+\.\d{4} ?)+)(?: \| batch gap [^|]*)? \| lr (\d\.\d\de[-+]\d\d) \| "
                      r"(\d+) tok/s(?: \| negatives/query (\d+))? \| eta (\d+\.\d) min$", re.M)


def progress(out):
    """[(step, {loss name: value}, lr, negatives or None)] from train.py's stdout."""
    rows = []
    for m in PROGRESS.finditer(out):
        names = m.group(3).split()
        losses = {k: float(v) for k, v in zip(names[::2], names[1::2])}
        rows.append((int(m.group(1)), losses, float(m.group(4)), m.group(6) and int(m.group(6))))
    return rows


def run_cli(*argv, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tensors(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def meta(run):
    with open(os.path.join(run, "latest", "meta.json")) as f:
        return json.load(f)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model is overhead-bound, and two threads crawl when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def keep_sigint_handler():
    """train.main installs its own Ctrl-C handler; in-process runs must not leave it behind."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="module")
def pairs8(tmp_path_factory):
    """8 pairs: two batches of 4, so a few steps cross epochs and the set is easy to overfit."""
    return make_data_dir(tmp_path_factory.mktemp("pairs8") / "pairs", n=8)


def common(model, data, out, *extra):
    return ["--model", model, "--data", data, "--batch-size", "4", "--dtype", "float32",
            "--out", str(out), "--log-every", "1", *extra]


# -----------------------------------------------------------------------------
# CLI smoke runs


@pytest.mark.parametrize("stage, loss_name, negatives, lr_share", [
    ("recon", "d2q", None, 1),  # the 1 : 1 pattern: step 1 EBD2Q, step 2 EBQ2D; warmup 2 x 40 / 150 -> 1,
                                # so step 2 is the peak
    ("contrastive", "loss", 7, 0.5),  # negatives/query = (B - 1) positives + B hard negatives; no warmup
                                      # (a tenth of 2 rounds to 0), so step 2 is half decayed
], ids=["recon", "contrastive"])
def test_cli_two_steps(stage, loss_name, negatives, lr_share, tiny_model_dir, tiny_data_dir, tmp_path):
    import transformers

    lr = train.STAGE_DEFAULTS[stage]["lr"] * lr_share

    out = tmp_path / "run"
    proc = run_cli("--stage", stage, "--model", tiny_model_dir, "--data", tiny_data_dir, "--steps", "2",
                   "--batch-size", "4", "--dtype", "float32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = progress(proc.stdout)  # default --log-every 10: only the last step is logged
    assert row[0] == 2 and f"step 2/2 | {loss_name} " in proc.stdout
    names = ["d2q", "q2d"] if stage == "recon" else [loss_name]
    assert list(row[1]) == names and all(np.isfinite(v) for v in row[1].values())
    assert row[2] == pytest.approx(lr, rel=1e-2) and row[3] == negatives
    samples = [line for line in proc.stdout.splitlines() if line.startswith("samples at step")]
    if stage == "recon":  # Stage I shows reconstructions at the start and at the end
        assert [s.split()[3] for s in samples] == ["0", "2"] and "(training pairs;" in samples[0]
        first = wordnet_rows(64)[0]  # the tiny data's first pair, shown with its regenerated sides
        assert f"  query     {first['query']}\n  document  {first['positive']}\n  EBQ2D     " in proc.stdout
    else:
        assert samples == []

    latest = out / "latest"
    assert os.path.islink(latest) and os.readlink(latest) == "step-000002"
    m = meta(out)
    assert {"args", "step", "data_position", "base_model", "git_commit"} <= set(m)
    assert m["step"] == 2 and m["args"]["stage"] == stage and m["args"]["steps"] == 2
    assert m["data_position"] == {"epoch": 0, "index": 2}  # 64 pairs = 16 batches per epoch
    assert m["base_model"] == os.path.abspath(tiny_model_dir)
    assert m["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", m["git_commit"])

    ours = load_model(str(latest)).eval()
    before = tensors(tiny_model_dir)
    assert any(not torch.equal(v, before[k]) for k, v in tensors(latest).items())  # it trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(latest).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.lm_head(ours(ids)), atol=1e-4, rtol=1e-4)


def test_pairs_without_negatives_and_the_default_warmup(tiny_model_dir, tmp_path, capsys):
    """Stage II on plain sentence pairs (one .jsonl file, no "negative"): in-batch negatives only,
    B - 1 = 3 per query. 12 steps with the default warmup (a tenth of the steps: 1) peak at step 1
    and decay linearly to lr / 11 at step 12."""
    rows = [{"query": r["query"], "positive": r["positive"]} for r in wordnet_rows(8)]
    data = tmp_path / "wordnet.jsonl"  # a name with a built-in instruction
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main(["--stage", "contrastive", "--steps", "12", "--lr", "1e-3", *common(tiny_model_dir, str(data),
                tmp_path / "run")])
    rows = progress(capsys.readouterr().out)
    assert [r[0] for r in rows] == list(range(1, 13))
    assert all(r[3] == 3 for r in rows)
    assert [r[2] for r in rows] == pytest.approx([1e-3 * min(1, (12 - s) / 11) for s in range(12)], rel=1e-2)
    assert meta(tmp_path / "run")["args"]["warmup"] == 1


# -----------------------------------------------------------------------------
# The loss falls on a tiny overfit set


def first_last(rows, name, k=3):
    values = [losses[name] for _, losses, _, _ in rows if name in losses]
    return np.mean(values[:k]), np.mean(values[-k:])


@pytest.mark.parametrize("mode", ["interleave", "sum"])
def test_stage1_loss_falls(mode, tiny_model_dir, pairs8, tmp_path, capsys):
    train.main(["--stage", "recon", *common(tiny_model_dir, pairs8, tmp_path / "run"), "--steps", "30",
                "--lr", "3e-3", "--warmup", "0", "--mode", mode, "--task-weights", "0.5", "0.5"])
    rows = progress(capsys.readouterr().out)
    assert [r[0] for r in rows] == list(range(1, 31))
    if mode == "interleave":  # one task per batch, alternating at 1:1
        assert [list(r[1]) for r in rows[:4]] == [["d2q"], ["q2d"], ["d2q"], ["q2d"]]
    else:
        assert all(list(r[1]) == ["d2q", "q2d"] for r in rows)
    for task in ("d2q", "q2d"):
        first, last = first_last(rows, task)
        assert last < 0.8 * first, (task, first, last)


def test_stage2_loss_falls(tiny_model_dir, pairs8, tmp_path, capsys):
    train.main(["--stage", "contrastive", *common(tiny_model_dir, pairs8, tmp_path / "run"), "--steps", "30",
                "--lr", "1e-3", "--warmup", "0", "--lora-rank", "4"])
    out = capsys.readouterr().out
    assert "0.01M trained" in out  # LoRA only: 2 layers x 7 adapters of rank 4
    rows = progress(out)
    assert len(rows) == 30
    first, last = first_last(rows, "loss")
    assert last < 0.5 * first, (first, last)


# -----------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("stage, extra", [
    ("recon", ["--task-weights", "0.5", "0.5"]),  # both tasks before and after the stop
    ("contrastive", ["--lora-rank", "4", "--lora-dropout", "0.1", "--chunk", "5"]),  # dropout draws RNG
], ids=["recon", "contrastive"])
def test_resume_equals_uninterrupted(stage, extra, tiny_model_dir, pairs8, tmp_path, capsys):
    """4 steps == 2 steps (--stop-after 2) + --resume: weights, optimizer, data position and RNG
    (LoRA dropout masks) all carry over. 8 pairs in batches of 4: the run crosses an epoch."""
    args = ["--stage", stage, "--steps", "4", "--lr", "1e-3", "--warmup", "1", *extra]
    train.main([*args, *common(tiny_model_dir, pairs8, tmp_path / "whole")])
    whole_log = progress(capsys.readouterr().out)
    train.main([*args, *common(tiny_model_dir, pairs8, tmp_path / "split"), "--stop-after", "2"])
    assert meta(tmp_path / "split")["step"] == 2
    halfway = tensors(tmp_path / "split" / "latest")
    train.main(["--resume", str(tmp_path / "split")])
    out = capsys.readouterr().out
    assert f"resumed {tmp_path / 'split'} at step 2/4" in out
    assert [r[0] for r in progress(out)] == [1, 2, 3, 4]
    assert [r[1] for r in progress(out)] == [r[1] for r in whole_log]  # the same printed losses

    a, b = meta(tmp_path / "whole"), meta(tmp_path / "split")
    assert a["step"] == b["step"] == 4 and a["data_position"] == b["data_position"] == {"epoch": 1, "index": 2}
    want, got = tensors(tmp_path / "whole" / "latest"), tensors(tmp_path / "split" / "latest")
    assert want.keys() == got.keys()
    assert any(not torch.allclose(halfway[k], got[k], atol=1e-5) for k in got)  # steps 3-4 did change weights
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    if stage == "contrastive":  # the adapters themselves, not only the merged weights
        ta = torch.load(tmp_path / "whole" / "latest" / "train_state.pt", weights_only=False)["trainable"]
        tb = torch.load(tmp_path / "split" / "latest" / "train_state.pt", weights_only=False)["trainable"]
        assert len(ta) == 2 * 7 * 2 and ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], atol=1e-6, rtol=1e-5)


def test_resume_without_checkpoint_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for run in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(SystemExit) as e:
            train.main(["--resume", str(run)])
        assert isinstance(e.value.code, str)  # sys.exit(message): exit status 1
        assert str(run) in e.value.code and "no checkpoint" in e.value.code


def test_out_holding_a_run_needs_overwrite(tiny_model_dir, pairs8, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--stage", "recon", *common(tiny_model_dir, pairs8, run), "--steps", "1"]
    train.main(args)
    first = tensors(run / "latest")
    with pytest.raises(SystemExit) as e:
        train.main(args[:-1] + ["2"])
    assert isinstance(e.value.code, str) and str(run) in e.value.code
    assert "--resume" in e.value.code and "--overwrite" in e.value.code
    assert meta(run)["step"] == 1  # refused before anything was touched
    capsys.readouterr()
    train.main(args[:-1] + ["2", "--overwrite"])
    assert meta(run)["step"] == 2 and sorted(os.listdir(run)) == ["latest", "step-000002"]
    assert any(not torch.equal(v, first[k]) for k, v in tensors(run / "latest").items())


# -----------------------------------------------------------------------------
# LoRA


def random_model(model_type):
    cfg = ModelConfig.from_hf(dict(model_type=model_type, vocab_size=97, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=model_type == "llama"))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model


def test_lora_output_is_the_base_plus_alpha_over_rank_times_b_a():
    """W x + (alpha / r) B A x, worked by hand: rank 2, alpha 4 (scale 2), dropout off.
    W = [[1, 0, 2], [0, 1, 0]], A = [[1, 0, 0], [0, 1, 1]], B = [[1, 0], [2, -1]], x = (1, 2, 3):
    W x = (7, 2); A x = (1, 5); B A x = (1, -3); the output is (7 + 2, 2 - 6) = (9, -4)."""
    base = torch.nn.Linear(3, 2, bias=False, dtype=torch.float64)
    lora = train.LoRALinear(base, rank=2, alpha=4.0, dropout=0.0)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0, 2], [0, 1, 0]]))
        lora.lora_A.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 1]]))
        lora.lora_B.copy_(torch.tensor([[1.0, 0], [2, -1]]))
        x = torch.tensor([[1.0, 2, 3]], dtype=torch.float64)
        assert lora.eval()(x).tolist() == [[9.0, -4.0]]
        assert (x @ lora.merged_weight().T).tolist() == [[9.0, -4.0]]  # the saved weight agrees


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # tied embeddings; q/k/v biases
def test_lora_starts_at_the_base_model_and_merges_on_save(model_type, tmp_path):
    model = random_model(model_type).double()  # fp64: merged == adapted to rounding on any CPU
    plain_keys = set(model.state_dict())
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        base = model.lm_head(model(ids))
    train.add_lora(model, rank=4, alpha=8.0, dropout=0.2)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(train.LORA_TARGETS) * 2
    assert all(k.endswith((".lora_A", ".lora_B")) for k in trainable)
    with torch.no_grad():  # B = 0: the adapter adds nothing, even with dropout active
        torch.testing.assert_close(model.train().lm_head(model(ids)), base, atol=0, rtol=0)

    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("lora_B"):
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    model.eval()  # dropout off
    with torch.no_grad():
        adapted = model.lm_head(model(ids))
    assert not torch.allclose(adapted, base, atol=1e-3)

    merged_sd = train.merged_state_dict(model)
    assert set(merged_sd) == plain_keys
    save_model(model, str(tmp_path / "merged"), merged_sd)
    merged = load_model(str(tmp_path / "merged"), dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.lm_head(merged(ids)), adapted, atol=1e-12, rtol=1e-10)


# -----------------------------------------------------------------------------
# Failure paths: non-finite loss, Ctrl-C


def test_inf_weight_stops_at_step_1_without_checkpoint(tiny_model_dir, pairs8, tmp_path):
    from safetensors.torch import save_file

    bad = shutil.copytree(tiny_model_dir, tmp_path / "bad")
    sd = tensors(bad)
    sd["model.norm.weight"][0] = float("inf")
    save_file(sd, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "recon", *common(str(bad), pairs8, run), "--steps", "3", "--save-every", "1"])
    assert isinstance(e.value.code, str)
    assert "non-finite" in e.value.code and "at step 1" in e.value.code and "none yet" in e.value.code
    assert not os.path.exists(run) or os.listdir(run) == []


@pytest.mark.parametrize("stage, extra", [("recon", []), ("contrastive", ["--lora-rank", "4"])],
                         ids=["recon", "contrastive"])
def test_huge_lr_stops_on_non_finite_loss(stage, extra, tiny_model_dir, pairs8, tmp_path, capsys):
    """lr 1e30 blows the weights up within a few steps: the run stops at the first non-finite loss,
    names the step and the last checkpoint, and writes none for the failed step."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", stage, *common(tiny_model_dir, pairs8, run), "--steps", "20", "--lr", "1e30",
                    "--warmup", "0", "--save-every", "1", *extra])
    assert isinstance(e.value.code, str) and "non-finite" in e.value.code
    step = int(re.search(r"non-finite .* at step (\d+)", e.value.code).group(1))
    assert 1 < step < 20
    last = f"step-{step - 1:06d}"
    assert str(run / last) in e.value.code
    assert sorted(os.listdir(run)) == ["latest", last]  # no checkpoint of the failed step
    assert meta(run)["step"] == step - 1
    assert [r[0] for r in progress(capsys.readouterr().out)] == list(range(1, step))


def test_ctrl_c_saves_and_resume_continues(tiny_model_dir, pairs8, tmp_path, capsys):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train.py", "--stage", "recon", *common(tiny_model_dir, pairs8, run),
                             "--steps", "100000", "--save-every", "100000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(120, proc.kill)  # a hang fails the test instead of blocking the suite
    killer.start()
    try:
        lines = []
        while not (lines and lines[-1].startswith("step ")):
            line = proc.stdout.readline()
            assert line, "train.py ended before its first progress line:\n" + "".join(lines)
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        killer.cancel()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]  # Ctrl-C is a clean stop: finish the step, save, exit 0
    assert "interrupt: finishing this step" in out
    step = int(re.search(r"^done: .* \(step (\d+)/100000\) in \d+\.\d min$", out, re.M).group(1))
    assert step >= 1 and progress(out)[-1][0] == step
    assert f"saved {run / f'step-{step:06d}'}" in out
    assert meta(run)["step"] == step

    train.main(["--resume", str(run), "--stop-after", "1"])
    out = capsys.readouterr().out
    assert f"resumed {run} at step {step}/100000" in out
    assert [r[0] for r in progress(out)] == [step + 1]
    assert meta(run)["step"] == step + 1


def test_resume_keeps_the_saved_settings_and_data(tiny_model_dir, tmp_path, capsys):
    """--resume takes no flag but --stop-after, and refuses a data folder that changed size."""
    data = make_data_dir(tmp_path / "pairs", n=8)
    run = str(tmp_path / "run")
    train.main(common(tiny_model_dir, data, run, "--stage", "recon", "--steps", "4", "--stop-after", "1"))
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", run, "--steps", "9"])
    assert e.value.code == 2 and "not --steps" in capsys.readouterr().err
    make_data_dir(tmp_path / "pairs", n=12)  # the folder now holds 12 pairs, not 8
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", run])
    assert "changed since the run started" in str(e.value.code) and "{'wordnet': 8}" in str(e.value.code)
    assert meta(run)["step"] == 1


def test_samples_come_from_the_held_out_splits():
    """On the bundled datasets the Stage I samples and gaps come from the validation splits, the
    first n pairs of each; on data without them, from the first training pairs."""
    from data import INSTRUCTIONS, split_pairs

    sources = [os.path.join(ROOT, name, "train") for name in ("wordnet", "manpages")]
    what, sets = sample_sets(sources, load_pairs(*sources), 3)
    assert what == "held-out pairs"
    assert sets == {name: split_pairs(os.path.join(ROOT, name, "validation"), INSTRUCTIONS[name], 3)
                    for name in ("wordnet", "manpages")}


def test_stage1_prints_the_held_out_gap(tiny_model_dir, tmp_path, capsys):
    """Stage I on the bundled data prints, at each sample point, each dataset's gap: another
    pair's anchor's loss minus the own one's, as bireco.anchor_losses measures it."""
    from data import INSTRUCTIONS, split_pairs

    sources = [os.path.join(ROOT, name, "train") for name in ("wordnet", "manpages")]
    train.main(["--stage", "recon", "--model", tiny_model_dir, "--data", *sources, "--steps", "1",
                "--batch-size", "2", "--gap-pairs", "4", "--dtype", "float32", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    heads = re.findall(r"^held-out pairs gap at step (\d+), (\w+) \(4 pairs", out, re.M)
    assert heads == [("0", "wordnet"), ("0", "manpages"), ("1", "wordnet"), ("1", "manpages")]
    model = load_model(str(tmp_path / "run" / "latest"))
    tok, eos_ids = load_tokenizer(tiny_model_dir)
    fmt = TextFormat(tok, eos_ids, 64)
    pairs = split_pairs(os.path.join(ROOT, "manpages", "validation"), INSTRUCTIONS["manpages"], 4)
    how = bireco.checkpoint_decoding(str(tmp_path / "run" / "latest"), fmt)
    assert how == bireco.Decoding(sink_id=fmt.head[0], centre=True, turn=True)  # the default: sided
    g = bireco.anchor_losses(model, fmt, pairs, "d2q", how=how, shufflings=2)
    low, high = (f(g["each"]) - g["true"] for f in (min, max))
    lines = out.splitlines()
    last = lines[lines.index(next(l for l in lines if "gap at step 1, manpages" in l)) + 1]
    assert f"EBD2Q {g['shuffled'] - g['true']:+.3f} [{low:+.3f}, {high:+.3f}] (own {g['true']:.3f}" in last
    forms = re.findall(r"^held-out pairs form at step (\d+), (\w+): \d+% of 4 EBQ2D", out, re.M)
    assert forms == heads  # the side each regeneration is written in, after each gap
    assert re.search(r"^done: .* \(step 1/1\) in \d+\.\d min$", out, re.M)
