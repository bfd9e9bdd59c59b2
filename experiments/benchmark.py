"""
Speed and memory of this implementation against the ordinary `transformers` way of doing the same
work, on the same weights and the same batches, in one run. Not a test (pytest does not collect
it); run it directly:

  python experiments/benchmark.py                    # CPU defaults: about 8 minutes on 2 cores
  python experiments/benchmark.py --configs recipe   # only the default recipe's steps
  python experiments/benchmark.py --configs defaults # train.py's default stages: time and peak RSS
  python experiments/benchmark.py --device cuda      # the default where a GPU is present: bf16
  python experiments/benchmark.py --configs llama3 --dtypes float32 --batch-size 16 --repeats 3
  python experiments/benchmark.py --configs smollm2 --batch-size 8 --doc-tokens 256 --max-length 320 \
      --grad-ckpt --sum-only --repeats 1      # paper-shaped Stage I: passages, checkpointing

What is compared, for each model config and dtype
1. One Stage I step (paper, Stage I) in `sum` mode: E(query) and E(document), both reconstructions
   (EBD2Q and EBQ2D) on the same batch, loss 0.8 L_D2Q + 0.2 L_Q2D, backward. The optimizer step is
   left out (the same on both sides).
   ours: bireco.stage1_sum_loss, as train.py's sum mode: the anchor directly before the target
   tokens; one output-layer pass over both tasks' target positions only, in chunks whose
   gradients are taken as soon as their loss is (no logits kept for backward).
   reference: transformers' LlamaForCausalLM (attn_implementation="sdpa") used the way the official
   code computes Stage I: E(.) is the last hidden state at the last position of a left-padded
   batch; the decoder input is [anchor, left-padded target tokens] with default position ids;
   logits at every position over the whole vocabulary, and the model's own cross-entropy
   (labels=) on the target positions.
   Also our default, interleaved mode (one task per batch): 0.8 t(EBD2Q step) + 0.2 t(EBQ2D step)
   against the reference's sum step, i.e. what one batch costs in each training recipe.
   And a bound: ours with the output layer removed (the loss is a plain sum of the target
   positions' hidden states), i.e. the transformer passes that every implementation runs. Target-
   only chunked logits can at best bring a step down to it; where it is above the targets (a
   small vocabulary next to many layers, short texts, parameter gradients that outweigh the
   activations), no output-layer scheme meets them.
2. Encoding a corpus of mixed-length texts (held-out WordNet queries and glosses, some glosses
   joined so that lengths range from ~10 to a few hundred tokens): texts/s of bireco.Embedder
   (length-sorted batches) and of ours in the given order, against transformers' LlamaModel with
   last-token pooling over left-padded batches in the given order, all at the same batch size.
   The two embeddings must agree (min cosine over the corpus > 0.999).
3. Model FLOP utilisation (MFU) = model FLOPs / time / peak, where the peak is the rate of a large
   square x @ W.T matmul on the same device and dtype, timed at the start and at the end of the
   run (the better of the two). Model FLOPs count real (non-padding) tokens, per sequence of n:
       forward  = 2 P n + 2 L H d n^2   (+ 2 D V per reconstruction target token)
       training = 3 x forward
   P = parameters outside the embedding and lm_head, L layers, H query heads, d head size, D
   hidden size, V vocabulary; 2 L H d n^2 is causal attention (QK^T and AV over half the n x n
   square). Padding is work done but not counted.

The recipe (config `recipe`): the steps train.py's defaults run (STAGE_DEFAULTS), on a batch of
each bundled dataset, in the dtype `--dtype auto` picks (bf16 autocast over fp32 weights on CPUs
with bf16 matrix units, fp32 elsewhere), the reference doing the same step:
- Stage I: full fine-tune, one task per batch, each dataset and task weighted as train.py visits
  them (--mix and --task-weights of STAGE_DEFAULTS), ours against the reference computing that one
  task its way (both with the paper's decoder input); pairs/s. Beside it, ours as train.py runs
  the step: the default decoder input (bireco.Decoding) and the batch's gap (one more decoder pass
  without autograd), its MFU counting the training FLOPs only.
- Stage II: LoRA (the same adapters on both sides), ours as train.py runs it (passes of texts of
  similar length; the cached step where the batch's passes exceed --chunk), against the reference
  embedding queries, positives and negatives each as one left-padded batch with autograd, the same
  InfoNCE, one backward; pairs/s. The base is frozen, so its model FLOPs are 2 x forward (no weight
  gradients); a cached step's second forward is work done but not counted.
- Targets: >= 1.5x the reference's pairs/s; MFU >= 40% of the matmul peak of the compute dtype
  (and, for a bf16 run, the same rate against the fp32 peak, also measured).

The defaults (config `defaults`): `python train.py --stage recon` and `--stage contrastive` with
their default settings for --default-steps steps each, every run a child process, timed whole
(model loading, the steps and one checkpoint) and its peak resident memory read from the child's
rusage (what `/usr/bin/time -v` prints as "Maximum resident set size"; it counts what malloc keeps
cached, unlike the profiler above). Stage II runs again as one plain pass (--chunk 8192, the
default before the cached step's 1,024) as the reference, so the trade between time and memory
is in the table. Targets: at most 6 GB each (a 16 GB laptop), Stage II's default at no more than
1.25x the plain pass's time. In the dtype `--dtype auto` picks, or each of --dtypes.

Workloads
- The defaults (workload()) fit the whole CPU run into a few minutes: WordNet pairs, whose
  documents are one gloss (~10-40 tokens), so the output layer is a small part of a step.
- The paper's Stage I is a full fine-tune on passages at max length 512, which on any model needs
  activation checkpointing (llm2vec, which the official code forks, turns it on in its configs);
  --doc-tokens N extends each document with other glosses to N+ tokens and --grad-ckpt checkpoints
  every layer on both sides. That is where the (B, T, V) logits weigh most next to what the layers
  keep; on 2 CPU cores one such SmolLM2 step takes about half a minute.

Configs
- smollm2: the real SmolLM2-135M-Instruct (smollm2.default_model_dir; set $BIRECO_CACHE).
- llama3: random weights with the Llama-3 vocabulary (128256, tied), 2 layers, hidden 256: the
  output layer and its (B, T, V) logits dominate, an exaggerated Llama-3 (in Llama-3.2-1B the
  logits block is comparable to all the activations its layers keep for backward). It reads text
  with SmolLM2's tokenizer (ids below 49152): the output layer's cost depends on V, not on the ids.

How it is measured
- Time: after a warm-up step, ours and the reference alternate (ours first, then reference first),
  and each side reports its best repetition: on a machine shared with other work the minimum is
  the least disturbed estimate. CUDA is synchronised around every timed call.
- Peak memory of one step above what was allocated before it (the weights; gradients are set to
  None before every step, so allocating them counts, on both sides alike). CUDA:
  torch.cuda.max_memory_allocated. CPU: torch's memory profiler (profile_memory=True) records
  every allocation and free made through torch's CPU allocator; the largest running total during
  the step is its peak. That counts every tensor exactly (activations, logits, gradients) and
  nothing else: no oneDNN scratch space or Python objects, and unlike the process's resident
  memory it does not depend on what malloc keeps cached. The profiled step is the warm-up step
  and is not timed.
- On a CPU shared with other work, OpenMP threads that spin while waiting for each other make
  multi-threaded timings erratic (here a Stage I step took 5-9x longer at 2 threads under load);
  the script sets OMP_WAIT_POLICY=PASSIVE unless it is set already, for both sides alike.
- bf16 on a CPU without bf16 matmul instructions (no AVX512-BF16 or AMX) is slower than fp32 and
  depends on the operand layout; the notes print the rates of x @ W.T (forward) and x @ W (the
  input gradient in backward), which bound what bf16 training can reach there. So the CPU bf16
  run is a tiny one on the llama3 config.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the memory profiler's start/stop log lines

import argparse
import copy
import dataclasses
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bireco  # noqa: E402
import hardware  # noqa: E402
from data import Batches, TextFormat, load_pairs, read_jsonl  # noqa: E402
from model import ModelConfig, Transformer, load_model, load_tokenizer, save_model  # noqa: E402
from tiny import left_pad  # noqa: E402  (this folder is on sys.path when run as a script)

CONFIGS = ("recipe", "defaults", "smollm2", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGETS = dict(step="speed >= 1.25x", memory="<= 0.60x", encode_equal=">= 1.00x",
               encode_sorted=">= 1.50x", agree="> 0.999", agree_bf16="ours >= ref - 0.001",
               recipe=">= 1.50x", recipe_mfu=">= 40% of peak")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
parser.add_argument("--configs", default=None, help=f"comma-separated, from {','.join(CONFIGS)}; default: all")
parser.add_argument("--dtypes", default=None, help="comma-separated float32,bfloat16; default: "
                    "bfloat16 on CUDA; on CPU float32 for every config plus bfloat16 for llama3")
parser.add_argument("--batch-size", type=int, default=None, help="pairs per Stage I batch (default: workload())")
parser.add_argument("--encode-batch-size", type=int, default=None, help="texts per encoding batch")
parser.add_argument("--texts", type=int, default=None, help="texts in the encoding corpus")
parser.add_argument("--repeats", type=int, default=None, help="timed repetitions of each side")
parser.add_argument("--max-length", type=int, default=None, help="tokens per text, EOS included")
parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
parser.add_argument("--doc-tokens", type=int, default=0, help="Stage I documents of at least this many "
                    "tokens (glosses joined; --max-length still cuts); 0: WordNet's one-gloss documents")
parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per layer on both "
                    "sides, as full fine-tuning at max length 512 needs (llm2vec's configs turn it on)")
parser.add_argument("--sum-only", action="store_true", help="time only the sum steps (ours, reference, "
                    "bound), not our one-task steps: for long workloads")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--default-steps", type=int, default=4, help="steps of each default stage "
                    "(config defaults); the bundled data alternate WordNet and man-pages batches")


def workload(device, config, dtype):
    """How much work each run does by default: sized so the whole CPU run takes a few minutes."""
    if device.type == "cuda":
        return dict(batch=32, texts=2048, encode_batch=64, repeats=5, max_length=512)
    if dtype == torch.bfloat16:  # one pair: bf16 matmuls run at a few GFLOP/s or less on such CPUs
        return dict(batch=1, texts=8, encode_batch=4, repeats=2, max_length=40)
    if config == "smollm2":
        return dict(batch=2, texts=32, encode_batch=4, repeats=3, max_length=64)
    return dict(batch=16, texts=64, encode_batch=16, repeats=2, max_length=256)


# -----------------------------------------------------------------------------
# The two models, on the same weights


def llama3_folder(out, tokenizer_dir, seed):
    """A random Llama-3-vocabulary checkpoint (tied, 2 layers, hidden 256) with SmolLM2's tokenizer."""
    with open(os.path.join(tokenizer_dir, "config.json")) as f:
        hf = json.load(f)
    cfg = ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=128256, hidden_size=256, intermediate_size=768,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=hf["bos_token_id"], eos_token_id=hf["eos_token_id"]))
    random_checkpoint(out, cfg, seed)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), out)
    return out


def random_checkpoint(out, cfg, seed):
    """Weights drawn from N(0, 0.02) (norms at 1) for config `cfg`, saved to `out`."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    save_model(model, out)


def load_both(path, device, dtype):
    from transformers import LlamaForCausalLM

    ours = load_model(path, device=device, dtype=dtype)
    ref = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    for name, p in ref.named_parameters():  # the same weights, or the comparison means nothing
        assert torch.equal(p, ours.get_parameter(name)), name
    return ours, ref


# -----------------------------------------------------------------------------
# The reference: transformers, used the way the official code computes Stage I



def ref_embed(ref, seqs, pad_id):
    """Last-token pooling over a left-padded batch: (B, D)."""
    ids, mask = left_pad(seqs, pad_id)
    mask = mask.long()  # transformers' attention_mask convention
    dev = ref.lm_head.weight.device
    out = ref.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    return out.last_hidden_state[:, -1]


def ref_reconstruction(ref, anchor, seqs, pad_id):
    """[anchor, left-padded targets], default positions 0..n, full (B, n+1, V) logits, CE on targets."""
    ids, mask = left_pad(seqs, pad_id)
    mask = mask.long()
    dev = anchor.device
    ids, mask = ids.to(dev), mask.to(dev)
    x = torch.cat([anchor[:, None], ref.model.embed_tokens(ids)], dim=1)  # (B, n+1, D)
    attn = torch.cat([mask.new_ones(len(seqs), 1), mask], dim=1)
    labels = torch.cat([torch.full_like(ids[:, :1], -100), ids.masked_fill(mask == 0, -100)], dim=1)
    return ref(inputs_embeds=x, attention_mask=attn, labels=labels, use_cache=False).loss


def ref_stage1(ref, fmt, pairs, weights):
    total = 0.0
    for task, w in weights.items():
        if task == "d2q":  # EBD2Q: E(document) regenerates the query
            anchor = ref_embed(ref, [fmt.embed_ids(p.positive) for p in pairs], fmt.pad_id)
            targets = [fmt.target_ids(p.query) for p in pairs]
        else:  # EBQ2D: E(instruction, query) regenerates the document
            anchor = ref_embed(ref, [fmt.embed_ids(p.query, p.instruction) for p in pairs], fmt.pad_id)
            targets = [fmt.target_ids(p.positive) for p in pairs]
        total = total + w * ref_reconstruction(ref, anchor, targets, fmt.pad_id)
    total.backward()
    return total.item()


@torch.no_grad()
def same_objective(ours, ours32, ref, fmt, pair):
    """EBD2Q loss of one pair on both sides, (ours, reference): without padding the two compute
    the same function, so in fp32 the losses must agree. In bf16 they round differently (on
    SmolLM2 one pair's loss is 12.45 in fp32, 12.32 ours and 11.16 the reference's in bf16), so a
    bf16 run checks fp32 copies of its weights (ours32 and one of ref) and reports its own losses
    as well."""
    def losses(ours, ref):
        a = bireco.stage1_loss(ours, fmt, [pair], "d2q")[0].item()
        anchor = ref_embed(ref, [fmt.embed_ids(pair.positive)], fmt.pad_id)
        return a, ref_reconstruction(ref, anchor, [fmt.target_ids(pair.query)], fmt.pad_id).item()
    native = losses(ours, ref)
    if ours32 is ours:
        return native, native
    return losses(ours32, copy.deepcopy(ref).float()), native


def ours_stage1(model, fmt, pairs, weights):
    total = bireco.stage1_sum_loss(model, fmt, pairs, weights)[0]
    total.backward()
    return total.item()


def floor_stage1(model, fmt, pairs, weights):
    """Ours with the output layer's work removed (the loss is the sum of the target positions'
    hidden states): the encoder and decoder passes alone, which any Stage I implementation runs.
    Its time and memory over the reference's bound what output-layer savings can reach."""
    total = sum(bireco._decode(model, *bireco._stage1_inputs(model, fmt, pairs, task))[0].float().sum()
                for task in weights)
    total.backward()
    return total.item()


@torch.no_grad()
def ref_encode(ref, fmt, texts, batch_size):
    out = []
    for i in range(0, len(texts), batch_size):
        e = ref_embed(ref, [fmt.embed_ids(t) for t in texts[i:i + batch_size]], fmt.pad_id)
        out.append(F.normalize(e.float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def ours_encode_unsorted(embedder, texts, batch_size):
    """Ours with the texts in the given order: one Embedder call per batch, so nothing is sorted."""
    return np.concatenate([embedder.encode(texts[i:i + batch_size], batch_size=batch_size)
                           for i in range(0, len(texts), batch_size)])


# -----------------------------------------------------------------------------
# Measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def peak_memory(fn, device):
    """Bytes allocated at the peak of fn() above those allocated when it starts (see docstring)."""
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)  # the running total starts at 0 when profiling starts


def interleaved(sides, repeats, device):
    """Best time of each named side, alternating their order between repetitions."""
    best = {name: float("inf") for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            best[name] = min(best[name], timed(sides[name], device))
    return best


def matmul_peak(device, dtype, n):
    """FLOP/s of the best of three n x n x n matmuls in the x @ W.T layout that nn.Linear uses."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    F.linear(a, b)
    return 2 * n ** 3 / min(timed(lambda: F.linear(a, b), device) for _ in range(3))


def model_flops(model, seq_lens, n_targets=0, training=True):
    """Model FLOPs of a set of sequences of real lengths seq_lens (see docstring)."""
    c = model.config
    P = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    attn = 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    forward = sum(2 * P * n + attn * n * n for n in seq_lens) + 2 * c.hidden_size * c.vocab_size * n_targets
    return 3 * forward if training else forward


# -----------------------------------------------------------------------------
# Inputs


def mixed_corpus(n, seed):
    """n texts from the held-out WordNet split: single queries and glosses, and runs of 2-4 and
    8-16 glosses joined into one text, so lengths vary widely, in a shuffled (unsorted) order."""
    read = lambda name: [row["text"] for _, row in read_jsonl(os.path.join(ROOT, "wordnet", "test", name))]
    queries, glosses = read("queries.jsonl.gz"), read("corpus.jsonl.gz")
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        kind = i % 10  # in every 10 texts: 4 queries, 3 glosses, 2 short runs, 1 long run
        if kind < 4:
            texts.append(rng.choice(queries))
        else:
            k = 1 if kind < 7 else rng.randint(2, 4) if kind < 9 else rng.randint(8, 16)
            texts.append(" ".join(rng.sample(glosses, k)))
    rng.shuffle(texts)
    return texts


def long_documents(pairs, all_pairs, fmt, tokens, seed):
    """The pairs with each positive extended by other pairs' glosses to at least `tokens` tokens:
    passage-length Stage I targets, as in the paper's data, from the same real text."""
    rng, out = random.Random(seed), []
    for p in pairs:
        doc = p.positive
        while len(fmt.ids(doc)) < tokens:
            doc += " " + rng.choice(all_pairs).positive
        out.append(dataclasses.replace(p, positive=doc))
    return out


def padded_tokens(lens, batch_size):
    return sum(max(lens[i:i + batch_size]) * len(lens[i:i + batch_size]) for i in range(0, len(lens), batch_size))


# -----------------------------------------------------------------------------
# One config and dtype: the three comparisons


class Rate(float):
    """Achieved FLOP/s, printed as % of the matmul peak once the peak is known (end of the run):
    the peak of the row's dtype, or of `against`."""

    def __new__(cls, value, against=None):
        rate = super().__new__(cls, value)
        rate.against = against
        return rate


class Report:
    def __init__(self):
        self.rows, self.notes = [], []

    def add(self, config, dtype, metric, ours, ref="", ratio="", target="", ok=None):
        verdict = "" if ok is None else "ok" if ok else "MISS"
        self.rows.append((config, dtype, metric, ours, ref, ratio, target, verdict))

    def print(self, peaks):
        peak = lambda v, dtype: peaks[v.against or dtype]
        mfu = lambda v, dtype: f"{100 * v / peak(v, dtype):.1f}" if isinstance(v, Rate) else v
        rows = [(c, d, m, mfu(a, d), mfu(b, d), ratio, target,
                 ("ok" if a >= 0.4 * peak(a, d) else "MISS") if target == TARGETS["recipe_mfu"] else verdict)
                for c, d, m, a, b, ratio, target, verdict in self.rows]
        header = ("config", "dtype", "metric", "ours", "reference", "ratio", "target", "")
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
        print("\n" + line(header))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print(line(r))
        print("\nratio: speed of ours over the reference (for times: reference / ours); memory: ours / reference")
        print("MFU = model FLOPs / time / matmul peak. Training FLOPs per sequence of n real tokens: "
              "3 (2 P n + 2 L H d n^2), plus 6 D V per reconstruction target; encoding: 2 P n + 2 L H d n^2")
        for n in self.notes:
            print("- " + n)


def run(config, dtype, device, w, model_dir, all_pairs, peaks, report, seed):
    dname = str(dtype).removeprefix("torch.")
    extra = ((f", documents of {w['doc_tokens']}+ tokens" if w["doc_tokens"] else "")
             + (", activation checkpointing" if w["grad_ckpt"] else ""))
    print(f"== {config} {dname}: Stage I batch {w['batch']}{extra}, corpus {w['texts']} texts in batches of "
          f"{w['encode_batch']}, max length {w['max_length']}, {w['repeats']} timed repetition(s)", flush=True)
    add = lambda *a, **k: report.add(config, dname, *a, **k)
    ours, ref = load_both(model_dir, device, dtype)
    tok, eos_ids = load_tokenizer(model_dir)
    fmt = TextFormat(tok, eos_ids, w["max_length"])

    # 1. Stage I step, sum mode on both sides; ours also one task per batch (interleaved)
    pairs = random.Random(seed).sample(all_pairs, w["batch"])
    if w["doc_tokens"]:
        pairs = long_documents(pairs, all_pairs, fmt, w["doc_tokens"], seed)
    ours32 = ours if dtype == torch.float32 else copy.deepcopy(ours).float()  # bf16 checks against it
    (a, b), (a_native, b_native) = same_objective(ours, ours32, ref, fmt, pairs[0])
    if abs(a - b) > 1e-3 * abs(a):
        raise AssertionError(f"{config} {dname}: on one unpadded pair in fp32 the reference's loss {b} != ours {a}")
    ours.train(), ref.train()
    if w["grad_ckpt"]:
        ours.gradient_checkpointing = True
        kw = dict(use_reentrant=False)
        if hasattr(ref, "activation_checkpointing_enable"):  # its name since transformers 5.x
            ref.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    losses = {}

    def step(name, fn, model, weights):
        def go():  # every step starts and ends without gradients, so allocating them is counted
            losses[name] = fn(model, fmt, pairs, weights)
            model.zero_grad(set_to_none=True)
        return go

    steps = {"ours": step("ours", ours_stage1, ours, dict(d2q=0.8, q2d=0.2)),
             "ref": step("ref", ref_stage1, ref, dict(d2q=0.8, q2d=0.2)),
             "floor": step("floor", floor_stage1, ours, dict(d2q=0.8, q2d=0.2))}
    mem = {name: peak_memory(steps[name], device) for name in steps}  # also the warm-up
    if not w["sum_only"]:
        steps.update({"ours d2q": step("ours d2q", ours_stage1, ours, dict(d2q=1.0)),
                      "ours q2d": step("ours q2d", ours_stage1, ours, dict(q2d=1.0))})
    t = interleaved(steps, w["repeats"], device)  # the profiled step above was the warm-up
    add("Stage I step, sum (s)", f"{t['ours']:.3f}", f"{t['ref']:.3f}", f"{t['ref'] / t['ours']:.2f}x",
        TARGETS["step"], t["ref"] / t["ours"] >= 1.25)
    add("Stage I peak memory (MB)", f"{mem['ours'] / 2**20:.1f}", f"{mem['ref'] / 2**20:.1f}",
        f"{mem['ours'] / mem['ref']:.2f}x", TARGETS["memory"], mem["ours"] <= 0.6 * mem["ref"])
    if not w["sum_only"]:
        t_inter = 0.8 * t["ours d2q"] + 0.2 * t["ours q2d"]
        add("Stage I step, ours interleaved (s)", f"{t_inter:.3f}", f"{t['ref']:.3f}",
            f"{t['ref'] / t_inter:.2f}x", "(vs reference sum)")
    add("Stage I sum step without output layer (s)", f"{t['floor']:.3f}", f"{t['ref']:.3f}",
        f"{t['ref'] / t['floor']:.2f}x", "(bound)")
    add("Stage I memory without output layer (MB)", f"{mem['floor'] / 2**20:.1f}", f"{mem['ref'] / 2**20:.1f}",
        f"{mem['floor'] / mem['ref']:.2f}x", "(bound)")
    seqs = ([len(fmt.embed_ids(p.query, p.instruction)) for p in pairs]
            + [len(fmt.embed_ids(p.positive)) for p in pairs])
    targets = [len(fmt.target_ids(p.query)) for p in pairs] + [len(fmt.target_ids(p.positive)) for p in pairs]
    flops = model_flops(ours, seqs + targets, sum(targets))
    grads = sum(p.numel() * p.element_size() for p in ours.parameters())
    report.notes.append(
        f"{config} {dname}: Stage I loss on one unpadded pair: ours {a:.5f}, reference {b:.5f} in fp32"
        f"{'' if dtype == torch.float32 else f', ours {a_native:.5f}, reference {b_native:.5f} in {dname}'}; on the batch: "
        f"ours {losses['ours']:.4f}, reference {losses['ref']:.4f} (the reference's left padding shifts "
        f"positions); {sum(seqs) + sum(targets)} real tokens and {flops / 1e9:.1f} model GFLOP per sum "
        f"step; both peaks include {grads / 2**20:.0f} MB of gradients")

    # 2. encoding a mixed-length corpus at one batch size
    texts = mixed_corpus(w["texts"], seed)
    lens = [len(fmt.embed_ids(t)) for t in texts]
    embedder, bs, out = bireco.Embedder(ours, fmt), w["encode_batch"], {}
    ref.eval()
    embedder.encode(texts[:bs], batch_size=bs), ref_encode(ref, fmt, texts[:bs], bs)  # warm-up
    sides = {"ours sorted": lambda: out.__setitem__("ours sorted", embedder.encode(texts, batch_size=bs)),
             "ours": lambda: out.__setitem__("ours", ours_encode_unsorted(embedder, texts, bs)),
             "ref": lambda: out.__setitem__("ref", ref_encode(ref, fmt, texts, bs))}
    rate = {k: len(texts) / v for k, v in interleaved(sides, w["repeats"], device).items()}
    cos = min(float((out[k] * out["ref"]).sum(1).min()) for k in ("ours", "ours sorted"))
    add("encode, equal batch, given order (texts/s)", f"{rate['ours']:.1f}", f"{rate['ref']:.1f}",
        f"{rate['ours'] / rate['ref']:.2f}x", TARGETS["encode_equal"], rate["ours"] >= rate["ref"])
    add("encode, ours length-sorted (texts/s)", f"{rate['ours sorted']:.1f}", f"{rate['ref']:.1f}",
        f"{rate['ours sorted'] / rate['ref']:.2f}x", TARGETS["encode_sorted"],
        rate["ours sorted"] >= 1.5 * rate["ref"])
    if dtype == torch.float32:
        add("encode, embedding agreement (min cos)", f"{cos:.6f}", target=TARGETS["agree"], ok=cos > 0.999)
    else:  # each side rounds its own way: both against fp32 embeddings from the same weights
        exact = bireco.Embedder(ours32, fmt).encode(texts, batch_size=bs)
        c_ours, c_ref = (float((out[k] * exact).sum(1).min()) for k in ("ours sorted", "ref"))
        add("encode, min cos to fp32 embeddings", f"{c_ours:.6f}", f"{c_ref:.6f}",
            target=TARGETS["agree_bf16"], ok=c_ours >= c_ref - 1e-3)
        report.notes.append(f"{config} {dname}: min cos between our embeddings and the reference's: {cos:.6f}")
    report.notes.append(
        f"{config} {dname}: corpus of {len(texts)} texts of {min(lens)}-{max(lens)} tokens (mean "
        f"{np.mean(lens):.0f}); tokens per pass with padding: given order {padded_tokens(lens, bs)}, "
        f"length-sorted {padded_tokens(sorted(lens), bs)}; real {sum(lens)}")

    # 3. MFU, against the matmul peak of this dtype
    enc_flops = model_flops(ours, lens, training=False)
    add("MFU, Stage I sum step (%)", Rate(flops / t["ours"]), Rate(flops / t["ref"]), target="-")
    add("MFU, encoding (%)", Rate(enc_flops * rate["ours sorted"] / len(texts)),
        Rate(enc_flops * rate["ref"] / len(texts)), target="-")


# -----------------------------------------------------------------------------
# The recipe: the steps that train.py's defaults run, on the bundled data


def ref_contrastive(ref, fmt, batch, temperature):
    """Stage II the ordinary way: queries, positives and negatives each embedded as one left-padded
    batch with autograd (no cached step), the same InfoNCE, one backward."""
    q = ref_embed(ref, [fmt.embed_ids(p.query, p.instruction) for p in batch], fmt.pad_id)
    d = ref_embed(ref, [fmt.embed_ids(p.positive) for p in batch], fmt.pad_id)
    n = ref_embed(ref, [fmt.embed_ids(p.negative) for p in batch], fmt.pad_id) if batch[0].negative else None
    loss = bireco.contrastive_loss(q, d, n, temperature)[0]
    loss.backward()
    return loss.item()


def run_recipe(device, model_dir, peaks, report, seed, repeats):
    """train.py's default Stage I and Stage II steps (STAGE_DEFAULTS: batch sizes, text lengths,
    full fine-tune / LoRA, --dtype auto as autocast over fp32 weights) on a batch of each bundled
    dataset, ours against the reference doing the same step. Times are per batch, averaged over
    the datasets and, for Stage I, the tasks as the defaults visit them (Stage II's equal mix:
    the datasets alike)."""
    import train

    s1, s2 = train.STAGE_DEFAULTS["recon"], train.STAGE_DEFAULTS["contrastive"]
    compute = hardware.auto_dtype(device)
    dname = str(compute).removeprefix("torch.")
    add = lambda *a, **k: report.add("recipe", dname, *a, **k)
    ctx = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute == torch.bfloat16)
    print(f"== recipe {dname} (autocast over fp32 weights): Stage I batch {s1['batch_size']}, Stage II batch "
          f"{s2['batch_size']} (LoRA r{s2['lora_rank']}), max length {s1['max_length']}, {repeats} timed "
          f"repetition(s), each bundled dataset", flush=True)
    ours, ref = load_both(model_dir, device, torch.float32)
    tok, eos_ids = load_tokenizer(model_dir)
    data = load_pairs(*(os.path.join(ROOT, d, "train") for d in ("wordnet", "manpages")))
    rng = random.Random(seed)

    def add_mfu(stage, flops, ours_s, ref_s):  # against the compute dtype's peak, and the fp32 one for bf16
        add(f"MFU, recipe Stage {stage} step (%)", Rate(flops / ours_s), Rate(flops / ref_s), target=TARGETS["recipe_mfu"])
        if dname != "float32":
            add(f"MFU vs the fp32 peak, recipe Stage {stage} step (%)", Rate(flops / ours_s, "float32"),
                Rate(flops / ref_s, "float32"), target=TARGETS["recipe_mfu"])

    def steps_of(sides, model_of):
        def wrap(name, fn):
            def go():
                with ctx():
                    losses[name] = fn()
                model_of[name].zero_grad(set_to_none=True)
            return go
        return {name: wrap(name, fn) for name, fn in sides.items()}

    # Stage I: full fine-tune, one task per batch (ours as train.py runs it, the reference the same task)
    fmt = TextFormat(tok, eos_ids, s1["max_length"])
    how = bireco.Decoding.from_flags(s1, fmt)
    ours.train(), ref.train()
    t1, flops1, losses = {}, {}, {}
    for name, pairs in data.items():
        batch = rng.sample(pairs, s1["batch_size"])
        sides = {"ours d2q": lambda: bireco.stage1_loss(ours, fmt, batch, "d2q")[0].backward(),
                 "ours q2d": lambda: bireco.stage1_loss(ours, fmt, batch, "q2d")[0].backward(),
                 "train d2q": lambda: bireco.stage1_loss(ours, fmt, batch, "d2q", how=how,
                                                         gap=True)[0].backward(),
                 "train q2d": lambda: bireco.stage1_loss(ours, fmt, batch, "q2d", how=how,
                                                         gap=True)[0].backward(),
                 "ref d2q": lambda: ref_stage1(ref, fmt, batch, dict(d2q=1.0)),
                 "ref q2d": lambda: ref_stage1(ref, fmt, batch, dict(q2d=1.0))}
        steps = steps_of(sides, {k: ref if k.startswith("ref") else ours for k in sides})
        for go in steps.values():  # warm-up
            go()
        for k, v in interleaved(steps, repeats, device).items():
            t1.setdefault(k, []).append(v)
        for task, enc, tgt in (("d2q", [fmt.embed_ids(p.positive) for p in batch], [fmt.target_ids(p.query) for p in batch]),
                               ("q2d", [fmt.embed_ids(p.query, p.instruction) for p in batch],
                                [fmt.target_ids(p.positive) for p in batch])):
            lens = [len(x) for x in enc] + [len(x) for x in tgt]
            flops1.setdefault(task, []).append(model_flops(ours, lens, sum(len(x) for x in tgt)))
    mean = lambda xs: sum(xs) / len(xs)
    # each dataset's share of an epoch's batches as train.py plans them (--mix), and each task's (--task-weights)
    plan = Batches(data, s1["batch_size"], seed, s1["mix"]).plan
    share = [sum(n == name for n, _ in plan) / len(plan) for name in data]
    w = dict(zip(("d2q", "q2d"), (x / sum(s1["task_weights"]) for x in s1["task_weights"])))
    visit = lambda xs: sum(s * x for s, x in zip(share, xs))
    recipe_time = lambda side: sum(w[t] * visit(t1[f"{side} {t}"]) for t in w)
    f1 = sum(w[t] * visit(flops1[t]) for t in w)
    a, b, c = recipe_time("ours"), recipe_time("ref"), recipe_time("train")
    bs = s1["batch_size"]
    add("recipe Stage I step (pairs/s)", f"{bs / a:.1f}", f"{bs / b:.1f}", f"{b / a:.2f}x", TARGETS["recipe"], b / a >= 1.5)
    add_mfu("I", f1, a, b)
    add("recipe Stage I step as train.py runs it (pairs/s)", f"{bs / c:.1f}", f"{bs / b:.1f}", f"{b / c:.2f}x",
        "(+ sided input, batch gap)")
    add("MFU, recipe Stage I step as train.py runs it (%)", Rate(f1 / c), Rate(f1 / b))

    # Stage II: LoRA on both sides (same adapters), the cached step as train.py runs it
    fmt = TextFormat(tok, eos_ids, s2["max_length"])
    torch.manual_seed(seed)
    lora = (s2["lora_rank"], train.parser.get_default("lora_alpha"), train.parser.get_default("lora_dropout"))
    train.add_lora(ours, *lora)
    train.add_lora(ref, *lora)
    with torch.no_grad():
        for k, p in ours.named_parameters():
            if ".lora_" in k:
                ref.get_parameter(k).copy_(p)
    ours.train(), ref.train()
    chunk, temperature = (train.parser.get_default(k) for k in ("chunk", "temperature"))
    t2, flops2, passes = {}, [], []
    for name, pairs in data.items():
        batch = rng.sample(pairs, s2["batch_size"])
        sides = {"ours": lambda: bireco.contrastive_step(ours, fmt, batch, chunk, temperature)[0],
                 "ours one pass": lambda: bireco.contrastive_step(ours, fmt, batch, 10 ** 9, temperature)[0],
                 "ref": lambda: ref_contrastive(ref, fmt, batch, temperature)}
        steps = steps_of(sides, {k: ours if k.startswith("ours") else ref for k in sides})
        for go in steps.values():
            go()
        for k, v in interleaved(steps, repeats, device).items():
            t2.setdefault(k, []).append(v)
        seqs = [fmt.embed_ids(p.query, p.instruction) for p in batch] + [fmt.embed_ids(p.positive) for p in batch] + [
            fmt.embed_ids(p.negative) for p in batch if p.negative]
        lengths = [len(x) for x in seqs]
        chunks = bireco.token_chunks(lengths, chunk)
        padded = bireco.padded_size(lengths, chunks)
        passes.append(f"{name} {len(chunks)} ({padded} padded tokens of {sum(lengths)} real, "
                      f"{'plain' if padded <= chunk else 'cached'})")
        flops2.append(model_flops(ours, lengths, training=False) * 2)  # frozen base: forward + input grads
    a, b, c = (mean(t2[k]) for k in ("ours", "ref", "ours one pass"))
    f2, bs = mean(flops2), s2["batch_size"]
    add("recipe Stage II step (pairs/s)", f"{bs / a:.2f}", f"{bs / b:.2f}", f"{b / a:.2f}x", TARGETS["recipe"], b / a >= 1.5)
    add("recipe Stage II, ours in one pass (pairs/s)", f"{bs / c:.2f}", f"{bs / b:.2f}", f"{b / c:.2f}x", "(all padded alike)")
    add_mfu("II", f2, a, b)
    report.notes.append(
        f"recipe {dname}: per-dataset step times (s), WordNet / man pages: " + "; ".join(
            f"{k} " + " / ".join(f"{v:.2f}" for v in vs) for k, vs in {**t1, **t2}.items())
        + f". Stage II passes at --chunk {chunk}: {', '.join(passes)}. "
        f"Stage II model FLOPs: 2 x forward (the base is frozen: no weight gradients); the second pass "
        f"of a cached step is work done but not counted")


def train_run(argv, out):
    """`python train.py ARGV --out OUT` in a child process: (wall seconds, the child's peak resident
    memory in GB, from its rusage as os.wait4 returns it)."""
    t0 = time.time()
    with open(out + ".log", "w") as log:
        child = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--out", out],
                                 stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"error: train.py {' '.join(argv)} failed; its output: {out}.log")
    return time.time() - t0, usage.ru_maxrss * 1024 / 1e9  # Linux counts ru_maxrss in KiB


def run_defaults(dtype, steps, report, tmp):
    """train.py's default stages for `steps` steps each (run whole, children of this process), and
    Stage II as one plain pass as the reference: wall time and peak resident memory."""
    common = ["--stop-after", str(steps), "--dtype", dtype, "--sample-every", "0", "--log-every", "1"]
    runs = {"Stage I": ["--stage", "recon"], "Stage II": ["--stage", "contrastive"],
            "Stage II one pass": ["--stage", "contrastive", "--chunk", "8192"]}
    got = {name: train_run(argv + common, os.path.join(tmp, f"defaults-{dtype}-{i}"))
           for i, (name, argv) in enumerate(runs.items())}
    (t1, m1), (t2, m2), (t_ref, m_ref) = got.values()
    report.add("defaults", dtype, f"Stage I: {steps} steps, load and save (s)", f"{t1:.0f}")
    report.add("defaults", dtype, "Stage I peak resident memory (GB)", f"{m1:.2f}", target="<= 6 GB",
               ok=m1 <= 6)
    report.add("defaults", dtype, f"Stage II: {steps} steps, load and save (s)", f"{t2:.0f}",
               f"{t_ref:.0f}", f"{t_ref / t2:.2f}x", ">= 0.80x", t_ref / t2 >= 0.8)
    report.add("defaults", dtype, "Stage II peak resident memory (GB)", f"{m2:.2f}", f"{m_ref:.2f}",
               f"{m2 / m_ref:.2f}x", "<= 6 GB", m2 <= 6)
    report.notes.append("defaults: the reference is Stage II as one plain pass (--chunk 8192); "
                        "times include loading the model and data and writing one checkpoint")


def peak_size(device, dtype):
    if device.type == "cuda":
        return 8192
    fast_bf16 = hardware.auto_dtype(device) == torch.bfloat16  # bf16 matrix units: as large as fp32
    return 1024 if dtype == "bfloat16" and not fast_bf16 else 2048


def main():
    args = parser.parse_args()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = args.configs.split(",") if args.configs else list(CONFIGS)
    if any(c not in CONFIGS for c in configs):
        parser.error(f"--configs: choose from {', '.join(CONFIGS)}")
    if args.dtypes:
        if any(d not in DTYPES for d in args.dtypes.split(",")):
            parser.error(f"--dtypes: choose from {', '.join(DTYPES)}")
        runs = [(c, d) for c in configs for d in args.dtypes.split(",")]
    elif device.type == "cuda":
        runs = [(c, "bfloat16") for c in configs]
    else:  # bf16 is slow on this kind of CPU: only the small config, on a tiny workload
        runs = [(c, "float32") for c in configs] + [(c, "bfloat16") for c in configs if c == "llama3"]
    recipe = "recipe" in configs  # runs in the dtype train.py picks (--dtype auto), whatever --dtypes says
    auto_dtype = str(hardware.auto_dtype(device)).removeprefix("torch.")
    defaults = []  # train.py's default stages: in each of --dtypes, else in the dtype auto picks
    if "defaults" in configs:
        defaults = sorted({d for c, d in runs if c == "defaults"}) if args.dtypes else [auto_dtype]
    runs = [(c, d) for c, d in runs if c not in ("recipe", "defaults")]

    import transformers
    from smollm2 import default_model_dir

    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    report = Report()
    print(f"device {device} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}) "
          f"| torch {torch.__version__} | transformers {transformers.__version__}", flush=True)
    dtypes = sorted({d for _, d in runs} | ({auto_dtype, "float32"} if recipe else set()))
    peaks = {d: [matmul_peak(device, DTYPES[d], peak_size(device, d))] for d in dtypes}
    if device.type == "cpu" and "bfloat16" in dtypes:
        a = torch.randn(512, 512, dtype=torch.bfloat16)
        rate = 2 * 512 ** 3 / min(timed(lambda: a @ a, device) for _ in range(2))
        report.notes.append(f"bfloat16 on this CPU: x @ W (the layout of backward's input gradient) runs at "
                            f"{rate / 1e9:.2f} GFLOP/s (512^3), against x @ W.T in the peak below")
    smol = default_model_dir()
    all_pairs = load_pairs(os.path.join(ROOT, "wordnet", "train"))["wordnet"]
    if recipe:
        run_recipe(device, smol, peaks, report, args.seed, args.repeats or 2)
    with tempfile.TemporaryDirectory(prefix="bireco-benchmark-") as tmp:
        for d in defaults:
            run_defaults(d, args.default_steps, report, tmp)
        for config, d in runs:
            folder = smol if config == "smollm2" else os.path.join(tmp, config)
            if not os.path.isdir(folder):
                llama3_folder(folder, smol, args.seed)
            w = workload(device, config, DTYPES[d])
            w.update({k: v for k, v in (("batch", args.batch_size), ("texts", args.texts),
                                        ("encode_batch", args.encode_batch_size), ("repeats", args.repeats),
                                        ("max_length", args.max_length)) if v is not None})
            w.update(doc_tokens=args.doc_tokens, grad_ckpt=args.grad_ckpt, sum_only=args.sum_only)
            run(config, DTYPES[d], device, w, folder, all_pairs, peaks, report, args.seed)
    for d in dtypes:  # measured again at the end; other work on the machine only lowers a rate
        peaks[d].append(matmul_peak(device, DTYPES[d], peak_size(device, d)))
        start, end = (p / 1e9 for p in peaks[d])
        report.notes.append(f"matmul peak {d}: {max(start, end):.1f} GFLOP/s (x @ W.T, {peak_size(device, d)}^3; "
                            f"{start:.1f} at the start of the run, {end:.1f} at the end)")
    report.print({d: max(p) for d, p in peaks.items()})
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
