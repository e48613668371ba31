"""Tiny random models built from configs (no Hub), one per supported family. Import from tests."""

from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 128
SPECIAL = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)


def make(kind: str, seed: int = 0, vocab: int = VOCAB, layers: int = 2):
    torch.manual_seed(seed)
    if kind == "llama":  # grouped-query attention: 4 query heads, 2 kv heads
        m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **SPECIAL))
    elif kind == "qwen3":  # head_dim (24) != hidden / heads (16)
        m = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512, **SPECIAL))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **SPECIAL))
    elif kind == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=512, **SPECIAL))
    elif kind == "bloom":
        m = BloomForCausalLM(BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=layers, n_head=4, **SPECIAL))
    elif kind == "t5":
        m = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=layers, num_heads=4,
                                                decoder_start_token_id=0, **SPECIAL))
    elif kind == "bart":
        m = BartForConditionalGeneration(BartConfig(vocab_size=vocab, d_model=64, encoder_layers=layers, decoder_layers=layers,
                                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                                    decoder_ffn_dim=128, max_position_embeddings=512, decoder_start_token_id=2, **SPECIAL))
    elif kind == "bert":
        m = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                                     intermediate_size=128, num_labels=3, max_position_embeddings=512, pad_token_id=0))
    else:
        raise ValueError(kind)
    return m.eval()


CAUSAL = ["gpt2", "llama", "qwen3", "mistral", "bloom"]
SEQ2SEQ = ["t5", "bart"]
ALL = CAUSAL + SEQ2SEQ + ["bert"]


def batch(kind: str, b: int = 3, t: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if kind in SEQ2SEQ:
        kw["labels"] = torch.randint(3, VOCAB, (b, 5), generator=g)
    elif kind == "bert":
        kw["labels"] = torch.randint(0, 3, (b,), generator=g)
    else:
        kw["labels"] = ids.clone()
    return kw
