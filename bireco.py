"""
The method of arXiv 2509.03020, top to bottom as the paper goes: [EOS] embeddings, the two
Stage I reconstruction losses (EBQ2D and EBD2Q), the Stage II contrastive loss and the step that
fits its large batch, then the diagnostic of what the [EOS] vector carries.

- Embedding E(text): the final-norm hidden state at the text's last token, the EOS / end-of-turn
  token that data.TextFormat appends (last-token pooling; mean pooling only for ablations).
- Stage I (EBQ2D: query -> document, EBD2Q: document -> query): the anchor embedding E(x) is fed
  back into the same LLM as one input embedding directly before the other side's tokens
  y_1..y_n, at position 0, whatever the padding (by default after one real token, centred, and
  followed by the written side's turn opening: see Decoding). The last position before the targets
  predicts y_1, position k predicts y_(k+1): teacher-forced next-token prediction of the content
  tokens only. Logits are computed only at those n positions and in chunks, never for the whole
  (B, T, V) block, and each chunk's gradient is taken right after its loss, so no logits are kept
  for backward.
  Gradients flow through the anchor into the pass that produced it.
- Stage II: InfoNCE over cosine similarities at temperature 0.02; the candidates of each query are
  all positives and hard negatives of the batch. The step embeds the batch in passes of bounded
  size and, when they do not fit at once, as a cached step (GradCache): the same gradient.
- How the decoder reads the anchor (Decoding): the paper's input, the default (a sink token, the
  centred anchor, then the written side's chat-turn opening: after the paper's input at CPU scale
  the anchor carries nothing the decoder reads), and the shuffled-anchor control.
- A diagnostic the paper has no name for: the target loss given the true anchor versus a
  shuffled anchor from another pair, i.e. how much the [EOS] vector says about the other side.

Shapes: B batch, T tokens, D hidden size, V vocabulary, N target tokens in a batch.
Left out (elsewhere): the training loop, LoRA and checkpoints (train.py), the text format
(data.py), the model (model.py), the choice of dtype (hardware.py).
"""

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from data import SIDE_FORMS, Pair, TextFormat, pad, written_side
from model import Transformer, load_model, load_tokenizer


# -----------------------------------------------------------------------------
# Embeddings


def at_least_fp32(t):
    """Losses are taken in fp32 at least: bf16 / fp16 values are widened, fp64 ones (the tests'
    exact identities) stay fp64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def last_index(mask):
    """mask (B, T) True at real tokens, padding on either side -> (B,) each row's last real
    index."""
    return (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)


def pool(hidden, mask, pooling: str = "last"):
    """hidden (B, T, D), mask (B, T) True at real tokens, padding on either side -> (B, D)."""
    if pooling == "mean":
        m = mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index(mask)]


def embed(model: Transformer, ids, mask, eos_id: int | None = None, pooling: str = "last"):
    """E(text) for a padded batch: ids, mask (B, T) -> (B, D), differentiable."""
    ids, mask = ids.to(model.lm_head.weight.device), mask.to(model.lm_head.weight.device)
    if pooling != "last":
        return pool(model(ids, padding_mask=mask), mask, pooling)
    at = last_index(mask)
    if eos_id is not None:  # cheap guard: the pooled token must be the EOS
        last = ids[torch.arange(ids.shape[0], device=ids.device), at]
        assert (last == eos_id).all(), f"pooled token ids {last.tolist()} are not EOS {eos_id}"
    return model(ids, padding_mask=mask, last=at)[:, 0]  # the final layer at the pooled position


def embed_texts(model, fmt: TextFormat, items: list[tuple[str | None, str]], pooling="last"):
    """E(text) for (instruction, text) pairs (instruction None for documents): (B, D),
    differentiable."""
    ids, mask = pad([fmt.embed_ids(text, instruction) for instruction, text in items], fmt.pad_id)
    return embed(model, ids, mask, fmt.eos_id, pooling)


class Embedder:
    """Inference-time text embedder: encode(texts) -> (N, D) float32 numpy array."""

    def __init__(self, model: Transformer, fmt: TextFormat, pooling: str = "last",
                 normalize: bool = True):
        self.model, self.fmt, self.pooling, self.normalize = model.eval(), fmt, pooling, normalize

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, max_length: int = 512):
        """The embedder of a checkpoint folder (train.py's, or any HF Llama / Qwen folder)."""
        tokenizer, eos_ids = load_tokenizer(path)
        return cls(load_model(path, device, dtype), TextFormat(tokenizer, eos_ids, max_length))

    @torch.no_grad()
    def encode(self, texts: list[str], instruction: str | None = None, batch_size: int = 32,
               progress: bool = False) -> np.ndarray:
        seqs = [self.fmt.embed_ids(t, instruction) for t in texts]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # by length: little padding
        starts = range(0, len(seqs), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="encoding", unit="batch")
        out = np.zeros((len(seqs), self.model.config.hidden_size), dtype=np.float32)
        for s in starts:
            rows = order[s:s + batch_size]
            ids, mask = pad([seqs[i] for i in rows], self.fmt.pad_id)
            e = embed(self.model, ids, mask, self.fmt.eos_id, self.pooling).float()
            if self.normalize:
                e = F.normalize(e, dim=-1)
            out[rows] = e.cpu().numpy()
        return out


# -----------------------------------------------------------------------------
# Stage I: embedding-based reconstruction (EBQ2D, EBD2Q)


LOGITS_PER_CHUNK = 2 ** 25  # logits held at once by target_cross_entropy: 128 MB in fp32


def _chunked_cross_entropy(h, weight, y, chunk, row_weights=None, grad_h=None, grad_w=None):
    """Cross-entropy of each row of the logits h @ weight.T against y, `chunk` rows at a time:
    (N,) in fp32 (fp64 for fp64 inputs). Given buffers, also the gradient of
    sum(row_weights * ce): per chunk, d ce / d logits
    = softmax - one_hot is at hand right after the loss, and gives grad_h = g @ weight and
    grad_w += g.T @ h. Matmuls run in autocast's dtype when it is on (fp32 weights, bf16 compute),
    else in h's; gradients are kept in their buffers' dtypes."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    h, w = h.to(dtype), weight.to(dtype)  # no copies without autocast
    ce = torch.empty(h.shape[0], dtype=torch.promote_types(dtype, torch.float32), device=h.device)
    with torch.autocast(device, enabled=False):
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            logits = F.linear(hc, w).to(ce.dtype)  # (chunk, V), the only block of logits alive
            lse = torch.logsumexp(logits, dim=-1)
            ce[i:i + chunk] = lse - logits.gather(1, yc[:, None])[:, 0]
            if grad_h is None and grad_w is None:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            g[torch.arange(len(yc), device=g.device), yc] -= 1
            if row_weights is not None:
                g *= row_weights[i:i + chunk, None]
            g = g.to(dtype)
            if grad_h is not None:
                grad_h[i:i + chunk] = g @ w
            if grad_w is not None and grad_w.dtype == dtype:
                grad_w.addmm_(g.T, hc)
            elif grad_w is not None:  # fp32 gradient of an fp32 weight under bf16 autocast
                grad_w += g.T @ hc
    return ce


def _weighted_sum(ce, row_weights):
    return ce.sum() if row_weights is None else (ce * row_weights).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """target_cross_entropy with autograd: the gradients are computed in the forward pass, so
    backward only scales them by the incoming gradient; no logits are stored or recomputed."""

    @staticmethod
    def forward(ctx, h, weight, y, row_weights, chunk):
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        ce = _chunked_cross_entropy(h, weight, y, chunk, row_weights, grad_h, grad_w)
        ctx.grads = grad_h, grad_w
        ctx.mark_non_differentiable(ce)
        return _weighted_sum(ce, row_weights), ce

    @staticmethod
    def backward(ctx, g, _):
        if ctx.grads is None:
            raise RuntimeError("target_cross_entropy: backward ran twice through one loss "
                               "(retain_graph)")
        grads, ctx.grads = ctx.grads, None  # handed over, not copied: AccumulateGrad may keep them
        grad_h, grad_w = (None if x is None else x.mul_(g) for x in grads)
        return grad_h, grad_w, None, None, None


def target_cross_entropy(model: Transformer, h, y, row_weights=None, chunk: int | None = None,
                         weight=None):
    """Cross-entropy of hidden states h (N, D) against token ids y (N,) through model.lm_head.
    Returns (sum over rows, weighted by row_weights (N,) if given; each row's loss (N,), detached).
    lm_head runs on `chunk` rows at a time (default: LOGITS_PER_CHUNK / V rows), so memory never
    holds more than one chunk of logits; with autograd on, each chunk's gradient is taken before
    the next chunk (see _LinearCrossEntropy). weight: the output matrix to use instead of
    lm_head's (a detached one trains nothing through it)."""
    weight = model.lm_head.weight if weight is None else weight
    chunk = chunk or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, y, row_weights, chunk)
    ce = _chunked_cross_entropy(h, weight, y, chunk)
    return _weighted_sum(ce, row_weights), ce


@dataclass(frozen=True)
class Decoding:
    """How Stage I's decoder pass reads the anchor: the paper's input, the one train.py uses by
    default, an earlier default and a control (what each did on held-out pairs, and the options
    that did nothing on their own and left, with the commit where they lived:
    experiments/README.md).
    - Decoding() (PAPER, --anchor-input paper): the [EOS] vector itself at position 0, then
      y_1 .. y_(n-1).
    - sink_id + centre (--anchor-input centred, the default until December 2026): the template's
      first token at position 0, then the anchor minus the batch's mean anchor, scaled to the
      token embeddings' mean norm, at position 1. Position 0 is where a pretrained LM parks
      attention whatever the content (the attention sink): a vector there is not read. Final-norm
      states share one large direction (cosine ~0.92 between documents' anchors in SmolLM2, norm
      ~46 against ~3 for token embeddings); left in, the gradient through the anchors moves them
      all together towards one generic prompt for the decoder. Centred, the anchors' gradients sum
      to zero over the batch: only what one pair's anchor tells the decoder more than the others'
      is trained. The untrained model reads a token-scale vector at position 1 at once, not at
      position 0 (experiments/oracle_anchors.py); neither part opens the gap alone. But a batch
      is one dataset and one task, so its mean holds what says "query" or "document" and which
      dataset: centred, the decoder read the pair's content and wrote it in the form it trained
      on most (a query's "lemma: sentence" for a gloss, a man page for a WordNet word).
    - + turn (--anchor-input sided, the default): the decoder is also told which side it writes.
      After the anchor comes the opening of the chat turn the written side would be (a query is
      the user's turn, a document the assistant's): real tokens the pretrained model knows, which
      also put the first target one real token after the anchor. With batches by dataset size,
      after 2,400 pairs 99-100% of held-out WordNet regenerations took their side's form in each
      of seeds 0-4, where the centred input wrote one form for both sides (experiments/README.md);
      the form comes from the turn opening: at lr 2e-4 seed 4 wrote it with a gap of zero (the
      others +0.17 to +0.70 / +0.39 to +0.94). The batch's mean anchor beside it, to name the
      dataset, did not: at token scale the four cells' means are one vector (cosine 0.87-0.98).
    - shuffle (--shuffle-anchors): a control, not a method: each row decodes from the next pair's
      anchor (rolled by one), so Stage I fine-tunes the LM on the same texts for the same steps
      with nothing to reconstruct from. Diagnostics centre over their batch too. At the sided
      default it left every text's [EOS] vector at cosine 0.99 of every other (seed 0; 0.81-0.91
      untrained or after the default Stage I), and Stage II started at chance.
    - + detach (--shuffle-anchors detached): the same control with the gradient stopped at the
      anchor, so the decoder's loss moves the [EOS] vectors only through the weights they share
      with it, never towards what a foreign anchor should be."""
    sink_id: int | None = None
    centre: bool = False
    turn: bool = False
    shuffle: bool = False
    detach: bool = False
    batch_mean: Callable | None = None  # under torchrun: the global batch's (hardware.global_mean)

    def read(self, anchor, W):
        """What the decoder reads of anchors (B, D), given the token embeddings W (V, D)."""
        if not self.centre:
            return anchor
        mean = anchor.mean(0, keepdim=True) if self.batch_mean is None else self.batch_mean(anchor)
        return token_scale(anchor - mean, W)

    def prefix(self, anchor, W, prompt=(), roll: int = 0):
        """The decoder's input before the targets, (B, P, D): [sink,] the anchor read (rolled by
        `roll` rows: another pair's), [the prompt tokens]."""
        B, anchor = len(anchor), anchor.detach() if self.detach else anchor
        parts = [self.read(anchor, W).roll(roll, dims=0)[:, None].to(W.dtype)]
        if self.sink_id is not None:
            parts.insert(0, W[self.sink_id].expand(B, 1, -1))
        if len(prompt):
            parts.append(W[torch.tensor(prompt, device=W.device)].expand(B, -1, -1))
        return torch.cat(parts, dim=1)

    def prompt(self, fmt: TextFormat, task: str) -> list[int]:
        """The tokens after the anchor for `task`: the opening of the written side's chat turn
        (EBD2Q writes the query, a user's turn; EBQ2D the document, the assistant's), or none."""
        return fmt.turn_ids("assistant" if task == "q2d" else "user") if self.turn else []

    @classmethod
    def from_flags(cls, flags: dict, fmt: TextFormat) -> "Decoding":
        """From train.py's flags (vars(args), or a checkpoint's meta.json "args"). The sink is the
        first token of the embedding template (<|im_start|>, <|begin_of_text|>), what position 0
        holds when a text is embedded. A run saved before --anchor-input had the flags --sink and
        --centre-anchors instead; a run without any of them decoded as the paper."""
        sided = flags.get("anchor_input") == "sided"
        centred = sided or flags.get("anchor_input") == "centred"
        sink, centre = centred or flags.get("sink"), centred or flags.get("centre_anchors")
        shuffle = flags.get("shuffle_anchors")  # True in runs saved before "detached" existed
        return cls(fmt.head[0] if sink and fmt.head else None, bool(centre), sided, bool(shuffle),
                   shuffle == "detached")

    def at_inference(self) -> "Decoding":
        """What shapes what a trained decoder reads (sink, centring, turn); no shuffling."""
        return replace(self, shuffle=False, detach=False, batch_mean=None)


PAPER = Decoding()


def token_scale(v, W):
    """Vectors v (B, D) rescaled to the token embeddings' mean norm (~3 in SmolLM2)."""
    scale = W.detach().float().norm(dim=-1).mean()
    return v * (scale / v.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(v.dtype)


def checkpoint_decoding(path: str, fmt: TextFormat) -> Decoding:
    """How the decoder of a train.py Stage I checkpoint reads anchors (its meta.json's
    --anchor-input), so diagnostics decode as it trained; the paper's for any other folder."""
    meta = os.path.join(path, "meta.json")
    args = json.load(open(meta)).get("args", {}) if os.path.isfile(meta) else {}
    return Decoding.from_flags(args, fmt).at_inference() if args.get("stage") == "recon" else PAPER


def _decode(model: Transformer, anchor, targets, mask, how: Decoding = PAPER, prompt=()):
    """The decoder pass of Stage I: final states at the target positions and their targets,
    (N, D) and (N,). Input is the prefix (Decoding.prefix: at least the anchor), then
    y_1 .. y_(n-1); the prefix's last position predicts y_1, y_k's predicts y_(k+1)."""
    device = model.lm_head.weight.device
    targets, mask = targets.to(device), mask.to(device)
    W = model.model.embed_tokens.weight
    tok = F.embedding(targets[:, :-1], W)  # (B, n-1, D)
    prefix = how.prefix(anchor, W, prompt, roll=1 if how.shuffle else 0)  # (B, P, D)
    x = torch.cat([prefix.to(tok.dtype), tok], dim=1)  # (B, P + n-1, D)
    P = prefix.shape[1]
    padding = torch.cat([mask.new_ones(len(mask), P - 1), mask], dim=1)
    h = model(inputs_embeds=x, padding_mask=padding)[:, P - 1:]  # the positions that predict
    return h[mask], targets[mask]


def reconstruction_loss(model: Transformer, anchor, targets, mask, chunk: int | None = None,
                        how: Decoding = PAPER, tokens: int | None = None, prompt=()):
    """Mean token cross-entropy of regenerating `targets` from `anchor` (paper, Stage I).
    anchor (B, D): E(one side). targets (B, n) right-padded token ids of the other side,
    mask (B, n). tokens: what the summed cross-entropy is divided by (default: mask's count).
    prompt: token ids after the anchor (Decoding.prompt)."""
    h, y = _decode(model, anchor, targets, mask, how, prompt)
    return target_cross_entropy(model, h, y, chunk=chunk)[0] / (tokens or len(y))


# A Stage I loss is a mean over the target tokens of a batch. Under data parallelism each process
# holds a slice of the global batch, and its loss must be its share of the global mean: its tokens'
# summed cross-entropy over the global batch's token count. `total` maps this slice's count to the
# one to divide by (train.py passes hardware.all_sum, the sum over processes; one process: itself).


def stage1_loss(model: Transformer, fmt: TextFormat, pairs: list[Pair], task: str,
                chunk: int | None = None, how: Decoding = PAPER, total=int, gap: bool = False):
    """One Stage I task on a batch of pairs. "q2d" (EBQ2D): E(instruction, query) regenerates the
    positive; "d2q" (EBD2Q): E(positive) regenerates the query text (without its instruction).
    Returns (loss, tokens): the loss a mean over tokens = total(this batch's target tokens).
    gap: also this batch's gap before its update, as (loss, tokens, gap): the loss given another
    pair's anchor minus given its own (one more decoder pass, without autograd; this process's
    rows only)."""
    anchor, targets, mask = _stage1_inputs(model, fmt, pairs, task)
    tokens, prompt = int(total(int(mask.sum()))), how.prompt(fmt, task)
    loss = reconstruction_loss(model, anchor, targets, mask, chunk, how, tokens, prompt)
    if not gap:
        return loss, tokens
    with torch.no_grad():  # the control trains on another pair's anchor: then the other is its own
        other = reconstruction_loss(model, anchor.detach(), targets, mask, chunk,
                                    replace(how, shuffle=not how.shuffle), prompt=prompt).item()
    own_loss = loss.item() * tokens / int(mask.sum())  # this process's mean
    return loss, tokens, (other - own_loss if not how.shuffle else own_loss - other)


def stage1_sum_loss(model: Transformer, fmt: TextFormat, pairs: list[Pair],
                    weights: dict[str, float], chunk: int | None = None, how: Decoding = PAPER,
                    total=int):
    """Several Stage I tasks on one batch, summed with weights, as the official code does
    (L = 0.8 L_D2Q + 0.2 L_Q2D). Each task has its own encoder and decoder pass; one output-layer
    pass then serves all their target rows, each weighted by its task's weight over its task's
    target count, so one lm_head gradient (V x D) is held until backward, not one per task.
    Returns (loss, {task: (its loss value, tokens)}), each task's a mean over its tokens =
    total(its target tokens in this batch)."""
    parts = [_decode(model, *_stage1_inputs(model, fmt, pairs, task), how, how.prompt(fmt, task))
             for task in weights]
    h, y = torch.cat([h for h, _ in parts]), torch.cat([y for _, y in parts])
    sizes = [len(y) for _, y in parts]
    counts = [int(total(n)) for n in sizes]
    wtype = torch.promote_types(h.dtype, torch.float32)
    row_weights = torch.cat([torch.full((n,), w / N, dtype=wtype, device=y.device)
                             for w, n, N in zip(weights.values(), sizes, counts)])
    loss, ce = target_cross_entropy(model, h, y, row_weights, chunk)
    per_task = zip(weights, ce.split(sizes), counts)
    return loss, {task: (part.sum().item() / N, N) for task, part, N in per_task}


def stage1_sides(pairs, task):
    """Each pair's source, (instruction, text) for the encoder, and its target text: the query
    regenerates the document in q2d (EBQ2D), the document the query in d2q (EBD2Q)."""
    if task == "q2d":
        return [(p.instruction, p.query) for p in pairs], [p.positive for p in pairs]
    if task == "d2q":
        return [(None, p.positive) for p in pairs], [p.query for p in pairs]
    raise ValueError(f"unknown Stage I task {task!r} (q2d or d2q)")


def _stage1_inputs(model, fmt, pairs, task):
    sources, targets = stage1_sides(pairs, task)
    targets, mask = pad([fmt.target_ids(t) for t in targets], fmt.pad_id)
    return embed_texts(model, fmt, sources), targets, mask


# -----------------------------------------------------------------------------
# Stage II: contrastive learning


def contrastive_loss(q, p, n=None, temperature: float = 0.02):
    """InfoNCE over cosine similarity. q, p (B, D); n (B', D) hard negatives or None.
    Query i's candidates are all B positives and all B' negatives; its target is p_i.
    Returns (loss, negatives per query = B - 1 + B')."""
    q, cands = F.normalize(at_least_fp32(q), dim=-1), F.normalize(at_least_fp32(p), dim=-1)
    if n is not None:
        cands = torch.cat([cands, F.normalize(at_least_fp32(n), dim=-1)])
    scores = q @ cands.T / temperature  # (B, B + B')
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(scores, labels), cands.shape[0] - 1


def token_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Splits texts of these token lengths into passes of at most `budget` padded tokens each (texts
    x its longest; a longer text goes alone) with the least padding: the texts sorted by length,
    cut where the cuts minimise the padded tokens plus budget / 16 for each pass (one more pass
    pays where it saves that much padding). Dynamic programming over the cut points."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n, per_pass = len(order), budget // 16
    # cost[j]: the first j sorted texts' least cost, cut[j]: where their last pass starts
    cost, cut = [0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[order[j - 1]]  # the longest of a pass ending at j
        i = j - 1
        while i >= 0 and ((j - i) * width <= budget or i == j - 1):
            c = cost[i] + (j - i) * width + per_pass
            if c < cost[j]:
                cost[j], cut[j] = c, i
            i -= 1
    chunks, j = [], n
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def padded_size(lengths: list[int], chunks: list[list[int]]) -> int:
    """Tokens the passes `chunks` (token_chunks) run, padding included: each pass x its longest."""
    return sum(len(c) * max(lengths[i] for i in c) for c in chunks)


def contrastive_step(model: Transformer, fmt: TextFormat, batch: list[Pair], chunk: int = 1024,
                     temperature: float = 0.02, ctx=nullcontext(), scale: float = 1.0, gather=None):
    """Stage II on one batch: embeds queries, positives and hard negatives, takes the InfoNCE loss
    and back-propagates loss * scale into the model. Returns (loss, negatives per query).

    The paper's batch of 1,024 pairs (3,072 texts) does not fit one pass with autograd, so the
    texts go in passes of at most `chunk` padded tokens (token_chunks), as a cached step: pass 1
    embeds every chunk without autograd; the loss over all embeddings gives d loss / d embedding;
    pass 2 re-runs each chunk with autograd (the same dropout masks: the RNG state of pass 1) and
    back-propagates that gradient. Same gradient, one chunk's activations at a time. A batch
    that fits in `chunk` tokens is one plain pass. ctx: the autocast context of the passes.
    gather: under data parallelism, reps (this process's) -> the global batch's, in its order."""
    items = ([(p.instruction, p.query) for p in batch] + [(None, p.positive) for p in batch]
             + [(None, p.negative) for p in batch if p.negative is not None])
    seqs = [fmt.embed_ids(text, instruction) for instruction, text in items]
    lengths = [len(s) for s in seqs]
    chunks = token_chunks(lengths, chunk)
    embed_chunk = lambda c: at_least_fp32(embed(model, *pad([seqs[i] for i in c], fmt.pad_id),
                                                fmt.eos_id))
    sections = len(items) // len(batch)  # queries, positives (, negatives)
    order = torch.tensor([i for c in chunks for i in c]).argsort()  # chunks' order -> batch's

    def loss_of(reps):  # (3B, D) in the batch's order
        if gather is not None:
            reps = gather(reps, sections)
        q, p, *n = reps.chunk(sections)
        return contrastive_loss(q, p, n[0] if n else None, temperature)

    if padded_size(lengths, chunks) <= chunk and gather is None:  # the plain step
        with ctx:
            loss, negatives = loss_of(torch.cat([embed_chunk(c) for c in chunks])[order])
        (loss * scale).backward()
        return loss.item(), negatives
    rng, reps = [], []
    with torch.no_grad():  # pass 1: every embedding, no activations kept
        for c in chunks:
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            rng.append((torch.get_rng_state(), cuda))
            with ctx:
                reps.append(embed_chunk(c))
    reps = torch.cat(reps).requires_grad_()  # (3B, D), in the chunks' order
    loss, negatives = loss_of(reps[order])
    (loss * scale).backward()  # d loss / d embeddings
    for c, (cpu_rng, cuda_rng), g in zip(chunks, rng, reps.grad.split([len(c) for c in chunks])):
        torch.set_rng_state(cpu_rng)  # same dropout masks as in pass 1
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with ctx:
            e = embed_chunk(c)
        e.backward(g)  # pass 2: re-run the chunk with autograd, inject the cached gradient
    return loss.item(), negatives


# -----------------------------------------------------------------------------
# Diagnostics: what the [EOS] vector carries


@torch.no_grad()
def reconstruction_gap(model: Transformer, fmt: TextFormat, pairs: list[Pair], task: str = "d2q",
                       how: Decoding = PAPER):
    """Diagnostic: target loss per token given the true anchor vs given another pair's anchor
    (anchors rolled by one). A large gap means the [EOS] vector carries the other side's content.
    how: decode as a model trained with these options reads its anchors (Decoding.at_inference)."""
    anchor, targets, mask = _stage1_inputs(model, fmt, pairs, task)
    how = how.at_inference()
    loss = lambda a: reconstruction_loss(model, a, targets, mask, how=how,  # noqa: E731
                                         prompt=how.prompt(fmt, task)).item()
    true, shuffled = loss(anchor), loss(anchor.roll(1, dims=0))
    return true, shuffled


def split_reconstruction_gap(model: Transformer, fmt: TextFormat, pairs: list[Pair],
                             task: str = "d2q", batch: int = 16,
                             how: Decoding = PAPER) -> tuple[float, float]:
    """reconstruction_gap over many pairs, `batch` at a time (each batch's anchors rolled within
    it): the mean over batches of the true and of the shuffled anchor's loss."""
    losses = anchor_losses(model, fmt, pairs, task, batch, how, kinds=("true", "shuffled"))
    return losses["true"], losses["shuffled"]


@torch.no_grad()
def anchor_losses(model: Transformer, fmt: TextFormat, pairs: list[Pair], task: str,
                  batch: int = 16, how: Decoding = PAPER, kinds=("true", "shuffled", "mean"),
                  shufflings: int = 1) -> dict:
    """Target loss per token over `pairs`, `batch` at a time, given three anchors: "true" (the
    pair's own), "shuffled" (another pair's: anchors rolled by 1, 2, .. `shufflings` within the
    batch, the mean over the rolls) and "mean" (the batch's mean anchor). shuffled - true > 0 says
    the [EOS] vector carries the other side; true < mean rules out a decoder that merely breaks on
    a foreign vector. Mean over batches of each of `kinds`; with "shuffled", "each" holds the loss
    of every roll apart (the noise band of the gap: which other pair's anchor it was)."""
    how = how.at_inference()
    sums, each, n = dict.fromkeys(set(kinds) - {"shuffled"}, 0.0), [0.0] * shufflings, 0
    for i in range(0, len(pairs), batch):
        anchor, targets, mask = _stage1_inputs(model, fmt, pairs[i:i + batch], task)
        loss = lambda a: reconstruction_loss(model, a, targets, mask, how=how,  # noqa: E731
                                             prompt=how.prompt(fmt, task)).item()
        if "true" in sums:
            sums["true"] += loss(anchor)
        if "shuffled" in kinds:  # roll k of a batch of b is another pair's anchor for 0 < k < b
            each = [e + loss(anchor.roll(1 + k % max(1, len(anchor) - 1), dims=0))
                    for k, e in enumerate(each)]
        if "mean" in sums:
            sums["mean"] += loss(anchor.mean(0, keepdim=True).expand_as(anchor))
        n += 1
    out = {k: v / n for k, v in sums.items()}
    if "shuffled" in kinds:  # the mean over the rolls, and each roll's
        out["each"] = [e / n for e in each]
        out["shuffled"] = sum(out["each"]) / shufflings
    return out


@torch.no_grad()
def generate(model: Transformer, prefix, stop_id: int, max_new: int = 48) -> list[list[int]]:
    """Greedy decoding after input embeddings prefix (B, P, D): one full forward pass per new
    token (no cache: short outputs, readable code). Each row ends at `stop_id` (not returned) or
    after `max_new` tokens."""
    x, E = prefix, model.model.embed_tokens
    out, done = [[] for _ in range(len(x))], [False] * len(x)
    for _ in range(max_new):
        h = model(inputs_embeds=x)[:, -1]  # (B, D): the state that predicts the next token
        nxt = model.lm_head(h).argmax(dim=-1)  # (B,)
        for i, t in enumerate(nxt.tolist()):
            done[i] = done[i] or t == stop_id
            if not done[i]:
                out[i].append(t)
        if all(done):
            break
        x = torch.cat([x, E(nxt)[:, None, :].to(x.dtype)], dim=1)
    return out


def reconstruct(model: Transformer, anchor, stop_id: int, max_new: int = 48,
                how: Decoding = PAPER, prompt=()) -> list[list[int]]:
    """Greedy decoding of the other side from anchor embeddings (B, D), as Stage I's decoder sees
    them (how.at_inference(): Decoding.prefix, then the tokens chosen so far)."""
    W = model.model.embed_tokens.weight
    prefix = how.at_inference().prefix(anchor.to(W.device), W, prompt)
    return generate(model, prefix, stop_id, max_new)


@torch.no_grad()
def regenerate(model: Transformer, fmt: TextFormat, pairs: list[Pair], task: str,
               how: Decoding = PAPER, tokens: int = 6, batch: int = 16) -> list[str]:
    """Each pair's other side regenerated greedily (at most `tokens` tokens) from its own anchor,
    the anchors read `batch` at a time as in training, all rows then decoded together: the texts
    a form check reads (6 tokens hold the form of 99.75% of WordNet's training queries)."""
    how, W = how.at_inference(), model.model.embed_tokens.weight
    prefixes = []
    for i in range(0, len(pairs), batch):
        sources, _ = stage1_sides(pairs[i:i + batch], task)
        prefixes.append(how.prefix(embed_texts(model, fmt, sources), W, how.prompt(fmt, task)))
    return [fmt.tok.decode(ids) for ids in generate(model, torch.cat(prefixes), fmt.eos_id, tokens)]


@torch.no_grad()
def reconstruction_samples(model: Transformer, fmt: TextFormat, pairs: list[Pair], tokens: int = 32,
                           width: int = 160, how: Decoding = PAPER,
                           show: int | None = None) -> list[str]:
    """Printable lines showing what the [EOS] vector remembers: for each of the first `show` pairs
    (default all) its query and document, each regenerated greedily from the other side's vector
    (EBQ2D, EBD2Q) and from the next pair's vector ("shuffled"), each as long as its truth, at most
    `tokens` tokens (decoding without a cache costs the square of the length). Every pair is
    embedded: anchors are read (Decoding.prefix: centred) over all of them, as a training batch."""

    def clip(text):  # one line, at most `width` characters
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 3] + "..."

    how, W = how.at_inference(), model.model.embed_tokens.weight
    n, rows = show or len(pairs), {}
    for task in ("q2d", "d2q"):
        sources, truths = stage1_sides(pairs, task)
        lengths = [min(tokens, len(fmt.target_ids(t))) for t in truths[:n]]
        anchor, prompt = embed_texts(model, fmt, sources), how.prompt(fmt, task)
        both = torch.cat([how.prefix(anchor, W, prompt)[:n],  # own, then the next pair's
                          how.prefix(anchor, W, prompt, roll=-1)[:n]])
        out = generate(model, both, fmt.eos_id, max(lengths))
        rows[task] = [fmt.tok.decode(ids[:lengths[i % n]]) for i, ids in enumerate(out)]
    lines = []
    for i, p in enumerate(pairs[:n]):
        lines += [f"  query     {clip(p.query)}", f"  document  {clip(p.positive)}",
                  f"  EBQ2D     {clip(rows['q2d'][i])}", f"  shuffled  {clip(rows['q2d'][n + i])}",
                  f"  EBD2Q     {clip(rows['d2q'][i])}", f"  shuffled  {clip(rows['d2q'][n + i])}"]
    return lines


def heldout_report(model: Transformer, fmt: TextFormat, sets: dict[str, list[Pair]],
                   how: Decoding = PAPER, show: int = 1, what: str = "held-out pairs",
                   at: str = "", shufflings: int = 3) -> list[str]:
    """Printable lines on what the [EOS] vectors carry, for each dataset of `sets` ({name: pairs}):
    its first `show` pairs regenerated both ways (reconstruction_samples, the anchors read over
    the first 16 pairs, a batch), then the gap over all its pairs (anchor_losses): another pair's
    anchor's target loss minus the own one's (the mean over `shufflings` and their range), and
    the batch-mean anchor's; for a dataset with a form check, the share written in the right
    side's form (form_line).
    `at`: " at step 50".
    Runs in eval mode and leaves the model's mode and fmt's count of cut texts as they were."""
    training, counted = model.training, fmt.truncated  # a training run counts its own texts
    model.eval()
    lines = [f"samples{at} ({what}; each side regenerated from the other's [EOS] vector, and from "
             "another pair's):"]
    for pairs in sets.values():
        lines += reconstruction_samples(model, fmt, pairs[:max(show + 1, 16)], how=how, show=show)
    for name, pairs in sets.items():
        if len(pairs) < 2:
            continue
        g = {task: anchor_losses(model, fmt, pairs, task, how=how, shufflings=shufflings)
             for task in ("d2q", "q2d")}
        cells = (f"{label} {x['shuffled'] - x['true']:+.3f} [{min(x['each']) - x['true']:+.3f}, "
                 f"{max(x['each']) - x['true']:+.3f}] (own {x['true']:.3f}, another's "
                 f"{x['shuffled']:.3f}, mean {x['mean']:.3f})"
                 for label, x in (("EBD2Q", g["d2q"]), ("EBQ2D", g["q2d"])))
        lines += [f"{what} gap{at}, {name} ({len(pairs)} pairs; target loss per token given "
                  f"another pair's anchor minus given its own, [lowest, highest] over "
                  f"{shufflings} shufflings):", "  " + " | ".join(cells)]
        if name in SIDE_FORMS:
            lines.append(form_line(model, fmt, name, pairs, how, what, at))
    model.train(training)
    fmt.truncated = counted
    return lines


def form_line(model: Transformer, fmt: TextFormat, name: str, pairs: list[Pair],
              how: Decoding = PAPER, what: str = "held-out pairs", at: str = "") -> str:
    """The share of `pairs` whose greedy regeneration (its first 6 tokens, regenerate) has the form
    of the side it should be (data.written_side): a document from the query's vector (EBQ2D), a
    query from the document's (EBD2Q)."""
    share = {task: np.mean([written_side(name, t) == want
                            for t in regenerate(model, fmt, pairs, task, how)])
             for task, want in (("q2d", "document"), ("d2q", "query"))}
    return (f"{what} form{at}, {name}: {share['q2d']:.0%} of {len(pairs)} EBQ2D regenerations read "
            f"as documents, {share['d2q']:.0%} of EBD2Q ones as queries")
