"""Old name of the tiny-model helpers: everything lives in helpers.py."""

from helpers import ALL, BOS, CAUSAL, EOS, PAD, SEQ2SEQ, SPECIAL, UNK, VOCAB, batch, greedy_by_forward, make, peft_logits  # noqa: F401
