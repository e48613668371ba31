"""Incremental detokenisation: the text of a growing list of token ids, for a constant cost per token."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decode() shows for bytes that do not (yet) form a whole character


class IncrementalText:
    """One request's output text, decoded a few tokens at a time (vLLM's `detokenize_incrementally`).

    Each new token decodes the window of ids since the last settled text twice, without and with the new id:
    the difference is the new text. The window's first ids give byte-level BPE merges and sentencepiece's leading
    spaces their context, so `text + pending` equals `decode(all ids)`. A window whose text ends in U+FFFD (half a
    multi-byte character) stays `pending` until the character is whole. Ids that decode() skips (special tokens,
    ids past the tokenizer's vocabulary, as a padded embedding can sample) stay out of the window, as in vLLM, so a
    long run of them (EOS with ignore_eos) does not widen it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # the ids that make text (what decode() does not skip)
        self.prefix_offset = self.read_offset = 0  # the window is ids[prefix_offset:]; read_offset: settled up to
        self.text = ""  # settled: never changes once here
        self.pending = ""  # decoded from ids past read_offset, not settled (ends in U+FFFD); "" when none
        if tokenizer is not None:
            self._skipped, self._vocab = set(tokenizer.all_special_ids), len(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, tok: int) -> None:
        if self.tokenizer is None or tok in self._skipped or not 0 <= tok < self._vocab:
            return
        self.ids.append(tok)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        new = after[len(before):] if len(after) > len(before) else ""
        if new and not new.endswith(REPLACEMENT):
            self.text += new
            self.prefix_offset, self.read_offset, self.pending = self.read_offset, len(self.ids), ""
        else:
            self.pending = new  # a special token (no text yet) or an incomplete character
