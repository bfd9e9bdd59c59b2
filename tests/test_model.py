"""model.py against transformers (the independent reference) on tiny random fp32 models, and its
own identities (attention by hand, checkpointing, the last-position pass) in fp64."""

import json
import os

import pytest
import torch
import transformers

import model
from model import ModelConfig, Transformer, attention_mask, load_model, save_model

torch.manual_seed(0)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

CASES = {
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-untied-llama3-rope": (transformers.LlamaConfig, dict(
        tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=32))),
    "qwen2-bias": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen3-qknorm": (transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None)),
}


def hf_reference(name, tmp_path):
    cls, extra = CASES[name]
    hf = transformers.AutoModelForCausalLM.from_config(cls(**TINY, **extra), attn_implementation="eager")
    with torch.no_grad():  # random biases so that a missing bias would show
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.eval().save_pretrained(tmp_path / name)
    return hf, tmp_path / name


def batches():
    """Three rows of lengths 7, 4, 1: left-padded, right-padded, with positions 0..n-1."""
    lengths = [7, 4, 1]
    ids = torch.randint(3, 97, (3, 7))
    right = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    left = right.flip(1)
    return ids, lengths, left, right


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_parity_with_transformers(name, side, tmp_path):
    hf, path = hf_reference(name, tmp_path)
    ours = load_model(str(path)).eval()
    ids, lengths, left, right = batches()
    mask = left if side == "left" else right
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos, output_hidden_states=True)
        h = ours(ids, padding_mask=mask)
        logits = ours.lm_head(h)
        h_emb = ours(inputs_embeds=ours.model.embed_tokens(ids), padding_mask=mask)
        last = (mask * torch.arange(7)).argmax(1)
        h_last = ours(ids, padding_mask=mask, last=last)  # the final layer at the last tokens only
    # transformers' last hidden state is after the final norm, like ours
    torch.testing.assert_close(h[mask], want.hidden_states[-1][mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[mask], want.logits[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_emb[mask], h[mask], atol=1e-5, rtol=1e-5)
    assert h_last.shape == (3, 1, TINY["hidden_size"])
    torch.testing.assert_close(h_last[:, 0], want.hidden_states[-1][torch.arange(3), last], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama-untied-llama3-rope", "qwen3-qknorm", "qwen2-bias"])
def test_save_then_transformers_loads(name, tmp_path):
    hf, path = hf_reference(name, tmp_path)
    ours = load_model(str(path))
    save_model(ours, str(tmp_path / "ours"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
        # and our own loader reads our files back to the same weights
        again = load_model(str(tmp_path / "ours"))
        torch.testing.assert_close(again.lm_head(again(ids)), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_classic_config_keys(tmp_path):
    """Hub checkpoints write top-level rope_theta / rope_scaling (type llama3); both forms agree."""
    _, path = hf_reference("llama-untied-llama3-rope", tmp_path)
    new = json.loads((path / "config.json").read_text())
    rp = dict(new.pop("rope_parameters"))
    classic = dict(new, rope_theta=rp.pop("rope_theta"), rope_scaling=dict(rp, rope_type="llama3"))
    assert ModelConfig.from_hf(classic) == ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert ModelConfig.from_hf(classic).rope_scaling["factor"] == 8.0


def test_bidirectional_attention_matches_plain_softmax():
    """Bidirectional attention with padding against softmax(QK^T/sqrt(d))V written out by hand."""
    cfg = ModelConfig.from_hf(dict(TINY, model_type="llama", num_hidden_layers=1))
    m = Transformer(cfg).double().eval()  # fp64: the identity holds to rounding on any CPU
    attn = m.model.layers[0].self_attn
    B, T, D, d = 2, 5, cfg.hidden_size, cfg.head_dim
    x = torch.randn(B, T, D, dtype=torch.float64)
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    cos, sin = torch.ones(B, 1, T, d), torch.zeros(B, 1, T, d)  # no rotation: position-free check
    with torch.no_grad():
        got = attn(x, cos, sin, attention_mask(pad, causal=False))
        q = attn.q_proj(x).view(B, T, 4, d).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, 2, d).transpose(1, 2).repeat_interleave(2, 1)
        v = attn.v_proj(x).view(B, T, 2, d).transpose(1, 2).repeat_interleave(2, 1)
        scores = q @ k.transpose(-1, -2) / d ** 0.5
        scores = scores.masked_fill(~pad[:, None, None, :], float("-inf"))
        want = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(got[pad], want[pad], atol=1e-12, rtol=1e-10)
    # and a real token never attends to padding: changing a pad's input leaves real outputs alone
    x2 = x.clone()
    x2[1, 0] += 10
    with torch.no_grad():
        got2 = attn(x2, cos, sin, attention_mask(pad, causal=False))
    torch.testing.assert_close(got2[pad], got[pad])


def test_gradient_checkpointing_same_gradients():
    cfg = ModelConfig.from_hf(dict(TINY, model_type="qwen3"))
    m = Transformer(cfg).double()
    ids = torch.randint(0, 97, (2, 6))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m.lm_head(m(ids)).logsumexp(-1).sum().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)


def test_mask_only_where_causal_attention_needs_one():
    """Right padding under causal attention needs no mask (is_causal is exact at real tokens, as
    the parity test's right-padded rows show); left padding and bidirectional attention do."""
    ids, lengths, left, right = batches()
    assert attention_mask(right, causal=True) is None
    assert attention_mask(torch.ones_like(right), causal=True) is None
    assert attention_mask(left, causal=True).shape == (3, 1, 7, 7)
    assert attention_mask(right, causal=False).shape == (3, 1, 7, 7)


@pytest.mark.parametrize("keys", [40, model.CPU_FP32_ATTENTION_UP_TO + 1])
@pytest.mark.parametrize("autocast", [False, True])
def test_cpu_bf16_attention_runs_in_fp32_where_faster(keys, autocast):
    """bf16 attention on a CPU over at most CPU_FP32_ATTENTION_UP_TO keys equals fp32 SDPA of the
    same bf16 values (then rounded to bf16), with autocast on or off; over more keys, bf16 SDPA's."""
    if keys > model.CPU_FP32_ATTENTION_UP_TO and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("bf16 SDPA itself: torch's AMX kernels fail without its AVX-512 ones (ATEN_CPU_CAPABILITY)")
    q, k, v = (torch.randn(2, 4, keys, 16).bfloat16() for _ in range(3))
    left_padded = torch.ones(2, keys, dtype=torch.bool)
    left_padded[0, :3] = False
    mask = attention_mask(left_padded, causal=True)
    assert mask is not None
    for m in (None, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = model.attention(q, k, v, m)
        if keys <= model.CPU_FP32_ATTENTION_UP_TO:
            want = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=m, is_causal=m is None).bfloat16()
        else:
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_last_position_only_equals_full_pass(causal):
    """forward(last=i) is the full pass read at position i of each row, in value and in every
    parameter's gradient, also under activation checkpointing; any position, not only the last."""
    cfg = ModelConfig.from_hf(dict(TINY, model_type="qwen3"))
    m = Transformer(cfg).double()  # fp64: the identity holds to rounding on any CPU
    ids, lengths, left, right = batches()
    rows = torch.arange(3)
    cases = (left, [6, 6, 6]), (right, [6, 3, 0]), (right, [2, 1, 0])  # last real tokens, then others
    for mask, at in ((m, torch.tensor(i)) for m, i in cases):
        results = []
        for last in (None, at):
            m.zero_grad(set_to_none=True)
            m.gradient_checkpointing = last is not None
            h = m(ids, padding_mask=mask, causal=causal, last=last)
            e = h[rows, at] if last is None else h[:, 0]
            e.pow(2).sum().backward()
            results.append([e.detach()] + [p.grad for p in m.parameters()])
        assert results[0][1].abs().sum() > 0
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(rope_scaling=dict(type="yarn", factor=4.0)), "rope_type='yarn'"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64), "sliding_window=64"),
])
def test_unsupported_config_is_named(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig.from_hf({**TINY, "model_type": "llama", **change})


def test_strict_loading_names_the_fault(tmp_path):
    _, path = hf_reference("llama-tied", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=80)))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), config.json implies"):
        load_model(str(path))
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(str(path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
