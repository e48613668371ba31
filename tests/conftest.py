"""Shared fixtures. Tokenizers are built locally (no Hub access in tests); helpers live in helpers.py."""

import pytest
from helpers import make_tokenizer


@pytest.fixture
def tiny_tokenizer():
    """Factory: tiny_tokenizer(bos=False, pad=True, chat_template=CHAT_TEMPLATE)."""
    return make_tokenizer
