"""bireco.py against hand computations on the tiny model in fp64 (so identities hold to 1e-9
whatever kernels the CPU picks): [EOS] pooling under any padding,
the Stage I reconstruction loss and its gradient path, the Stage II contrastive loss, the
reconstruction gap diagnostic and the inference Embedder."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import left_pad, wordnet_rows

import bireco
from data import Pair, TextFormat, pad
from model import load_model, load_tokenizer

TOL = dict(rtol=1e-9, atol=1e-9)  # fp64 identities; fp32 results get their own tolerances


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def fmt(tiny_model_dir):
    tok, eos_ids = load_tokenizer(tiny_model_dir)
    return TextFormat(tok, eos_ids)


@pytest.fixture(scope="module")
def rows():
    return wordnet_rows(8)


def alone(model, ids):
    """Final hidden states of one unpadded sequence, no mask at all: (T, D)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


# -----------------------------------------------------------------------------
# Embeddings


def test_pooling_ignores_padding_and_batch(model, fmt, rows):
    """E(text) is the same alone, in a batch of longer texts, left- or right-padded."""
    short = fmt.embed_ids(rows[2]["query"])
    longer = [fmt.embed_ids(r["positive"]) for r in rows[:3]] + [fmt.embed_ids(rows[3]["negative"])]
    assert all(len(s) > len(short) + 5 for s in longer)
    want = alone(model, short)[-1]
    seqs = longer[:2] + [short] + longer[2:]
    with torch.no_grad():
        for ids, mask in (pad(seqs, fmt.pad_id), left_pad(seqs, fmt.pad_id)):
            e = bireco.embed(model, ids, mask, fmt.eos_id)
            torch.testing.assert_close(e[2], want, **TOL)
            for i, s in enumerate(seqs):  # every row, not only the short one
                torch.testing.assert_close(e[i], alone(model, s)[-1], **TOL)
    emb = bireco.Embedder(model, fmt, normalize=False)
    texts = [rows[0]["positive"], rows[2]["query"], rows[1]["negative"]]
    np.testing.assert_allclose(emb.encode(texts)[1], emb.encode([rows[2]["query"]])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(emb.encode([rows[2]["query"]])[0], want.numpy(), rtol=1e-5, atol=1e-5)


def test_embed_refuses_a_non_eos_last_token(model, fmt):
    """The EOS guard catches ids whose last real token is not the EOS."""
    ids, mask = pad([fmt.ids("no end of turn here")], fmt.pad_id)
    with pytest.raises(AssertionError, match="not EOS"):
        bireco.embed(model, ids, mask, fmt.eos_id)


def test_mean_pooling_is_a_masked_mean(model, fmt, rows):
    """The mean-pooling ablation averages each text's real positions only, as run alone."""
    seqs = [fmt.embed_ids(r["query"]) for r in rows[:4]]
    with torch.no_grad():
        for ids, mask in (pad(seqs, fmt.pad_id), left_pad(seqs, fmt.pad_id)):
            e = bireco.embed(model, ids, mask, pooling="mean")
            for i, s in enumerate(seqs):
                torch.testing.assert_close(e[i], alone(model, s).mean(0), **TOL)


def test_embedder_shape_order_and_norm(model, fmt, rows):
    """encode returns float32 (N, D) in input order despite length sorting; normalize=True
    gives unit rows equal to the normalised one-by-one embeddings."""
    texts = [r[k] for r in rows[:4] for k in ("query", "positive")]  # lengths not sorted
    raw = bireco.Embedder(model, fmt, normalize=False)
    one_by_one = np.concatenate([raw.encode([t]) for t in texts])
    out = raw.encode(texts, batch_size=3)
    assert out.dtype == np.float32 and out.shape == (len(texts), model.config.hidden_size)
    np.testing.assert_allclose(out, one_by_one, rtol=1e-5, atol=1e-5)
    unit = bireco.Embedder(model, fmt, normalize=True).encode(texts, batch_size=3)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit, one_by_one / np.linalg.norm(one_by_one, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-5)
    instructed = raw.encode(texts[:2], instruction="Find the definition")
    assert not np.allclose(instructed, out[:2], atol=1e-3)  # the instruction reaches the model


# -----------------------------------------------------------------------------
# Stage I: reconstruction loss


def hand_loss_sum(model, anchor, y):
    """Summed next-token cross-entropy of y (list of ids) after anchor (D,), from one unpadded
    sequence [anchor, y_1 .. y_(n-1)] with no mask and full logits."""
    tok = model.model.embed_tokens(torch.tensor(y[:-1], dtype=torch.long))  # (n-1, D)
    x = torch.cat([anchor[None], tok])[None]  # (1, n, D)
    logits = model.lm_head(model(inputs_embeds=x))[0]  # (n, V)
    return F.cross_entropy(logits, torch.tensor(y), reduction="sum")


def anchors_and_targets(model, fmt, rows):
    with torch.no_grad():
        anchor = bireco.embed_texts(model, fmt, [(None, r["positive"]) for r in rows])
    return anchor, [fmt.target_ids(r["query"]) for r in rows]


def test_reconstruction_loss_matches_hand_computation(model, fmt, rows):
    """One row equals the unpadded hand computation; a batch equals the token-weighted mean of
    its rows; a much longer extra row (more padding for the others) changes no row's part."""
    anchor, ys = anchors_and_targets(model, fmt, rows[:4])
    assert len({len(y) for y in ys}) > 1
    with torch.no_grad():
        hand = [hand_loss_sum(model, anchor[i], y) for i, y in enumerate(ys)]
        t, m = pad(ys[:1], fmt.pad_id)
        one = bireco.reconstruction_loss(model, anchor[:1], t, m)
        torch.testing.assert_close(one, hand[0] / len(ys[0]), **TOL)

        n = sum(len(y) for y in ys)
        t, m = pad(ys, fmt.pad_id)
        loss = bireco.reconstruction_loss(model, anchor, t, m)
        torch.testing.assert_close(loss, sum(hand) / n, **TOL)

        long_y = fmt.target_ids(" ".join(r["positive"] for r in rows))
        assert len(long_y) > 3 * max(len(y) for y in ys)
        long_anchor = torch.randn(1, anchor.shape[1], dtype=anchor.dtype)
        t, m = pad(ys + [long_y], fmt.pad_id)
        extended = bireco.reconstruction_loss(model, torch.cat([anchor, long_anchor]), t, m)
        long_part = hand_loss_sum(model, long_anchor[0], long_y)
        torch.testing.assert_close(extended * (n + len(long_y)), sum(hand) + long_part, **TOL)
        torch.testing.assert_close(extended * (n + len(long_y)) - long_part, loss * n, rtol=1e-5, atol=1e-3)


def test_stage1_loss_tasks(model, fmt, rows):
    """stage1_loss "q2d" regenerates the positive from E(instructed query), "d2q" the query text
    (no instruction) from E(positive); it returns the number of target tokens."""
    pairs = [Pair(r["query"], r["positive"], None, "Find the definition") for r in rows[:3]]
    with torch.no_grad():
        for task, src, tgt in (("q2d", lambda p: (p.instruction, p.query), lambda p: p.positive),
                               ("d2q", lambda p: (None, p.positive), lambda p: p.query)):
            loss, n = bireco.stage1_loss(model, fmt, pairs, task)
            hand = [hand_loss_sum(model, bireco.embed_texts(model, fmt, [src(p)])[0], fmt.target_ids(tgt(p)))
                    for p in pairs]
            assert n == sum(len(fmt.target_ids(tgt(p))) for p in pairs)
            torch.testing.assert_close(loss, sum(hand) / n, **TOL)
    with pytest.raises(ValueError, match="unknown Stage I task"):
        bireco.stage1_loss(model, fmt, pairs, "both")


def test_stage1_sum_loss_is_the_weighted_sum(model, fmt, rows):
    """stage1_sum_loss (one output-layer pass for both tasks) equals 0.8 L_D2Q + 0.2 L_Q2D taken
    task by task, in value and in every gradient, and reports each task's own loss."""
    pairs = [Pair(r["query"], r["positive"], None, "Find the definition") for r in rows[:3]]
    params = list(model.parameters())
    weights = dict(d2q=0.8, q2d=0.2)
    total, logs = bireco.stage1_sum_loss(model, fmt, pairs, weights)
    got = torch.autograd.grad(total, params)
    parts = {task: bireco.stage1_loss(model, fmt, pairs, task) for task in weights}
    want_total = sum(w * parts[task][0] for task, w in weights.items())
    want = torch.autograd.grad(want_total, params)
    torch.testing.assert_close(total, want_total, **TOL)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    for task in weights:
        assert logs[task][1] == parts[task][1]
        assert logs[task][0] == pytest.approx(parts[task][0].item(), rel=1e-5)


def test_padded_targets_carry_no_loss(model, fmt, rows):
    """Ids at padded target positions (mask False) do not change the loss."""
    anchor, ys = anchors_and_targets(model, fmt, rows[:4])
    t, m = pad(ys, fmt.pad_id)
    assert (~m).sum() > 5
    other = t.clone()
    other[~m] = torch.randint(0, model.config.vocab_size, (int((~m).sum()),))
    with torch.no_grad():
        torch.testing.assert_close(bireco.reconstruction_loss(model, anchor, other, m),
                                   bireco.reconstruction_loss(model, anchor, t, m), rtol=0, atol=1e-6)


def test_chunked_cross_entropy_equals_unchunked(model, fmt, rows):
    """Logits in chunks of 3 give the same loss and gradients as one chunk."""
    anchor, ys = anchors_and_targets(model, fmt, rows[:3])
    t, m = pad(ys, fmt.pad_id)
    params = list(model.parameters())
    results = []
    for chunk in (3, 10**6):
        a = anchor.clone().requires_grad_(True)
        loss = bireco.reconstruction_loss(model, a, t, m, chunk=chunk)
        results.append((loss.detach(), torch.autograd.grad(loss, [a] + params)))
    (l3, g3), (l1, g1) = results
    torch.testing.assert_close(l3, l1, **TOL)
    for x, y in zip(g3, g1):
        torch.testing.assert_close(x, y, **TOL)
    assert g3[0].abs().sum() > 0


class _Head(torch.nn.Module):  # what target_cross_entropy reads of a model: lm_head
    def __init__(self, weight):
        super().__init__()
        self.lm_head = torch.nn.Module()
        self.lm_head.weight = weight


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_target_cross_entropy_gradients_equal_autograd(dtype, weighted):
    """The gradients taken inside the forward pass equal autograd's through full logits, scaled by
    the incoming gradient (here 0.3), with per-row weights or without, in chunks that do not
    divide N; the per-row losses are the plain cross-entropies."""
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(13, 8, generator=g), torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (13,), generator=g)
    rw = torch.rand(13, generator=g) if weighted else None
    sides = []
    for fused in (True, False):
        h = h0.to(dtype).requires_grad_(True)
        w = torch.nn.Parameter(w0.to(dtype))
        if fused:
            loss, rows = bireco.target_cross_entropy(_Head(w), h, y, rw, chunk=5)
        else:
            logits = F.linear(h, w)
            rows = F.cross_entropy(logits if dtype == torch.float64 else logits.float(), y, reduction="none")
            loss = rows.sum() if rw is None else (rows * rw).sum()
        (0.3 * loss).backward()
        sides.append((loss.detach(), rows.detach(), h.grad.float(), w.grad.float()))
    tol = TOL if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for ours, ref in zip(*sides):
        torch.testing.assert_close(ours, ref, **tol)
    assert sides[0][2].abs().sum() > 0 and sides[0][3].abs().sum() > 0


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
def test_target_cross_entropy_under_autocast(h_dtype):
    """Under bf16 autocast with fp32 weights (train.py --dtype bfloat16) the loss and gradients
    match autograd's under the same autocast, and each gradient has its tensor's dtype."""
    g = torch.Generator().manual_seed(1)
    h0, w0 = torch.randn(13, 8, generator=g).to(h_dtype), torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (13,), generator=g)
    sides = []
    for fused in (True, False):
        h, w = h0.clone().requires_grad_(True), torch.nn.Parameter(w0.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = bireco.target_cross_entropy(_Head(w), h, y, chunk=5)[0]
            else:
                loss = F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")
        loss.backward()
        assert h.grad.dtype == h_dtype and w.grad.dtype == torch.float32
        sides.append((loss.detach(), h.grad.float(), w.grad))
    for ours, ref in zip(*sides):
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=3e-2)


def test_target_cross_entropy_frozen_weight_no_grad_and_retain_graph():
    """A frozen lm_head gets no gradient (h still does); without autograd only the loss is
    computed; a second backward through one loss is refused with a clear error."""
    h0, w = torch.randn(7, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    y = torch.arange(7)
    want = F.cross_entropy(F.linear(h0, w), y, reduction="sum")
    h = h0.clone().requires_grad_(True)
    loss = bireco.target_cross_entropy(_Head(w), h, y, chunk=3)[0]
    torch.testing.assert_close(loss, want, **TOL)
    loss.backward(retain_graph=True)
    ref = h0.clone().requires_grad_(True)
    F.cross_entropy(F.linear(ref, w), y, reduction="sum").backward()
    torch.testing.assert_close(h.grad, ref.grad, **TOL)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    with torch.no_grad():
        loss = bireco.target_cross_entropy(_Head(torch.nn.Parameter(w)), h, y)[0]
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, want, **TOL)


def test_gradient_reaches_the_encoder_through_the_anchor(model, fmt, rows):
    """With the anchor attached, the loss has a gradient w.r.t. the anchor and the encoder's input
    embeddings, and the parameter gradient is the detached one plus the chain rule through the
    anchor; with anchor.detach() the encoder inputs get exactly no gradient."""
    pairs = rows[:3]
    ids, mask = pad([fmt.embed_ids(r["positive"]) for r in pairs], fmt.pad_id)
    t, m = pad([fmt.target_ids(r["query"]) for r in pairs], fmt.pad_id)
    params = list(model.parameters())

    anchor = bireco.embed(model, ids, mask, fmt.eos_id)
    loss = bireco.reconstruction_loss(model, anchor, t, m)
    g_anchor, *g_attached = torch.autograd.grad(loss, [anchor] + params)
    assert g_anchor.abs().sum() > 0
    anchor = bireco.embed(model, ids, mask, fmt.eos_id)
    g_detached = torch.autograd.grad(bireco.reconstruction_loss(model, anchor.detach(), t, m), params)
    g_through = torch.autograd.grad((anchor * g_anchor).sum(), params, allow_unused=True)
    differs = False
    for att, det, thr in zip(g_attached, g_detached, g_through):
        thr = torch.zeros_like(att) if thr is None else thr
        torch.testing.assert_close(att, det + thr, rtol=1e-4, atol=1e-6)
        differs |= not torch.allclose(att, det, rtol=1e-3, atol=1e-6)
    assert differs

    for detach, expect_zero in ((False, False), (True, True)):
        x = model.model.embed_tokens(ids).detach().requires_grad_(True)  # encoder input embeddings
        anchor = bireco.pool(model(inputs_embeds=x, padding_mask=mask), mask)
        loss = bireco.reconstruction_loss(model, anchor.detach() if detach else anchor, t, m)
        (g,) = torch.autograd.grad(loss, x, allow_unused=True)
        g = torch.zeros_like(x) if g is None else g
        assert (g == 0).all() == expect_zero
        if not detach:
            assert (g[~mask] == 0).all()  # padding positions of the encoder still get nothing


# -----------------------------------------------------------------------------
# Stage II: contrastive loss


def test_contrastive_loss_by_hand():
    """q1=(1,0), q2=(0,1), p1=(1,0), p2=(0.6,0.8), temperature 0.5 (scale 2).
    Cosines: q1.p1=1, q1.p2=0.6, q2.p1=0, q2.p2=0.8; logits row 1 = (2, 1.2), row 2 = (0, 1.6).
    -log softmax at the target: row 1 = log(1 + e^-0.8), row 2 = log(1 + e^-1.6);
    loss = their mean = (0.371101 + 0.183901) / 2 = 0.277501; negatives per query B - 1 = 1.
    Scaling an input changes no cosine, so 3*q1 and 5*p2 give the same loss."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    want = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    assert abs(want - 0.277501) < 1e-6
    loss, negatives = bireco.contrastive_loss(q, p, temperature=0.5)
    assert negatives == 1
    assert abs(loss.item() - want) < 1e-6
    loss, _ = bireco.contrastive_loss(q * torch.tensor([[3.0], [1.0]]), p * torch.tensor([[1.0], [5.0]]),
                                      temperature=0.5)
    assert abs(loss.item() - want) < 1e-6


def test_contrastive_loss_with_hard_negatives_by_hand():
    """Same q, p plus hard negatives n1=(0,2), n2=(-0.5,0) (not unit length: only their direction
    counts): every query sees all B positives and all B' negatives. Cosines with (n1, n2):
    q1 (0, -1), q2 (1, 0); logits row 1 = (2, 1.2, 0, -2), row 2 = (0, 1.6, 2, 0).
    Row 1 loss = log(1 + e^-0.8 + e^-2 + e^-4) = log(1.602980) = 0.471864,
    row 2 loss = log(e^-1.6 + 1 + e^0.4 + e^-1.6) = log(2.895618) = 1.063198; loss = 0.767531;
    negatives per query = 2 - 1 + 2 = 3. With n1 alone: 2 negatives, rows drop their e^-4 / e^-1.6."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    n = torch.tensor([[0.0, 2.0], [-0.5, 0.0]])
    row1 = math.log(1 + math.exp(-0.8) + math.exp(-2) + math.exp(-4))
    row2 = math.log(2 * math.exp(-1.6) + 1 + math.exp(0.4))
    assert abs(row1 - 0.471864) < 1e-6 and abs(row2 - 1.063198) < 1e-6
    assert abs((row1 + row2) / 2 - 0.767531) < 1e-6
    loss, negatives = bireco.contrastive_loss(q, p, n, temperature=0.5)
    assert negatives == 3
    assert abs(loss.item() - (row1 + row2) / 2) < 1e-6
    loss, negatives = bireco.contrastive_loss(q, p, n[:1], temperature=0.5)
    assert negatives == 2
    want = (math.log(1 + math.exp(-0.8) + math.exp(-2)) + math.log(math.exp(-1.6) + 1 + math.exp(0.4))) / 2
    assert abs(loss.item() - want) < 1e-6


# -----------------------------------------------------------------------------
# Diagnostic


@pytest.mark.parametrize("task", ["d2q", "q2d"])
def test_reconstruction_gap(model, fmt, rows, task):
    """Returns finite floats: the loss with true anchors, and with anchors rolled by one pair."""
    pairs = [Pair(r["query"], r["positive"], r["negative"], "Find the definition") for r in rows[:4]]
    true, shuffled = bireco.reconstruction_gap(model, fmt, pairs, task)
    assert isinstance(true, float) and isinstance(shuffled, float)
    assert math.isfinite(true) and math.isfinite(shuffled) and true != shuffled
    with torch.no_grad():
        loss, _ = bireco.stage1_loss(model, fmt, pairs, task)
        assert abs(true - loss.item()) < 1e-6
        src = [(p.instruction, p.query) if task == "q2d" else (None, p.positive) for p in pairs]
        tgt = [fmt.target_ids(p.positive if task == "q2d" else p.query) for p in pairs]
        anchor = bireco.embed_texts(model, fmt, src)
        rolled = [hand_loss_sum(model, anchor[(i - 1) % 4], y) for i, y in enumerate(tgt)]
    assert abs(shuffled - sum(rolled).item() / sum(len(y) for y in tgt)) < 1e-5


def test_reconstruct_is_greedy_decoding_through_transformers(model, fmt, rows, tiny_model_dir):
    """bireco.reconstruct equals a hand-written greedy loop through transformers fed the same
    anchor as inputs_embeds; a row stops at stop_id, the others go on."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float64).eval()
    anchor = bireco.embed_texts(model, fmt, [(None, r["positive"]) for r in rows[:3]]).detach()
    want = []
    with torch.no_grad():
        for a in anchor:
            x, ids = a[None, None, :], []
            for _ in range(10):
                t = hf(inputs_embeds=x).logits[0, -1].argmax().item()
                ids.append(t)
                x = torch.cat([x, hf.get_input_embeddings()(torch.tensor([[t]]))], dim=1)
            want.append(ids)
    assert bireco.reconstruct(model, anchor, stop_id=-1, max_new=10) == want
    stop = want[0][3]  # row 0 ends before its fourth token; rows without that token run to max_new
    got = bireco.reconstruct(model, anchor, stop_id=stop, max_new=10)
    for g, w in zip(got, want):
        assert g == (w[:w.index(stop)] if stop in w else w)


def test_anchor_losses(model, fmt, rows):
    """anchor_losses: "true" and "shuffled" as reconstruction_gap over each batch, "mean" the loss
    given the batch's mean anchor in every row, each averaged over the batches."""
    pairs = [Pair(r["query"], r["positive"], r["negative"], "Find the definition") for r in rows[:6]]
    got = bireco.anchor_losses(model, fmt, pairs, "d2q", batch=3)
    gaps = [bireco.reconstruction_gap(model, fmt, pairs[i:i + 3], "d2q") for i in (0, 3)]
    assert abs(got["true"] - (gaps[0][0] + gaps[1][0]) / 2) < 1e-9
    assert abs(got["shuffled"] - (gaps[0][1] + gaps[1][1]) / 2) < 1e-9
    means = []
    with torch.no_grad():
        for part in (pairs[:3], pairs[3:]):
            anchor = bireco.embed_texts(model, fmt, [(None, p.positive) for p in part]).mean(0)
            tgt = [fmt.target_ids(p.query) for p in part]
            means.append(sum(hand_loss_sum(model, anchor, y) for y in tgt).item() / sum(map(len, tgt)))
    assert abs(got["mean"] - sum(means) / 2) < 1e-9
    # shufflings=2: rolls by 1 and 2 within each batch of 3, each another pair's anchor in every row
    two = bireco.anchor_losses(model, fmt, pairs, "d2q", batch=3, shufflings=2)
    by_roll = []
    with torch.no_grad():
        for k in (1, 2):
            parts = []
            for part in (pairs[:3], pairs[3:]):
                anchor, targets, mask = bireco._stage1_inputs(model, fmt, part, "d2q")
                parts.append(bireco.reconstruction_loss(model, anchor.roll(k, 0), targets, mask).item())
            by_roll.append(sum(parts) / 2)
    assert abs(two["each"][0] - got["shuffled"]) < 1e-9 and abs(two["each"][1] - by_roll[1]) < 1e-9
    assert abs(two["shuffled"] - sum(by_roll) / 2) < 1e-9 and abs(two["true"] - got["true"]) < 1e-9


def test_sink_decoding_by_hand(model, fmt, rows):
    """Decoding(sink_id=s): each row decoded alone from [W_emb[s], anchor, y_1 .. y_(n-1)] with no
    mask, its losses at the anchor's and the tokens' positions; the diagnostic, the mean-anchor
    loss and greedy reconstruction decode the same way."""
    anchor, tgt = anchors_and_targets(model, fmt, rows[:4])
    t, m = pad(tgt, fmt.pad_id)
    sink = fmt.head[0] if fmt.head else 0
    W = model.model.embed_tokens.weight
    with torch.no_grad():
        got = bireco.reconstruction_loss(model, anchor, t, m, how=bireco.Decoding(sink_id=sink))
        total = 0
        for i, y in enumerate(tgt):
            x = torch.cat([W[sink][None], anchor[i][None], W[torch.tensor(y[:-1])]])[None]
            logits = model.lm_head(model(inputs_embeds=x))[0, 1:]
            total = total + F.cross_entropy(logits, torch.tensor(y), reduction="sum")
        torch.testing.assert_close(got, total / sum(map(len, tgt)), **TOL)
        x = torch.cat([W[sink][None], anchor[0][None]])[None]
        first = model.lm_head(model(inputs_embeds=x))[0, -1].argmax().item()
        assert bireco.reconstruct(model, anchor[:1], stop_id=-1, max_new=1, how=bireco.Decoding(sink_id=sink)) == [[first]]


def test_shuffled_anchor_control(model, fmt, rows):
    """Decoding(shuffle=True) is the loss given the anchors rolled by one: what the diagnostic's
    "shuffled" measures, here as a training loss."""
    anchor, tgt = anchors_and_targets(model, fmt, rows[:4])
    t, m = pad(tgt, fmt.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(bireco.reconstruction_loss(model, anchor, t, m, how=bireco.Decoding(shuffle=True)),
                                   bireco.reconstruction_loss(model, anchor.roll(1, 0), t, m), **TOL)


def test_detached_control(model, fmt, rows):
    """--shuffle-anchors detached: the same loss as the rolled control, but no gradient reaches the
    anchors (the rolled control's does); from_flags reads both spellings and a run saved before."""
    anchor, tgt = anchors_and_targets(model, fmt, rows[:4])
    t, m = pad(tgt, fmt.pad_id)
    grads = {}
    for detach in (False, True):
        a = anchor.detach().clone().requires_grad_()
        loss = bireco.reconstruction_loss(model, a, t, m, how=bireco.Decoding(shuffle=True, detach=detach))
        loss.backward()
        grads[detach] = (loss.detach(), a.grad)
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[True][0], grads[False][0], **TOL)
    assert grads[True][1] is None and grads[False][1].abs().sum() > 0
    for flag, want in ((True, (True, False)), ("rolled", (True, False)), ("detached", (True, True)), (None, (False, False))):
        how = bireco.Decoding.from_flags({"anchor_input": "sided", "shuffle_anchors": flag}, fmt)
        assert (how.shuffle, how.detach) == want, flag
        assert not how.at_inference().detach


def test_centred_anchors(model, fmt, rows):
    """Decoding(centre=True) decodes from anchor - batch mean, scaled to the token embeddings' mean
    norm; the diagnostics read the same way; the gradient through the anchors sums to zero over
    the batch (a common shift of every anchor changes nothing)."""
    anchor, tgt = anchors_and_targets(model, fmt, rows[:4])
    t, m = pad(tgt, fmt.pad_id)
    how = bireco.Decoding(centre=True)
    W = model.model.embed_tokens.weight
    with torch.no_grad():
        c = anchor - anchor.mean(0)
        want = c * (W.norm(dim=-1).mean() / c.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(bireco.reconstruction_loss(model, anchor, t, m, how=how),
                                   bireco.reconstruction_loss(model, want, t, m), **TOL)
        torch.testing.assert_close(bireco.reconstruction_loss(model, anchor + 5.0, t, m, how=how),
                                   bireco.reconstruction_loss(model, anchor, t, m, how=how), **TOL)
    a = anchor.clone().requires_grad_()
    (g,) = torch.autograd.grad(bireco.reconstruction_loss(model, a, t, m, how=how), a)
    torch.testing.assert_close(g.sum(0), torch.zeros_like(g[0]), rtol=0, atol=1e-9)


def test_sided_decoding_by_hand(model, fmt, rows):
    """Decoding(sink, centre, turn), train.py's default: each row decoded alone from [W_emb[sink],
    the row's anchor minus the batch's mean at token scale, the written side's turn opening,
    y_1 .. y_(n-1)], its losses from the last prompt token on. EBD2Q writes a query (the user's
    turn), EBQ2D a document (the assistant's). The anchors' gradients still sum to zero."""
    assert fmt.head, "the tiny tokenizer has a chat format"
    anchor, tgt = anchors_and_targets(model, fmt, rows[:4])
    t, m = pad(tgt, fmt.pad_id)
    sink = fmt.head[0]
    how = bireco.Decoding(sink_id=sink, centre=True, turn=True)
    assert how == bireco.Decoding.from_flags({"anchor_input": "sided"}, fmt)
    user, assistant = fmt.turn_ids("user"), fmt.turn_ids("assistant")
    assert how.prompt(fmt, "d2q") == user and how.prompt(fmt, "q2d") == assistant != user
    W = model.model.embed_tokens.weight
    norm = W.norm(dim=-1).mean()
    with torch.no_grad():
        got = bireco.reconstruction_loss(model, anchor, t, m, how=how, prompt=user)
        total = 0
        for i, y in enumerate(tgt):
            c = anchor[i] - anchor.mean(0)
            x = torch.cat([W[sink][None], (c * norm / c.norm())[None], W[torch.tensor(user)],
                           W[torch.tensor(y[:-1])]])[None]
            logits = model.lm_head(model(inputs_embeds=x))[0, 1 + len(user):]
            total = total + F.cross_entropy(logits, torch.tensor(y), reduction="sum")
        torch.testing.assert_close(got, total / sum(map(len, tgt)), **TOL)
    a = anchor.clone().requires_grad_()
    (g,) = torch.autograd.grad(bireco.reconstruction_loss(model, a, t, m, how=how, prompt=user), a)
    torch.testing.assert_close(g.sum(0), torch.zeros_like(g[0]), rtol=0, atol=1e-9)
