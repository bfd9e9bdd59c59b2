"""bireco's Stage II step on the tiny model in fp64: passes with the least padding
(token_chunks), the cached step equal to the plain one (loss and every gradient, with and without
LoRA), and its replay of the dropout masks."""

import math
import random

import pytest
import torch

import bireco
import train
from bireco import contrastive_loss, embed
from data import TextFormat, load_pairs, pad
from model import load_model, load_tokenizer


@pytest.fixture(scope="module")
def fmt(tiny_model_dir):
    tok, eos_ids = load_tokenizer(tiny_model_dir)
    return TextFormat(tok, eos_ids)


@pytest.fixture(scope="module")
def batch(tiny_data_dir):
    return load_pairs(tiny_data_dir)["wordnet"][:4]  # 4 queries, 4 positives, 4 negatives


def reference_step(model, fmt, batch, chunk, temperature=0.02):
    """The definition the cached step must equal: the same forward passes (the same chunks, so
    dropout draws the same masks in the same order) in one autograd graph, one backward.
    chunk >= the batch's padded size is the plain, unchunked step."""
    items = ([(p.instruction, p.query) for p in batch] + [(None, p.positive) for p in batch]
             + [(None, p.negative) for p in batch])
    seqs = [fmt.embed_ids(text, instruction) for instruction, text in items]
    chunks = bireco.token_chunks([len(s) for s in seqs], chunk)
    reps = torch.cat([embed(model, *pad([seqs[i] for i in c], fmt.pad_id), fmt.eos_id) for c in chunks])
    reps = reps[torch.tensor([i for c in chunks for i in c]).argsort()]
    B = len(batch)
    loss, _ = contrastive_loss(reps[:B], reps[B:2 * B], reps[2 * B:], temperature)
    loss.backward()
    return loss.item()


def test_token_chunks_by_hand():
    """Lengths 5 30 10 12 8 (sorted 5 8 10 12 30). Budget 160, a pass costing 160 // 16 = 10 tokens:
    [5 8 10 12] [30] pads to 4 x 12 + 30 = 78, +20 for two passes = 98; one pass 5 x 30 + 10 = 160;
    [5 8 10] [12] [30] 30 + 12 + 30 + 30 = 102. Budget 40 (a pass costs 2): each text alone, and
    nothing over the budget but a text longer than it. A huge budget: one pass. As indices."""
    assert bireco.token_chunks([5, 30, 10, 12, 8], 160) == [[0, 4, 2, 3], [1]]
    assert bireco.token_chunks([5, 30, 10, 12, 8], 40) == [[0], [4], [2], [3], [1]]
    assert bireco.token_chunks([5, 30, 10, 12, 8], 10 ** 6) == [[0, 4, 2, 3, 1]]
    assert bireco.token_chunks([50], 40) == [[0]]
    assert bireco.token_chunks([], 40) == []


def test_token_chunks_least_padding():
    """Against every way of cutting the sorted texts (brute force over the cut points): no cheaper
    split exists within the budget."""
    import itertools
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(1, 8))]
        budget = rng.randint(16, 64)
        cost = lambda passes: sum(len(c) * max(lengths[i] for i in c) + budget // 16 for c in passes)
        got = bireco.token_chunks(lengths, budget)
        assert sorted(i for c in got for i in c) == list(range(len(lengths)))
        assert all(len(c) * max(lengths[i] for i in c) <= budget or len(c) == 1 for c in got)
        order, best = sorted(range(len(lengths)), key=lengths.__getitem__), math.inf
        for cuts in itertools.product([0, 1], repeat=len(lengths) - 1):
            passes, cur = [], [order[0]]
            for cut, i in zip(cuts, order[1:]):
                if cut:
                    passes.append(cur)
                    cur = []
                cur.append(i)
            passes.append(cur)
            if all(len(c) * max(lengths[i] for i in c) <= budget or len(c) == 1 for c in passes):
                best = min(best, cost(passes))
        assert cost(got) == best, (lengths, budget, got)


def grads(model):
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def assert_same_grads(got, want):
    assert got.keys() == want.keys()
    assert any(g is not None for g in want.values())
    for k in want:
        assert (got[k] is None) == (want[k] is None), k
        if want[k] is not None:
            assert want[k].abs().max() > 0, k
            # fp64: an identity holds to rounding whatever order the CPU's kernels sum in
            torch.testing.assert_close(got[k], want[k], atol=1e-12, rtol=1e-9, msg=lambda m, k=k: f"{k}: {m}")


def lora_model(path, dropout, seed=0):
    model = load_model(path, dtype=torch.float64)
    torch.manual_seed(seed)
    train.add_lora(model, rank=4, alpha=8.0, dropout=dropout)
    with torch.no_grad():  # B = 0 at init would give lora_A no gradient at all
        for k, p in model.named_parameters():
            if k.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model.train()


def cached(model, fmt, batch, chunk, scale=1.0):
    loss, negatives = bireco.contrastive_step(model, fmt, batch, chunk, temperature=0.02, scale=scale)
    assert negatives == 7
    return loss


@pytest.mark.parametrize("lora", [False, True])
# the 12 texts pad to 630-700 tokens in several passes, 1,020 in one: the cached step with 10 and 5
# passes, the plain step with 3 passes, and with one
@pytest.mark.parametrize("chunk", [100, 300, 800, 10 ** 6])
def test_cached_step_equals_plain(lora, chunk, tiny_model_dir, fmt, batch):
    """Without dropout, the cached step's loss and every parameter's gradient equal the plain
    step's (one forward over all 12 texts, one backward), whatever the chunking."""
    lengths = [len(fmt.embed_ids(t, i)) for p in batch for i, t in ((p.instruction, p.query), (None, p.positive),
                                                                    (None, p.negative))]
    chunks = bireco.token_chunks(lengths, chunk)
    assert (len(chunks) > 1, bireco.padded_size(lengths, chunks) > chunk) == {
        100: (True, True), 300: (True, True), 800: (True, False), 10 ** 6: (False, False)}[chunk]
    model = lora_model(tiny_model_dir, dropout=0.0) if lora else load_model(tiny_model_dir, dtype=torch.float64).train()
    want_loss = reference_step(model, fmt, batch, chunk=10 ** 6)
    want = grads(model)
    model.zero_grad(set_to_none=True)
    got_loss = cached(model, fmt, batch, chunk)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    assert_same_grads(grads(model), want)
    if lora:  # the base weights stay frozen
        assert all(p.grad is None for k, p in model.named_parameters() if ".lora_" not in k)
    model.zero_grad(set_to_none=True)
    cached(model, fmt, batch, chunk, scale=0.25)  # gradient accumulation scales the gradient only
    assert_same_grads(grads(model), {k: None if g is None else g * 0.25 for k, g in want.items()})


@pytest.mark.parametrize("chunk", [100, 300, 800])
def test_cached_step_replays_dropout_masks(chunk, tiny_model_dir, fmt, batch):
    """With LoRA dropout on, chunking changes the masks drawn (their shapes follow the chunk), so
    a chunked step is not the one-pass step. What is guaranteed: pass 2 replays the masks of pass 1, so
    the cached step equals the same chunked forward kept in one autograd graph, from the same RNG
    state, and leaves the RNG where that forward leaves it (800: the plain step in 3 passes is that
    forward)."""
    model = lora_model(tiny_model_dir, dropout=0.3)
    torch.manual_seed(1)
    want_loss = reference_step(model, fmt, batch, chunk)
    want, want_rng = grads(model), torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    got_loss = cached(model, fmt, batch, chunk)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    assert_same_grads(grads(model), want)
    assert torch.equal(torch.get_rng_state(), want_rng)

    # the masks matter: other masks (another seed) give another gradient, so the match above is
    # not one that any masks would pass
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    cached(model, fmt, batch, chunk)
    other = grads(model)
    assert any(not torch.allclose(other[k], want[k], atol=1e-4) for k in want if want[k] is not None)
