"""Shared fixtures. Tokenizers are built locally (no Hub access in tests)."""

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
WORDS = (
    "the a movie film was is great good bad awful fine i it this that loved hated plot acting "
    "positive negative neutral label text human assistant user system hello hi how are you "
    "what say add two and one three four five sum of numbers answer translate to french "
    "bonjour , . ! ? : < > ="
)


def make_tokenizer(bos: bool = False, pad: bool = True, chat_template: str | None = CHAT_TEMPLATE):
    """Word-level tokenizer: one id per word, so tests can count tokens by eye.

    Specials: <pad>=0, <unk>=1, <eos>=2, <bos>=3 (only added to inputs when bos=True).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>", "<bos>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS.split())))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "<user>" -> "<", "user", ">"
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    kw = dict(unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")
    if pad:
        kw["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.chat_template = chat_template
    return fast


@pytest.fixture
def tiny_tokenizer():
    """Factory: tiny_tokenizer(bos=False, pad=True, chat_template=CHAT_TEMPLATE)."""
    return make_tokenizer
