"""Shared fixtures: a tiny random Llama-shaped checkpoint with a real (tiny) byte-level BPE
tokenizer in ChatML format (experiments/tiny.py, which the GPU check builds too), and a tiny data
folder cut from the bundled WordNet pairs."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from tiny import left_pad, make_tiny_checkpoint, wordnet_rows  # noqa: E402, F401  (tests use them)


def make_data_dir(path, n=64, name="wordnet"):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"{name}.jsonl"), "w") as f:
        for r in wordnet_rows(n):
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data") / "pairs")
