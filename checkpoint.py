"""
Checkpoints of a training run: written so that a crash costs at most the steps since the last one,
read back so that a resumed run continues bit for bit.

  <run>/step-000100/  model.safetensors + config.json (a plain HF model folder, LoRA merged in),
                      the tokenizer files, the sentence-transformers files (data.py), meta.json
                      (the run's settings and data position, the git commit) and train_state.pt
                      (optimizer, data position, trained adapters, the state of every RNG)
  <run>/latest -> step-000100

A checkpoint is written under a hidden name, renamed to step-NNNNNN when complete, and published by
renaming a fresh `latest` link over the old one. A rename is atomic, so at every instant `latest`
names a whole checkpoint: a kill at any point leaves the previous one, which is deleted only after
the new one is published. A write that fails (disk full, read-only folder) removes what it wrote
and raises SaveError naming the folder and the cause. Ctrl-C asks the loop to finish its step and
save before it exits. train.py decides what goes in; this file writes a checkpoint, finds a run's
latest and restores the training state from it. Left out: keeping the last k checkpoints,
asynchronous writes.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import torch
from safetensors import SafetensorError

import hardware
from data import TextFormat, save_sentence_transformers
from model import load_tokenizer, save_model

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")


class SaveError(Exception):
    """A checkpoint could not be written (disk full, permission denied, read-only folder)."""


def git_commit() -> str | None:
    """The code's commit, recorded in meta.json: which version of the code wrote a checkpoint."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def rng_state():
    """Every RNG a step may draw from in this process (LoRA's and the decoder's dropout masks):
    Python's, numpy's, torch's CPU one and the CUDA ones."""
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def rng_states():
    """rng_state() of every process: under torchrun each rank's (their dropout masks differ)."""
    if hardware.WORLD == 1:
        return rng_state()
    return {"ranks": hardware.gather_objects(rng_state())}  # torch's states: CPU byte tensors


def set_rng_state(saved):
    py_rng, np_rng, torch_rng, cuda_rng = saved
    random.setstate(py_rng)
    np.random.set_state(np_rng)
    torch.set_rng_state(torch_rng.cpu())
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([r.cpu() for r in cuda_rng])


def save(run: str, step: int, model, weights: dict, state: dict, meta: dict,
         base_model: str) -> str:
    """Writes <run>/step-NNNNNN: `weights` (a state dict under HF names) as the model folder with
    base_model's tokenizer files, `state` as train_state.pt, `meta` (plus the git commit) as
    meta.json; then points <run>/latest at it and returns its path. On an OSError the partial
    folder is removed, `latest` still names the previous checkpoint, and SaveError says why."""
    name = f"step-{step:06d}"
    final, tmp = os.path.join(run, name), os.path.join(run, f".{name}.tmp")
    try:
        _write(tmp, model, weights, state, {**meta, "git_commit": git_commit()}, base_model)
        return _publish(run, name, tmp, final)
    except (OSError, SafetensorError) as e:  # safetensors reports the OS error in its own type
        cause = str(e).split("I/O error: ")[-1]
        cause = e.strerror if isinstance(e, OSError) and e.strerror else cause
        latest = os.path.join(run, "latest")
        published = os.path.islink(latest) and os.readlink(latest) == name  # then keep `final`
        for partial in [tmp, os.path.join(run, ".latest.tmp")] + [final] * (not published):
            if os.path.islink(partial):
                os.remove(partial)
            else:
                shutil.rmtree(partial, ignore_errors=True)
        raise SaveError(f"cannot write checkpoint {final}: {cause}") from None


def _write(folder, model, weights, state, meta, base_model):
    shutil.rmtree(folder, ignore_errors=True)  # a leftover of a run killed while saving
    save_model(model, folder, weights)
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(base_model, f)):
            shutil.copy(os.path.join(base_model, f), folder)
    tokenizer, eos_ids = load_tokenizer(folder)  # each checkpoint: a sentence-transformers folder
    save_sentence_transformers(folder, TextFormat(tokenizer, eos_ids), model.config.hidden_size)
    with open(os.path.join(folder, "train_state.pt"), "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch's zip writer hides a failed write's OSError in its own
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def _publish(run, name, tmp, final):
    """The complete folder `tmp` becomes <run>/<name> and <run>/latest points at it."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link = os.path.join(run, ".latest.tmp")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(name, link)
    latest = os.path.join(run, "latest")
    previous = os.readlink(latest) if os.path.islink(latest) else None
    os.replace(link, latest)  # the commit point: before it the old checkpoint, after it the new one
    if previous not in (None, name):
        shutil.rmtree(os.path.join(run, previous), ignore_errors=True)
    return final


def restore(path: str, model, opt, batches):
    """Puts the state saved in checkpoint `path` back: the trained parameters (a full fine-tune's
    are in the weights it was loaded from; LoRA's adapters are here), the optimizer, the data
    position and this process's RNGs. ValueError if it was saved by another number of processes."""
    device = model.lm_head.weight.device
    state = torch.load(os.path.join(path, "train_state.pt"), map_location=device,
                       weights_only=False)  # holds numpy's and Python's RNG states
    saved = len(state["rng"]["ranks"]) if isinstance(state["rng"], dict) else 1
    if saved != hardware.WORLD:
        raise ValueError(f"{path} was saved by {saved} process(es); resume it with as many "
                         f"(torchrun --nproc_per_node={saved}), not {hardware.WORLD}")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state["trainable"].items():
            named[k].copy_(v)
    opt.load_state_dict(state["opt"])
    batches.load_state_dict(state["data"])
    set_rng_state(state["rng"]["ranks"][hardware.RANK] if saved > 1 else state["rng"])


def latest(run: str) -> str:
    """<run>/latest, the run's newest complete checkpoint; FileNotFoundError if it has none."""
    path = os.path.join(run, "latest")
    if not os.path.isfile(os.path.join(path, "train_state.pt")):
        raise FileNotFoundError(f"{run} holds no checkpoint to resume from (no "
                                f"{path}/train_state.pt)")
    return path


def on_ctrl_c(saved) -> list:
    """Ctrl-C finishes the current step, saves and exits; a second Ctrl-C aborts at once. Returns
    the list the handler appends to; saved() names the last checkpoint."""
    stop = []

    def handler(sig, frame):
        if stop:  # exit status 130 = 128 + SIGINT, as for a process killed by Ctrl-C
            print(f"\ninterrupt: aborted without saving. Last saved checkpoint: {saved()}",
                  file=sys.stderr)
            sys.exit(130)
        stop.append(sig)
        print("\ninterrupt: finishing this step, then saving (Ctrl-C again: abort without saving)",
              file=sys.stderr)
    signal.signal(signal.SIGINT, handler)
    return stop
