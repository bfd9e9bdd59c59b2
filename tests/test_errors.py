"""Faults a user can cause, seen from the command line: `python train.py ...` must exit non-zero
with a message that names the fault (file, line or key, and what would be accepted), never with a
Python traceback, and must never lose the last good checkpoint.

Already covered elsewhere, not repeated here:
- data.load_pairs raising DataError with file:line (bad JSON, missing or empty fields, non-UTF-8,
  empty folder or file, a dataset smaller than a batch): tests/test_data.py; the EOS kept when a
  text is cut: test_data.py::test_truncation_keeps_the_eos. Here: the same faults end to end.
- strict loading (shape mismatch, missing weights, missing config.json) and unsupported configs
  raising in model.py: tests/test_model.py. Here: the same faults end to end.
- a non-finite loss, one Ctrl-C, --resume from a folder without a checkpoint, --out holding
  another run: tests/test_train.py (test_inf_weight_*, test_huge_lr_*, test_ctrl_c_*,
  test_resume_without_checkpoint_*, test_out_holding_a_run_*).
New here: those data and model-folder faults end to end, and sharded, truncated or unparsable
model files; flags that used to fail deep inside the loop; texts cut to --max-length and counted;
a kill in the middle of a checkpoint write, then --resume; a second Ctrl-C; a disk that fills up
or turns read-only under a run; memory running out in a step.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import make_data_dir, wordnet_rows

import checkpoint
from data import TextFormat
from model import load_model, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def tensors(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


# -----------------------------------------------------------------------------
# The command line, started once
#
# Starting Python and importing torch takes seconds on a shared CPU, far more than a case itself.
# So one server process imports train once and, for each command it reads, forks a child (no torch
# op has run on the CPU before the fork, so forking is safe). The child runs train.py's main() on
# the arguments, stdout and stderr sent to files, and ends as Python ends a script:
# sys.exit(message) prints the message, status 1; sys.exit(n) status n (argparse: 2); any other
# exception prints its traceback, status 1. Then os._exit, which skips tearing down the inherited
# torch modules (half a second a child). A command may first inject a fault no argument can cause:
# - kill_in_second_save: the second checkpoint's weights file is cut in half as it is written and
#   the process is killed there (SIGKILL: no handler, no clean-up), as a power cut or the OOM
#   killer would;
# - ctrl_c_twice: Ctrl-C during the second step, and again while its checkpoint is being saved;
# - memory_limit: the address space capped at 150 MB above what the child holds after the fork
#   (RLIMIT_AS), so a large step really fails to allocate, as on a machine out of memory.

CLI_SERVER = """
import json, os, signal, sys
import torch
import checkpoint
import train


def kill_in_second_save():
    real, calls = checkpoint.save_model, []
    def save_model(model, path, state_dict=None):
        calls.append(path)
        real(model, path, state_dict)
        if len(calls) == 2:
            weights = os.path.join(path, "model.safetensors")
            os.truncate(weights, os.path.getsize(weights) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_model = save_model


def ctrl_c_twice():
    def on_second_call(f):
        calls = []
        def wrapped(*args):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return f(*args)
        return wrapped
    train.micro_step = on_second_call(train.micro_step)
    train.save_checkpoint = on_second_call(train.save_checkpoint)


def memory_limit():
    import resource
    with open("/proc/self/statm") as f:  # the address space in use now, in pages
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + 150 * 2 ** 20, resource.RLIM_INFINITY))


def run(argv):
    try:
        sys.argv = ["train.py", *argv]
        train.main()
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1


with torch.device("meta"):  # imports what load_model's meta-device init needs, once for all children
    torch.nn.Embedding(2, 2)
for line in sys.stdin:
    argv, fault, out, err = json.loads(line)
    pid = os.fork()
    if pid == 0:
        signal.alarm(120)  # a hung run ends (status -14) instead of blocking the tests
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT), fd)
        if fault:
            {"kill_in_second_save": kill_in_second_save, "ctrl_c_twice": ctrl_c_twice,
             "memory_limit": memory_limit}[fault]()
        code = run(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
os._exit(0)
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """cli(*argv, fault=None) -> (exit status, stdout, stderr) of `python train.py ARGV`."""
    logs = tmp_path_factory.mktemp("cli")
    server = subprocess.Popen([sys.executable, "-c", CLI_SERVER], cwd=ROOT, env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    calls = []

    def run(*argv, fault=None):
        calls.append(argv)
        out, err = logs / f"{len(calls)}.out", logs / f"{len(calls)}.err"
        server.stdin.write(json.dumps([[str(a) for a in argv], fault, str(out), str(err)]) + "\n")
        server.stdin.flush()
        code = server.stdout.readline()
        assert code, f"the command-line server died (status {server.wait()})"
        return int(code), out.read_text(), err.read_text()

    yield run
    server.stdin.close()
    server.wait(timeout=60)


@pytest.fixture(scope="module")
def pairs8(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("pairs8") / "pairs", n=8)  # two batches of 4


def recon(model_dir, data_dir, out, *flags):
    return ["--stage", "recon", "--model", model_dir, "--data", data_dir, "--batch-size", "4",
            "--dtype", "float32", "--out", out, *flags]


def assert_clean_failure(result, status, message):
    code, out, err = result
    assert "Traceback" not in err, err[-3000:]
    assert code == status, err[-3000:]
    assert message in err, err[-3000:]


ROW = dict(query="the team is a unit", positive="whole, unit: a single entity", negative="a unit of measure")


def data_folder(path, lines):
    """A folder holding nq.jsonl (the "nq" dataset has a built-in instruction) with these lines:
    dicts are written as JSON, str and bytes as they are; None gives an empty folder."""
    os.makedirs(path)
    if lines is not None:
        with open(os.path.join(path, "nq.jsonl"), "wb") as f:
            for line in lines:
                f.write(line if isinstance(line, bytes) else
                        (line if isinstance(line, str) else json.dumps(line)).encode())
                f.write(b"\n")
    return path


# name: (lines of nq.jsonl, the message expected; {file} is the path of nq.jsonl, {folder} its folder)
DATA_FAULTS = {
    "malformed_json": ([ROW, '{"query": "q", "positive": ', ROW], "{file}:2: not valid JSON"),
    "missing_query": ([ROW, ROW, ROW, dict(positive="p", negative="n")], "{file}:4: missing field 'query' "
                      "(each line needs query, positive; negative is optional)"),
    "missing_positive": ([ROW, dict(query="q")], "{file}:2: missing field 'positive'"),
    "empty_text": ([dict(ROW, query="")], "{file}:1: field 'query' is empty or not a string"),
    "whitespace_text": ([ROW, dict(ROW, positive=" \t\n ")], "{file}:2: field 'positive' is empty"),
    "not_utf8": ([ROW, b'{"query": "caf\xe9", "positive": "p"}'], "{file}: not UTF-8 text"),
    "empty_folder": (None, "{folder}: no .jsonl or .jsonl.gz files in this folder"),
    "blank_file": (["", "  "], "{file}: file holds no pairs"),
    "fewer_than_a_batch": ([ROW] * 3, "datasets smaller than one batch of 4: {{'nq': 3}}; lower --batch-size"),
}


def shard(path, drop=()):
    """Splits model.safetensors into two shards and an index listing every tensor; the tensors
    in `drop` stay listed in the index but are left out of the second shard."""
    from safetensors.torch import save_file

    sd = tensors(path)
    os.remove(os.path.join(path, "model.safetensors"))
    keys = sorted(sd)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [keys[:len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, parts):
        save_file({k: sd[k] for k in part if k not in drop}, os.path.join(path, name))
    index = {"weight_map": {k: name for name, part in zip(names, parts) for k in part}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def edit_config(path, **change):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(change)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({k: v for k, v in cfg.items() if v is not None}, f)


def write(path, name, text):
    with open(os.path.join(path, name), "w") as f:
        f.write(text)


def truncate(path, name):
    file = os.path.join(path, name)
    os.truncate(file, os.path.getsize(file) // 2)


def absent_shard(path):
    shard(path)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))


def index_without_weight_map(path):
    shard(path)
    write(path, "model.safetensors.index.json", '{"metadata": {"total_size": 0}}')


def no_eos(path):
    os.remove(os.path.join(path, "generation_config.json"))
    edit_config(path, eos_token_id=None)


# name: (how the copy of the tiny model is broken, the message expected; {model} is its folder)
MODEL_FAULTS = {
    "no_config": (lambda p: os.remove(os.path.join(p, "config.json")),
                  "{model}/config.json not found: not a model checkpoint folder"),
    "config_not_json": (lambda p: write(p, "config.json", "{'model_type': 'llama'}"),
                        "{model}/config.json: not valid JSON"),
    "config_missing_key": (lambda p: edit_config(p, hidden_size=None), "{model}/config.json: missing hidden_size"),
    "no_weights": (lambda p: os.remove(os.path.join(p, "model.safetensors")),
                   "{model}/model.safetensors not found (weights missing or partial)"),
    "partial_weights": (lambda p: truncate(p, "model.safetensors"),
                        "{model}/model.safetensors: not a readable safetensors file, partly written or corrupt"),
    "shard_absent": (absent_shard, "{model}/model-00002-of-00002.safetensors not found"),
    "shard_lacks_tensor": (lambda p: shard(p, drop={"model.norm.weight"}),
                           "{model}: checkpoint lacks 1 tensors, first ['model.norm.weight'] "
                           "(the index puts them in model-00002-of-00002.safetensors)"),
    "index_without_weight_map": (index_without_weight_map,
                                 '{model}/model.safetensors.index.json: no "weight_map"'),
    "shape_mismatch": (lambda p: edit_config(p, intermediate_size=96),
                       "{model}/model.safetensors: model.layers.0.mlp.down_proj.weight has shape (64, 128), "
                       "config.json implies (64, 96)"),
    "unsupported_model_type": (lambda p: edit_config(p, model_type="gpt2"),
                               "{model}/config.json: unsupported model_type='gpt2' "
                               "(accepted: llama, mistral, qwen2, qwen3)"),
    "unsupported_rope_scaling": (lambda p: edit_config(p, rope_scaling=dict(type="yarn", factor=4.0)),
                                 "{model}/config.json: unsupported rope_scaling.rope_type='yarn' "
                                 "(accepted: default, llama3)"),
    "tokenizer_without_eos": (no_eos, "{model}: no usable eos_token_id in generation_config.json, config.json "
                              "or eos_token in tokenizer_config.json"),
    "tokenizer_not_readable": (lambda p: truncate(p, "tokenizer.json"),
                               "{model}/tokenizer.json: not a readable tokenizers file"),
}

# name: (extra flags on good folders, exit status, the message expected)
FLAG_FAULTS = {
    "zero_batch_size": (["--batch-size", "0"], 2, "--batch-size must be at least 1, got 0"),
    "zero_save_every": (["--save-every", "0"], 2, "--save-every must be at least 1, got 0"),
    "warmup_not_below_steps": (["--warmup", "2"], 2, "--warmup 2 must be at least 0 and below --steps 2"),
    "max_length_below_template": (["--max-length", "24"], 1, "error: --max-length 24 is too short: "
                                  "max_length=24 leaves no room for text after the"),
}


def long_rows(n):
    """Pairs whose documents are 50 glosses long (hundreds of tokens) and whose queries are short."""
    return [dict(r, positive=" ".join([r["positive"]] * 50)) for r in wordnet_rows(n)]


# 4 steps with checkpoints at steps 2 and 4, EBD2Q and EBQ2D alternating: the kill comes in the
# second checkpoint, and a resumed run must redo steps 3 and 4 exactly
KILLED_RUN = ["--steps", "4", "--save-every", "2", "--log-every", "1", "--lr", "1e-3", "--warmup", "1",
              "--task-weights", "0.5", "0.5"]


@pytest.mark.parametrize("name", list(DATA_FAULTS))
def test_bad_data_folder(name, cli, tiny_model_dir, tmp_path):
    lines, message = DATA_FAULTS[name]
    folder = data_folder(str(tmp_path / "data"), lines)
    result = cli(*recon(tiny_model_dir, folder, tmp_path / "run", "--steps", "2"))
    message = message.format(folder=folder, file=os.path.join(folder, "nq.jsonl"))
    assert_clean_failure(result, 1, "error: " + message)


@pytest.mark.parametrize("name", list(MODEL_FAULTS))
def test_bad_model_folder(name, cli, tiny_model_dir, pairs8, tmp_path):
    breaks, message = MODEL_FAULTS[name]
    model = str(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    breaks(model)
    result = cli(*recon(model, pairs8, tmp_path / "run", "--steps", "2"))
    assert_clean_failure(result, 1, "error: " + message.format(model=model))


@pytest.mark.parametrize("name", list(FLAG_FAULTS))
def test_bad_flag(name, cli, tiny_model_dir, pairs8, tmp_path):
    """Values that would only fail deep inside the loop (a modulo by zero, an empty range, a template
    with no room for text at the first batch that embeds a query) are refused before any step."""
    flags, status, message = FLAG_FAULTS[name]
    assert_clean_failure(cli(*recon(tiny_model_dir, pairs8, tmp_path / "run", "--steps", "2", *flags)),
                         status, message)
    assert not os.path.exists(tmp_path / "run")


def test_long_texts_are_cut_and_counted(cli, tiny_model_dir, tmp_path):
    """Documents of hundreds of tokens with --max-length 128: each is cut to 128 ids ending in the
    EOS, and train.py counts them, once, at the end. Step 1 is EBD2Q (the 1 : 1 schedule), which
    embeds the 4 documents of its batch; step 2 EBQ2D, which regenerates 4 documents cut to 127
    target tokens: 8 cut texts."""
    tok, eos_ids = load_tokenizer(tiny_model_dir)
    fmt = TextFormat(tok, eos_ids, max_length=128)
    row = long_rows(1)[0]
    ids = fmt.embed_ids(row["positive"])
    assert len(fmt.ids(row["positive"])) > 2 * 128
    assert len(ids) == 128 and ids[-1] == fmt.eos_id and fmt.truncated == 1
    assert fmt.target_ids(row["query"]) == fmt.ids(row["query"]) and fmt.truncated == 1

    folder = data_folder(str(tmp_path / "long"), long_rows(8))
    code, out, err = cli(*recon(tiny_model_dir, folder, tmp_path / "run", "--steps", "2", "--max-length", "128",
                                "--log-every", "1"))
    assert code == 0 and "Traceback" not in err, err[-3000:]
    notes = re.findall(r"^note: (\d+) texts were longer than --max-length 128 tokens", out, re.M)
    assert notes == ["8"], out[-3000:]


# -----------------------------------------------------------------------------
# Interrupted runs


def test_kill_while_saving_keeps_the_previous_checkpoint(cli, tiny_model_dir, pairs8, tmp_path):
    run = str(tmp_path / "run")
    code, out, err = cli(*recon(tiny_model_dir, pairs8, run, *KILLED_RUN), fault="kill_in_second_save")
    assert code == -signal.SIGKILL, err[-3000:]
    assert "step 4/4" in out and f"saved {os.path.join(run, 'step-000002')}" in out

    # the half-written checkpoint exists only under its temporary name, and is not readable
    assert sorted(os.listdir(run)) == [".step-000004.tmp", "latest", "step-000002"]
    assert os.readlink(os.path.join(run, "latest")) == "step-000002"
    half = os.path.join(run, ".step-000004.tmp")
    assert sorted(os.listdir(half)) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(half)
    latest = checkpoint.latest(run)
    assert latest == os.path.join(run, "latest")
    load_model(latest)
    with open(os.path.join(latest, "meta.json")) as f:
        assert json.load(f)["step"] == 2
    os.symlink("step-000004", os.path.join(run, ".latest.tmp"))  # as a kill just before the commit point leaves it

    # resuming trusts only `latest`: it redoes steps 3 and 4 over the stale temporary files
    code, out, err = cli("--resume", run)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert f"resumed {run} at step 2/4" in out
    assert re.findall(r"^step (\d)/4 \|", out, re.M) == ["3", "4"]
    assert sorted(os.listdir(run)) == ["latest", "step-000004"]
    assert sorted(os.listdir(latest)) == ["1_Pooling", "2_Normalize", "config.json", "config_sentence_transformers.json",
                                          "generation_config.json", "meta.json", "model.safetensors", "modules.json",
                                          "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json",
                                          "train_state.pt"]

    whole = tmp_path / "whole"  # the same run, never interrupted
    code, _, err = cli(*recon(tiny_model_dir, pairs8, whole, *KILLED_RUN))
    assert code == 0, err[-3000:]
    want, got = tensors(whole / "latest"), tensors(latest)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    load_model(latest)


def test_second_ctrl_c_aborts_without_traceback(cli, tiny_model_dir, pairs8, tmp_path):
    """The first Ctrl-C asks for a save after the step (tests/test_train.py::test_ctrl_c_*); a
    second one, here while that save runs, aborts at once with exit status 130 (128 + SIGINT),
    naming the checkpoint that is still good."""
    run = str(tmp_path / "run")
    code, out, err = cli(*recon(tiny_model_dir, pairs8, run, "--steps", "5", "--save-every", "1"),
                         fault="ctrl_c_twice")
    assert "Traceback" not in err, err[-3000:]
    assert code == 130, err[-3000:]
    assert "interrupt: finishing this step" in err
    assert f"interrupt: aborted without saving. Last saved checkpoint: {os.path.join(run, 'step-000001')}" in err
    assert os.readlink(os.path.join(run, "latest")) == "step-000001"
    load_model(os.path.join(run, "latest"))


# -----------------------------------------------------------------------------
# Faults of the machine: a full disk, a read-only folder, memory running out


@contextlib.contextmanager
def mounted(target, *options):
    """Mounts over `target` for the test (root, or a user namespace that allows it), else skips."""
    os.makedirs(target, exist_ok=True)
    done = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def assert_previous_checkpoint_kept(run, step):
    assert os.readlink(os.path.join(run, "latest")) == f"step-{step:06d}"
    assert sorted(os.listdir(run)) == ["latest", f"step-{step:06d}"]  # no partial folder left
    load_model(checkpoint.latest(run))
    with open(os.path.join(run, "latest", "meta.json")) as f:
        assert json.load(f)["step"] == step


def test_full_disk_ends_the_run_and_keeps_the_previous_checkpoint(cli, tiny_model_dir, pairs8, tmp_path):
    """A 2 MB disk holds one checkpoint of the tiny model (1.25 MB) but not a second beside it:
    the second save fails for real (ENOSPC), the run ends with one line naming the folder and
    the cause, the partial folder is gone and `latest` is the first checkpoint."""
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=2m", "tmpfs") as disk:
        run = str(disk / "run")
        code, out, err = cli(*recon(tiny_model_dir, pairs8, run, "--steps", "2", "--save-every", "1"))
        assert "Traceback" not in err and code == 1, err[-3000:]
        assert f"saved {os.path.join(run, 'step-000001')}" in out
        assert err.strip().splitlines() == [
            f"error: cannot write checkpoint {os.path.join(run, 'step-000002')}: No space left on device. "
            f"The previous checkpoint is kept: {os.path.join(run, 'step-000001')}"]
        assert_previous_checkpoint_kept(run, 1)


def test_read_only_folder_ends_the_run_and_keeps_the_previous_checkpoint(cli, tiny_model_dir, pairs8, tmp_path):
    """A run stops after step 1; its folder turns read-only (a read-only bind mount as root, the
    write bits removed otherwise); --resume trains step 2 and fails to save it, with one line."""
    run = str(tmp_path / "run")
    code, _, err = cli(*recon(tiny_model_dir, pairs8, run, "--steps", "2", "--stop-after", "1"))
    assert code == 0, err[-3000:]
    if os.geteuid() == 0:
        guard = mounted(run, "--bind", "-o", "ro", run)
        cause = "Read-only file system"
    else:
        os.chmod(run, 0o555)
        guard = contextlib.nullcontext()
        cause = "Permission denied"
    try:
        with guard:
            code, out, err = cli("--resume", run)
            assert "Traceback" not in err and code == 1, err[-3000:]
            assert "step 2/2" in out
            assert err.strip().splitlines() == [
                f"error: cannot write checkpoint {os.path.join(run, 'step-000002')}: {cause}. "
                f"The previous checkpoint is kept: {os.path.join(run, 'latest')}"]
            assert_previous_checkpoint_kept(run, 1)
    finally:
        os.chmod(run, 0o755)


def test_out_of_memory_names_the_flags_that_lower_it(cli, tiny_model_dir, tmp_path):
    """A Stage II step over 96 texts of hundreds of tokens in one pass (--chunk: tokens per pass), with 150 MB of address
    space to spare: the allocation fails for real, and the run ends with the flags that need less."""
    folder = data_folder(str(tmp_path / "long"), long_rows(32))
    code, out, err = cli("--stage", "contrastive", "--model", tiny_model_dir, "--data", folder, "--batch-size", "32",
                         "--chunk", "100000", "--max-length", "512", "--dtype", "float32", "--out", tmp_path / "run",
                         "--steps", "2", fault="memory_limit")
    assert "Traceback" not in err and code == 1, err[-3000:]
    assert re.fullmatch(r"error: out of memory at step 1 \(.*can't allocate memory.*\); lower the memory a step "
                        r"needs with --batch-size, --chunk \(Stage II\), --grad-ckpt or --max-length\. "
                        r"Last saved checkpoint: none yet", err.strip()), err[-3000:]
    assert not os.path.exists(tmp_path / "run")
