"""
One prepared check for a machine with a GPU: about 8 minutes on one H200, one table at the end.

  python experiments/gpu_check.py                        # on CUDA
  python experiments/gpu_check.py --device cpu --quick   # the same checks on tiny shapes (a minute)

1. Correctness on the device, on a tiny random model: our logits against transformers' in fp32;
   both stages' losses in bf16 (autocast, as train.py) finite and close to fp32; the cached
   Stage II step's gradients equal to the plain step's.
2. Speed and memory against transformers (experiments/benchmark.py's comparison: Stage I sum and
   interleaved steps, encoding, MFU against a matmul peak measured in the same run) on random
   weights shaped like Llama-3.2-1B (16 layers, hidden 2048, vocabulary 128,256) in bf16, Stage I
   documents of 256+ tokens with activation checkpointing, as the paper trains.
3. The paper's Stage II batch on one device: 1,024 queries with a positive and a hard negative each
   (3,072 texts) at 512 tokens, LoRA r16, through the cached step: whether it fits, its time and
   peak memory.
Targets (performance issue): Stage I >= 1.25x the reference's speed at <= 0.6x its memory, Stage I
MFU >= 40%, encoding MFU >= 50%. Needs torch, transformers, safetensors, tokenizers and numpy
(experiments/tiny.py builds the tiny model), no mteb, no gguf and no network: the tokenizer is
trained on the bundled WordNet text.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchmark  # noqa: E402  (experiments/benchmark.py: the reference and the measuring helpers)
import torch  # noqa: E402
from tiny import make_tiny_checkpoint  # noqa: E402

import bireco  # noqa: E402
import hardware  # noqa: E402
import train  # noqa: E402
from data import Pair, TextFormat, load_pairs  # noqa: E402
from model import ModelConfig, load_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--device", default="cuda")
parser.add_argument("--quick", action="store_true", help="tiny shapes everywhere: to try the script on a CPU")


def correctness(device, dtype, folder, report):
    """Section 1 on the tiny random checkpoint in `folder`; the bf16 rows only where bf16 is fast."""
    import transformers

    add = lambda *a, **k: report.add("tiny", "float32", *a, **k)
    ours = load_model(folder, device=device).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").to(device).eval()
    ids = torch.randint(3, ours.config.vocab_size, (3, 17), device=device)
    with torch.no_grad():
        diff = (ours.lm_head(ours(ids)) - hf(ids).logits).abs().max().item()
    add("logits vs transformers, fp32 (max abs diff)", f"{diff:.2e}", target="< 1e-4", ok=diff < 1e-4)

    tok, eos_ids = load_tokenizer(folder)
    fmt = TextFormat(tok, eos_ids)
    pairs = load_pairs(os.path.join(ROOT, "wordnet", "train"))["wordnet"][:8]
    for name, loss in (("Stage I EBD2Q", lambda m: bireco.stage1_loss(m, fmt, pairs, "d2q")[0]),
                       ("Stage II InfoNCE", lambda m: bireco.contrastive_loss(*(
                           bireco.embed_texts(m, fmt, items) for items in (
                               [(p.instruction, p.query) for p in pairs], [(None, p.positive) for p in pairs])))[0])):
        if dtype != torch.bfloat16:
            add(f"{name} loss, bf16 autocast vs fp32", "skipped: no bf16 matmul units")
            continue
        with torch.no_grad():
            fp32 = loss(ours).item()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf16 = loss(ours).item()
        rel = abs(bf16 - fp32) / abs(fp32)
        add(f"{name} loss, bf16 autocast vs fp32", f"{bf16:.4f}", f"{fp32:.4f}", f"{rel:.1%}",
            "finite, within 5%", bf16 == bf16 and rel < 0.05)

    grads = []
    train.add_lora(ours, rank=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        for k, p in ours.named_parameters():
            if k.endswith("lora_B"):
                p.normal_(0, 0.05)
    ours.train()
    batch = [Pair(p.query, p.positive, p.negative, p.instruction) for p in pairs[:4]]
    for chunk in (10 ** 6, 100):  # one plain pass; several passes of the cached step
        bireco.contrastive_step(ours, fmt, batch, chunk)
        grads.append({k: p.grad.clone() for k, p in ours.named_parameters() if p.grad is not None})
        ours.zero_grad(set_to_none=True)
    worst = max(((grads[0][k] - grads[1][k]).abs().max() / grads[0][k].abs().max()).item() for k in grads[0])
    add("cached step vs plain step, fp32 (max rel grad diff)", f"{worst:.2e}", target="< 1e-4", ok=worst < 1e-4)


def llama1b_folder(out, tokenizer_folder, quick, seed=0):
    """Random weights shaped like Llama-3.2-1B (tiny when quick), the tiny checkpoint's tokenizer:
    the ids it produces are below 400, but the output layer's cost depends on V alone."""
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if quick else dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                                   max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                                   eos_token_id=2, **shape))
    benchmark.random_checkpoint(out, cfg, seed)
    for name in ("tokenizer.json", "generation_config.json"):
        with open(os.path.join(tokenizer_folder, name)) as src, open(os.path.join(out, name), "w") as dst:
            dst.write(src.read())
    return out


def paper_stage2(device, dtype, folder, report, quick):
    """Section 3: the cached step on 1,024 queries x 3 texts x 512 tokens, LoRA r16, autocast to dtype."""
    queries, length = (8, 64) if quick else (1024, 512)
    model = load_model(folder, device=device)
    train.add_lora(model, rank=16, alpha=32.0, dropout=0.05)
    model.gradient_checkpointing = True
    model.train()
    tok, eos_ids = load_tokenizer(folder)
    fmt = TextFormat(tok, eos_ids, length)
    words = " ".join(p.positive for p in load_pairs(os.path.join(ROOT, "wordnet", "train"))["wordnet"][:4000]).split()
    text = lambda i: " ".join(words[(i * 997) % 20000:(i * 997) % 20000 + 2 * length])  # cut to `length` tokens
    batch = [Pair(text(3 * i), text(3 * i + 1), text(3 * i + 2), "Retrieve the passage") for i in range(queries)]
    chunk = 8 * length if quick else 64 * length  # padded tokens a pass
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    add = lambda *a, **k: report.add("llama1b" if not quick else "tiny-1b", str(dtype).removeprefix("torch."), *a, **k)
    try:
        step = lambda: bireco.contrastive_step(model, fmt, batch, chunk, 0.02, ctx)
        mem = benchmark.peak_memory(step, device)
        model.zero_grad(set_to_none=True)
        seconds = benchmark.timed(step, device)
    except torch.OutOfMemoryError as e:
        add(f"Stage II cached step, {queries} queries x 3 x {length} tokens", "out of memory", target="fits",
            ok=False)
        report.notes.append(f"Stage II at scale: {str(e).splitlines()[0]}")
        return
    n_texts = 3 * queries
    add(f"Stage II cached step, {queries} queries x 3 x {length} tokens (s)", f"{seconds:.2f}", target="fits", ok=True)
    add("Stage II cached step peak memory (MB)", f"{mem / 2**20:.0f}")
    flops = 3 * benchmark.model_flops(model, [length] * n_texts, training=False)  # pass 1, pass 2 forward + backward
    add("Stage II cached step model TFLOP/s", f"{flops / seconds / 1e12:.1f}")


def main():
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = hardware.auto_dtype(device)  # bf16 on CUDA; on a CPU, only where it has bf16 matmul units
    t0 = time.time()
    report = benchmark.Report()
    print(f"device {device} | torch {torch.__version__} | {dtype}", flush=True)
    n = 1024 if args.quick else 8192
    peaks = {str(d).removeprefix("torch."): [benchmark.matmul_peak(device, d, n)] for d in {dtype, torch.float32}}
    all_pairs = load_pairs(os.path.join(ROOT, "wordnet", "train"))["wordnet"]
    with tempfile.TemporaryDirectory(prefix="bireco-gpu-check-") as tmp:
        tiny = make_tiny_checkpoint(os.path.join(tmp, "tiny"))
        correctness(device, dtype, tiny, report)
        print(f"correctness done ({time.time() - t0:.0f} s)", flush=True)
        big = llama1b_folder(os.path.join(tmp, "llama1b"), tiny, args.quick)
        w = dict(batch=2, texts=16, encode_batch=4, repeats=1, max_length=64, doc_tokens=32) if args.quick else \
            dict(batch=32, texts=2048, encode_batch=64, repeats=3, max_length=512, doc_tokens=256)
        benchmark.run("tiny-1b" if args.quick else "llama1b", dtype, device,
                      dict(w, grad_ckpt=True, sum_only=False), big, all_pairs, peaks, report, seed=0)
        print(f"speed and memory done ({time.time() - t0:.0f} s)", flush=True)
        paper_stage2(device, dtype, big, report, args.quick)
    for d, p in peaks.items():
        p.append(benchmark.matmul_peak(device, benchmark.DTYPES[d], n))
        report.notes.append(f"matmul peak {d}: {max(p) / 1e12:.2f} TFLOP/s (x @ W.T)")
    report.notes.append("targets not in the table: Stage I MFU >= 40%, encoding MFU >= 50% (bf16 rows)")
    report.print({d: max(p) for d, p in peaks.items()})
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
