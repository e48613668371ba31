"""Tiny random decoder models written as F32 GGUF files, so llama.cpp and transformers run the same weights.

    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")     # also "qwen2", "qwen3"

The file carries a byte-level BPE vocabulary ("gpt2" in GGUF terms) trained here on a few words, so both
llama.cpp's tokenizer and the one transformers builds from the file (`loading.load_model(path)`) work.
Tensor names and the Q/K row permutation follow llama.cpp's convert_hf_to_gguf.py: Llama GGUFs store q/k
with each head's rotary halves interleaved (llama.cpp's RoPE pairs neighbours, transformers' pairs halves);
Qwen2/Qwen3 files are stored unpermuted (llama.cpp runs them with NEOX-style RoPE).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Specials first: pad 0, eos 1, bos 2.
SPECIALS = ["<pad>", "<eos>", "<bos>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CORPUS = (
    "the a movie film was is great good bad awful fine i it this that loved hated plot acting positive negative "
    "neutral label text human assistant user system hello hi how are you what say add two and one three four five "
    "sum of numbers answer translate to french bonjour , . ! ? : tweet sentiment review"
)
VOCAB_SIZE = 384


def byte_bpe(vocab_size: int = VOCAB_SIZE):
    """-> (tokens in byte-level spelling, merges "a b", token types): a GPT-2 style vocabulary with all 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer)
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [tokens.index(s) for s in SPECIALS] == [0, 1, 2]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]  # 3 = CONTROL, 1 = NORMAL
    return tokens, merges, types


def make_model(arch: str = "llama", seed: int = 0, layers: int = 2, vocab_size: int = VOCAB_SIZE):
    """A random HF model of `arch` with GQA (4 query heads, 2 kv heads), untied output head."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":  # head_dim (24) != hidden / heads (16): exercises key_length/value_length
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=24, **common))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: randomise them so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.mul_(5.0)  # HF's std 0.02 makes logits nearly flat; bigger weights give decisive argmaxes
    return model.eval()


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.LlamaModel.permute: per head, interleave the two rotary halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch: str, name: str = "tiny") -> Path:
    """Write `model` (from make_model) with its config and a byte-BPE vocabulary as an F32 GGUF file."""
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, merges, types = byte_bpe(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    rename = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    tensors = {"token_embd.weight": sd.pop("model.embed_tokens.weight"), "output_norm.weight": sd.pop("model.norm.weight"),
               "output.weight": sd.pop("lm_head.weight")}
    for key, t in sd.items():
        _, _, i, rest = key.split(".", 3)  # model.layers.{i}.{module}.{weight|bias}
        module, leaf = rest.rsplit(".", 1)
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            t = _permute(t, cfg.num_attention_heads if module == "self_attn.q_proj" else cfg.num_key_value_heads)
        tensors[f"blk.{i}.{rename[module]}.{leaf}"] = t
    for tname, t in tensors.items():
        w.add_tensor(tname, np.ascontiguousarray(t.numpy().astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_gguf(path, arch: str = "llama", seed: int = 0, layers: int = 2):
    """-> (path, the HF model it holds)."""
    model = make_model(arch, seed=seed, layers=layers)
    return write_gguf(path, model, arch), model
