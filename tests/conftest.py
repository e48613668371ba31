"""Shared fixtures. Tokenizers are built locally (no Hub access in tests); helpers live in helpers.py."""

import pytest
from helpers import CHAT_TEMPLATE, WORDS, make_tokenizer  # noqa: F401 - `from conftest import make_tokenizer` still works


@pytest.fixture
def tiny_tokenizer():
    """Factory: tiny_tokenizer(bos=False, pad=True, chat_template=CHAT_TEMPLATE)."""
    return make_tokenizer
