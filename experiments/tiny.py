"""
The tiny model the tests and the GPU check build: a random Llama-shaped checkpoint with a real
(tiny) byte-level BPE tokenizer in ChatML format, trained on the bundled WordNet pairs; and
left padding, the mirror image of data.pad, for the parity checks against transformers.
"""

import gzip
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDNET_TRAIN = os.path.join(ROOT, "wordnet", "train", "wordnet.jsonl.gz")


def wordnet_rows(n):
    with gzip.open(WORDNET_TRAIN, "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def left_pad(seqs, pad_id):
    """Left-pads to the longest sequence (the mirror image of data.pad): ids (B, T), mask (B, T) bool."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = True
    return ids, mask


def make_tiny_checkpoint(path, model_type="llama", layers=2, seed=0, **extra):
    """Writes config.json, model.safetensors, tokenizer.json, generation_config.json to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from model import ModelConfig, Transformer, save_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [r[k] for r in wordnet_rows(400) for k in ("query", "positive", "negative")]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    cfg = ModelConfig.from_hf(dict(dict(
        model_type=model_type, vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=eos), **extra))
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    save_model(model, str(path))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": eos}, f)
    return str(path)
