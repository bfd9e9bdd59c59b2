"""A checkpoint is an embedder other tools load as it is: sentence-transformers gives the vectors
Embedder gives (queries with their instruction, documents without, either padding side), and
mteb scores it through sentence-transformers as eval.py scores it through Embedder."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import bireco
import data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
st = pytest.importorskip("sentence_transformers")


def held_out(n):
    pairs = data.split_pairs(os.path.join(ROOT, "wordnet", "validation"), data.INSTRUCTIONS["wordnet"], n)
    pairs += data.split_pairs(os.path.join(ROOT, "manpages", "validation"), data.INSTRUCTIONS["manpages"], n)
    return [p.query for p in pairs], [p.positive for p in pairs]


def same_vectors(folder, queries, documents, instruction="Define the word as the sentence uses it"):
    """Cosine of Embedder's and SentenceTransformer's vector for every text, both padding sides."""
    ours = bireco.Embedder.from_pretrained(folder)
    want_q, want_d = ours.encode(queries, instruction), ours.encode(documents)
    model = st.SentenceTransformer(folder, device="cpu")
    cosines = []
    for side in ("right", "left"):
        model.tokenizer.padding_side = side
        got_q = model.encode(queries, prompt=f"Instruct: {instruction}\nQuery: ", batch_size=8)
        got_d = model.encode(documents, batch_size=8)
        cosines += [(want_q * got_q).sum(1), (want_d * got_d).sum(1)]
    return np.concatenate(cosines)


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """A train.py Stage II checkpoint of the tiny model (LoRA merged on save)."""
    out = tmp_path_factory.mktemp("st") / "run"
    train.main(["--stage", "contrastive", "--model", tiny_model_dir, "--data", tiny_data_dir, "--steps", "1",
                "--batch-size", "4", "--dtype", "float32", "--out", str(out)])
    return str(out / "latest")


def test_checkpoint_loads_in_sentence_transformers(checkpoint):
    """Every text of a batch that mixes lengths: the same vector through both libraries."""
    queries, documents = held_out(4)
    cos = same_vectors(checkpoint, queries, documents)
    assert cos.min() > 0.9999, cos


def test_checkpoint_still_tokenizes_as_its_base(checkpoint, tiny_model_dir):
    """The post-processor written for sentence-transformers holds the template TextFormat adds, so
    our own loader builds the same ids from the checkpoint as from the base model."""
    fmt = {path: data.TextFormat(*bireco.load_tokenizer(path)) for path in (tiny_model_dir, checkpoint)}
    a, b = fmt.values()
    assert a.head == b.head and a.eos_id == b.eos_id
    for text, instruction in (("he signed the deed", "Find it"), ("a long text " * 9, None)):
        assert a.embed_ids(text, instruction) == b.embed_ids(text, instruction)


def test_named_prompts_follow_the_eval_convention(checkpoint):
    """mteb's prompt keys: a bundled task's queries get its training instruction, its documents none."""
    model = st.SentenceTransformer(checkpoint, device="cpu")
    instruction = data.INSTRUCTIONS["manpages"]
    assert model.prompts["ManPageRetrieval-query"] == f"Instruct: {instruction}\nQuery: "
    assert model.prompts["ManPageRetrieval-document"] == ""
    assert model.similarity_fn_name == "cosine"
    ours = bireco.Embedder.from_pretrained(checkpoint)
    queries, _ = held_out(2)
    got = model.encode(queries, prompt_name="ManPageRetrieval-query")
    assert ((ours.encode(queries, instruction) * got).sum(1) > 0.9999).all()


def test_real_smollm2_through_the_export_command(tmp_path):
    """`python data.py OUT` exports the embedded SmolLM2; sentence-transformers then embeds
    WordNet and man-page texts as Embedder does."""
    from smollm2 import default_model_dir

    out = tmp_path / "smollm2-st"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(out / "modules.json") and os.path.isfile(out / "model.safetensors")
    queries, documents = held_out(4)
    torch.set_num_threads(min(2, os.cpu_count()))
    cos = same_vectors(str(out), queries, documents)
    assert cos.min() > 0.9999, cos
    base = bireco.Embedder.from_pretrained(default_model_dir())  # the copy embeds as the original
    np.testing.assert_allclose(base.encode(documents), bireco.Embedder.from_pretrained(str(out)).encode(documents),
                               atol=1e-6)
    shutil.rmtree(out)
