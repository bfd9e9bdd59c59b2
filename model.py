"""
The decoder-only transformer, loaded straight from Hugging Face safetensors checkpoints.

Llama (2/3.x, SmolLM2), Mistral (no sliding window), Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k RMSNorm)
share one definition: token embeddings, pre-norm blocks of grouped-query attention and a SwiGLU MLP,
a final RMSNorm and an output projection `lm_head`. Module names equal the checkpoint keys, so
loading is a strict one-to-one copy.

For the paper (arXiv 2509.03020) the model must do three things a chat model normally does not:
- return the final-norm hidden states, not logits (the text embedding is one of them, and the
  Stage I losses apply `lm_head` only at target positions);
- take `inputs_embeds` (Stage I feeds an embedding back in as an input position);
- run causal or bidirectional attention with padding on either side (one boolean).

Left out on purpose: KV cache and generation, sliding-window attention, tensor parallelism.
Shapes: B batch, T sequence, H heads, K key/value heads, D hidden size, d head size, V vocabulary.
"""

import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Config, read from the checkpoint's own config.json


@dataclass
class ModelConfig:
    """The shape and the variant of the architecture: what the four families differ in is a
    handful of flags (biases, q/k norms, RoPE scaling), everything else is shared."""
    model_type: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # K < H: grouped-query attention (SmolLM2: 9 query heads, 3 K/V)
    head_dim: int  # d, D / H unless config.json says otherwise (Qwen3 sets it)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None  # only Llama-3.1's "llama3" frequency scaling is supported
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q, k and v projections have a bias
    o_bias: bool = False  # Llama's attention_bias also puts one on o_proj
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        """The fields of a HF config.json. A setting this file does not implement is refused by
        name, never ignored: a model that loads computes what the checkpoint's authors trained."""
        def fail(key, value, accepted):
            raise ValueError(f"{where}: unsupported {key}={value!r} (accepted: {accepted})")

        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        # what the four families share is implemented; each way of differing is a flag below
        mt = hf.get("model_type")
        if mt not in ("llama", "mistral", "qwen2", "qwen3"):
            fail("model_type", mt, "llama, mistral, qwen2, qwen3")
        if hf.get("hidden_act", "silu") != "silu":
            fail("hidden_act", hf["hidden_act"], "silu")
        if hf.get("mlp_bias", False):
            fail("mlp_bias", True, "false")
        # sliding-window attention is only refused where it actually changes the result
        if hf.get("use_sliding_window", mt == "mistral") and hf.get("sliding_window") is not None:
            if mt != "mistral" or hf["sliding_window"] < hf.get("max_position_embeddings", 0):
                fail("sliding_window", hf["sliding_window"], "null or use_sliding_window=false")
        # newer configs list each layer's attention kind; only full attention is implemented
        if any(t != "full_attention" for t in hf.get("layer_types") or []):
            fail("layer_types", sorted(set(hf["layer_types"])), "full_attention only")
        # RoPE: classic top-level keys (hub checkpoints) or the newer rope_parameters dict
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = rope if rope else hf.get("rope_scaling")
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in ("default", "llama3"):
            fail("rope_scaling.rope_type", rope_type, "default, llama3")
        heads = hf["num_attention_heads"]
        # Qwen2 always has q/k/v biases and no o bias; Llama's attention_bias puts one on all four
        bias = hf.get("attention_bias", False)
        return cls(
            model_type=mt,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if rope_type == "llama3" else None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=(mt == "qwen2") or bias,
            o_bias=(mt != "qwen2") and bias,
            qk_norm=(mt == "qwen3"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf(self) -> dict:
        """The config.json that both this loader and `transformers` read back: the flags folded
        back into the HF keys (attention_bias, architectures)."""
        arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
        hf = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("qkv_bias", "o_bias", "qk_norm"):
            del hf[k]
        hf["attention_bias"] = self.o_bias or (self.qkv_bias and self.model_type != "qwen2")
        hf.update(architectures=[arch[self.model_type] + "ForCausalLM"], hidden_act="silu")
        return hf


# -----------------------------------------------------------------------------
# Rotary position embeddings (rotate-half layout, as in the HF checkpoints), always in fp32


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(d/2,) rotation speeds: dimension pair i of every head turns by position * theta^(-2i/d)
    radians, fast for the first pairs, slow for the last (long-range) ones."""
    d = cfg.head_dim
    dims = torch.arange(0, d, 2, dtype=torch.float32, device="cpu")
    inv_freq = 1.0 / cfg.rope_theta ** (dims / d)
    if cfg.rope_scaling is None:
        return inv_freq
    # Llama-3.1 "llama3" scaling, to read 128K tokens with a model pre-trained on 8K: the pairs
    # whose wavelength exceeds the original context / low_freq_factor turn `factor` times slower
    # (so far positions look like the near ones it was trained on), those shorter than
    # context / high_freq_factor keep their speed (local order stays sharp), and the pairs in
    # between interpolate linearly in 1 / wavelength
    s = cfg.rope_scaling
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    return torch.where(medium, blended, out)


def apply_rope(x, cos, sin):
    """Rotates each pair of dimensions (i, i + d/2) of every head by its position's angle:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). The pairs are the two halves ("rotate half"),
    not neighbours (2i, 2i + 1) as the RoPE paper writes it: the layout HF checkpoints use.
    q . k then depends on the two positions only through their difference."""
    # x (B, H, T, d); cos, sin (B, 1, T, d) in fp32; the rotation in fp32 or wider (fp64 in tests)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)  # (B, H, T, d/2) each
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# -----------------------------------------------------------------------------
# The blocks


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) over the last dimension: LayerNorm without the mean
    subtraction and the bias. Computed in fp32 (or wider), whatever the input's dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 or wider
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


CPU_FP32_ATTENTION_UP_TO = 256  # keys; see attention()


def attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v through torch's fused kernel (SDPA): q (B, H, Tq, d),
    k and v (B, H, T, d). mask None = plain causal. On a CPU, bf16 attention over at most 256
    keys runs in fp32 (autocast off, the result cast back): torch's bf16 CPU kernels are slower
    than its fp32 ones there (forward + backward, 2.5x at 64 tokens, even at 256; faster beyond)."""
    short = k.shape[-2] <= CPU_FP32_ATTENTION_UP_TO
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and short:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               is_causal=mask is None)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, K, d
        self.q_proj = nn.Linear(D, H * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, K * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, K * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * d, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, at=None):
        """x (B, T, D) -> (B, T, D), or (B, 1, D) with `at`. Causal self-attention: each position
        mixes the values of the positions `mask` allows, weighted by softmax(q . k / sqrt(d))."""
        B, T, _ = x.shape
        xq, qcos, qsin = x, cos, sin
        if at is not None:  # queries at one position per row, at[b]; keys and values everywhere
            rows = torch.arange(B, device=x.device)
            xq = x[rows, at][:, None]  # (B, 1, D)
            qcos, qsin = cos[rows, :, at][:, :, None], sin[rows, :, at][:, :, None]
            if mask is None:  # plain causal: the keys up to at[b]
                keys = torch.arange(T, device=x.device)[None, None, None, :]
                mask = keys <= at[:, None, None, None]
            else:
                mask = mask[rows, :, at][:, :, None]  # (B, 1, 1, T)
        # the projections split into heads: q (B, Tq, H, d), k and v (B, T, K, d); Tq = T, or 1
        q = self.q_proj(xq).view(B, xq.shape[1], self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3: each head's q and k normalised before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, d)
        q, k = apply_rope(q, qcos, qsin), apply_rope(k, cos, sin)
        # grouped-query attention: each key/value head serves H/K query heads
        # (query head h reads key/value head h // (H/K)): (B, K, T, d) -> (B, H, T, d)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = attention(q, k, v, mask)  # (B, H, Tq, d)
        # the heads side by side again, (B, Tq, H * d), and mixed by one projection to (B, Tq, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, xq.shape[1], -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), D -> I -> D with I the intermediate size (1,536 in
    SmolLM2-135M): the gate's SiLU decides, element by element, how much of `up` passes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # (B, T, D) -> (B, T, I) -> (B, T, D)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm layer: x + attention(norm(x)), then x + MLP(norm(x)). The residual stream x
    itself is never normalised; each sublayer reads a normalised copy and adds its output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, at=None):
        # with `at`, keys and values still come from every position of h, the query from one
        h = self.input_layernorm(x)
        if at is not None:  # only position at[b] of each row goes on: (B, 1, D)
            x = x[torch.arange(x.shape[0], device=x.device), at][:, None]
        x = x + self.self_attn(h, cos, sin, mask, at)  # (B, T, D) or (B, 1, D)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(padding_mask, causal: bool):
    """The one place attention is masked. padding_mask (B, T), True at real tokens.
    Returns a boolean (B, 1, T, T) mask, True where query t may attend to key s; or None where
    plain causal attention is already exact: causal, with every row's padding after its real
    tokens (data.pad), so no real query reaches a pad key. SDPA then runs with is_causal, which
    needs no mask in memory and allows its fastest kernels."""
    # a pad followed by a real token anywhere = left padding (or holes): the mask must be explicit
    if causal and not (padding_mask[:, 1:] & ~padding_mask[:, :-1]).any():
        return None
    B, T = padding_mask.shape
    allowed = padding_mask[:, None, None, :].expand(B, 1, T, T)  # every query, the real keys
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=padding_mask.device).tril()
    # a padding query sees no real key; letting every query see itself keeps its softmax finite
    return allowed | torch.eye(T, dtype=torch.bool, device=padding_mask.device)


class Transformer(nn.Module):
    """Token embeddings, L blocks, a final RMSNorm; lm_head (D -> V) is kept for the callers that
    need logits (Stage I's losses, greedy reconstruction). With tied embeddings (SmolLM2, the small
    Llama-3.2 and Qwen models) lm_head and embed_tokens are one matrix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(cfg)  # plain fp32 tensor, not a buffer: .to() leaves it alone
        self.gradient_checkpointing = False  # train.py --grad-ckpt: layers rerun in backward

    def forward(self, input_ids=None, inputs_embeds=None, padding_mask=None, position_ids=None,
                causal: bool = True, last=None):
        """Returns the final-norm hidden states (B, T, D); `lm_head` is applied by the caller.
        padding_mask (B, T): True/1 at real tokens, pads on either side. position_ids (B, T):
        default counts real tokens only (0 at each row's first real token).
        last (B,): when only the state at position last[b] of each row is wanted (an embedding),
        the final layer computes its queries, attention output and MLP there alone (1/L of the
        work saved) and the result is (B, 1, D)."""
        # Stage I passes inputs_embeds: an [EOS] embedding followed by the target tokens' embeddings
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape  # x (B, T, D)
        if padding_mask is None:
            padding_mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        padding_mask = padding_mask.bool()
        if position_ids is None:  # 0, 1, 2, ... over each row's real tokens; pads repeat a position
            position_ids = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        freqs = position_ids[:, None, :, None].float() * self.inv_freq  # (B, 1, T, d/2)
        # both halves of a head share a pair's angle (apply_rope's layout): (B, 1, T, d) each
        cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
        mask = attention_mask(padding_mask, causal)  # None (plain causal) or (B, 1, T, T)
        for i, layer in enumerate(self.model.layers):
            at = last if i == len(self.model.layers) - 1 else None
            if self.gradient_checkpointing and self.training:  # keep x only; rerun in backward
                x = checkpoint(layer, x, cos, sin, mask, at, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, at)
        return self.model.norm(x)


# -----------------------------------------------------------------------------
# Loading and saving Hugging Face checkpoints


def read_json(path: str):
    """A config file's JSON; a broken one raises ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_model(path: str, device="cpu", dtype=torch.float32) -> Transformer:
    """Strict load of a HF checkpoint folder: config.json + model.safetensors (or shards listed
    in model.safetensors.index.json). Tensors go straight from the file to `device` and `dtype`,
    so the weights are never held twice."""
    from safetensors import SafetensorError, safe_open

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: not a model checkpoint folder")
    cfg = ModelConfig.from_hf(read_json(config_path), where=config_path)
    # a large checkpoint comes in shards, and its index maps each tensor name to its shard's file
    index, weight_map = os.path.join(path, "model.safetensors.index.json"), {}
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no \"weight_map\" of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
    else:
        shards = ["model.safetensors"]
    for s in shards:
        if not os.path.isfile(os.path.join(path, s)):
            raise FileNotFoundError(f"{os.path.join(path, s)} not found (weights missing or "
                                    "partial)")

    # the modules are built on the meta device (shapes, no memory); each parameter is then replaced
    # by the file's tensor, so the weights exist once, already in `dtype` on `device`
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v for k, v in model.state_dict().items()}  # key -> meta tensor of its shape
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    params = dict(model.named_parameters())
    seen = set()
    for s in shards:
        try:
            f = safe_open(os.path.join(path, s), framework="pt", device=str(device))
        except SafetensorError as e:
            raise ValueError(f"{os.path.join(path, s)}: not a readable safetensors file, partly "
                             f"written or corrupt ({e})") from None
        with f:
            for key in f.keys():
                tied = cfg.tie_word_embeddings and key == "lm_head.weight"
                if key.endswith("rotary_emb.inv_freq") or tied:
                    continue  # recomputed / tied: the two explicit exceptions
                if key not in expected:
                    raise ValueError(f"{os.path.join(path, s)}: unexpected tensor {key!r}")
                t = f.get_tensor(key)
                if t.shape != expected[key].shape:
                    raise ValueError(f"{os.path.join(path, s)}: {key} has shape {tuple(t.shape)}, "
                                     f"config.json implies {tuple(expected[key].shape)}")
                # "model.layers.3.mlp.up_proj.weight": module model.layers.3.mlp.up_proj, "weight"
                module_name, _, attr = key.rpartition(".")
                module = model.get_submodule(module_name)
                trainable = params[key].requires_grad
                setattr(module, attr, nn.Parameter(t.to(dtype), requires_grad=trainable))
                seen.add(key)
    missing = sorted(set(expected) - seen)  # strict both ways: none unexpected, none missing
    if missing:
        listed_in = sorted({weight_map[k] for k in missing if k in weight_map})
        hint = f" (the index puts them in {', '.join(listed_in)})" if listed_in else ""
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, first "
                         f"{missing[:3]}{hint}")
    if cfg.tie_word_embeddings:  # the file holds the matrix once; both modules read it
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def save_model(model: Transformer, path: str, state_dict: dict | None = None):
    """Writes model.safetensors (HF key names) and config.json into `path`. `state_dict` replaces
    the model's own (e.g. LoRA adapters merged into the weights)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    sd = dict(model.state_dict() if state_dict is None else state_dict)
    if model.config.tie_word_embeddings:
        del sd["lm_head.weight"]
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}  # safetensors: dense, on CPU
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def load_tokenizer(path: str):
    """Returns (tokenizers.Tokenizer, eos_ids): every end-of-sequence / end-of-turn token id the
    checkpoint's config files declare, in the order generation_config, config, tokenizer_config."""
    from tokenizers import Tokenizer

    # tokenizer.json is the Rust tokenizers library's own format (vocabulary, merges, pre- and
    # post-processing): every Llama-3.x, Qwen and SmolLM2 checkpoint ships one
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{tok_path} not found (a tokenizers-format tokenizer is required)")
    try:
        tok = Tokenizer.from_file(tok_path)
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{tok_path}: not a readable tokenizers file ({e})") from None
    eos_ids = []
    for name in ("generation_config.json", "config.json", "tokenizer_config.json"):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            continue
        value = read_json(p).get("eos_token" if name == "tokenizer_config.json" else "eos_token_id")
        if isinstance(value, dict):  # {"content": "</s>", ...} in older tokenizer configs
            value = value.get("content")
        if isinstance(value, str):
            value = tok.token_to_id(value)
        # Llama-3's chat checkpoints list several (<|eot_id|>, <|end_of_text|>, ...): keep them all
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and 0 <= i < tok.get_vocab_size() and i not in eos_ids:
                eos_ids.append(i)
    if not eos_ids:
        raise ValueError(f"{path}: no usable eos_token_id in generation_config.json, config.json "
                         "or eos_token in tokenizer_config.json (an embedder pools at the EOS "
                         "token)")
    return tok, eos_ids
