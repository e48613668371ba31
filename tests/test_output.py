"""The output processor: incremental text equals a full decode, stop strings over token boundaries, multi-byte
characters split over byte-level BPE tokens, logprobs, EOS and max_tokens."""

import random

import pytest
from helpers import id_tokenizer

from prefixtune.serving.detokenize import IncrementalText
from prefixtune.serving.output import OutputProcessor
from prefixtune.serving.request import Request, SamplingParams
from prefixtune.serving.stats import EngineStats

CORPUS = ["hello world, this is a test of byte level merges", "naïve café déjà vu",
          "emoji 🙂🚀👍🏽 and more 🙂", "中文字符和日本語のテキスト", "stop strings: END and ### and \n\n"] * 3


def trained(kind: str):
    """A small trained tokenizer (no Hub): "bytelevel" (GPT-2's byte-level BPE) or "metaspace" (sentencepiece's
    leading-space pieces). Their vocabularies are small, so an emoji or a CJK character spans several tokens."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    raw = ByteLevelBPETokenizer() if kind == "bytelevel" else SentencePieceBPETokenizer()
    raw.train_from_iterator(CORPUS, vocab_size=330, min_frequency=1, special_tokens=["<pad>", "<unk>", "<eos>"],
                            **({"show_progress": False}))
    return PreTrainedTokenizerFast(tokenizer_object=raw._tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


TOKENIZERS = {"bytelevel": lambda: trained("bytelevel"), "metaspace": lambda: trained("metaspace"), "wordlevel": id_tokenizer}


def full_decode_events(tok, eos, tokens, params):
    """The output as the processor computed it before it was incremental: decode everything again and rescan every
    stop string at each token (the reference the incremental text must equal, event for event)."""
    events, sent = [], 0
    for n in range(1, len(tokens) + 1):
        is_eos = tokens[n - 1] == eos and not params.ignore_eos
        text = tok.decode(tokens[:n - 1] if is_eos else tokens[:n], skip_special_tokens=True)
        finish = "stop" if is_eos else None
        for s in params.stop:
            if (at := text.find(s)) >= 0:
                text, finish = text[:at], "stop"
        if finish is None and n >= params.max_tokens:
            finish = "length"
        if finish:
            events.append((text[sent:], finish))
            return events
        hold = max((k for s in params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        hold = max(hold, 1) if text.endswith("\ufffd") else hold
        upto = len(text) - hold
        events.append((text[sent:upto], None))
        sent = max(sent, upto)
    return events


def run(tok, eos, tokens, params, logprobs=None):
    """Feed `tokens` to a fresh OutputProcessor; -> the events of the request."""
    events = []
    out = OutputProcessor(tok, {eos}, EngineStats())
    r = Request(None, [4], params, events.append)
    for i, t in enumerate(tokens):
        if r.finished:
            break
        out.accept(r, t, logprobs[i] if logprobs else None)
    return events


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_incremental_text_equals_full_decode_on_random_streams(kind):
    tok = TOKENIZERS[kind]()
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(60):
        ids = [rng.randrange(vocab + 2) for _ in range(rng.randrange(1, 40))]  # + ids past the vocabulary
        inc = IncrementalText(tok)
        for n, t in enumerate(ids, 1):
            inc.add(t)
            assert inc.text + inc.pending == tok.decode(ids[:n], skip_special_tokens=True), (kind, ids[:n])
            assert "\ufffd" not in inc.text[-1:]  # settled text never ends in half a character


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_events_equal_the_full_decode_processor(kind):
    """Random streams, random stop strings (taken from decoded text so they do occur), EOS and max_tokens: the
    same deltas and finish reasons as decoding the whole output at every token."""
    tok = TOKENIZERS[kind]()
    eos = tok.convert_tokens_to_ids("<eos>")
    rng = random.Random(1)
    for _ in range(80):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))]
        text = tok.decode(ids, skip_special_tokens=True)
        stops = tuple({text[i:i + rng.randrange(1, 5)] for i in rng.sample(range(len(text)), min(2, len(text)))} - {""})
        params = SamplingParams(max_tokens=rng.randrange(1, 35), stop=stops if rng.random() < 0.7 else (),
                                ignore_eos=rng.random() < 0.3)
        got = [(e.text, e.finish_reason) for e in run(tok, eos, ids, params)]
        assert got == full_decode_events(tok, eos, ids, params), (kind, ids, params)


def test_a_long_run_of_skipped_ids_keeps_the_window_small():
    """EOS with ignore_eos (or ids past the vocabulary) decode to nothing: they must not widen the decoded window,
    or each token would cost more than the last."""
    tok = trained("bytelevel")
    eos = tok.convert_tokens_to_ids("<eos>")
    ids = tok.encode("hello") + [eos, len(tok) + 3] * 300 + tok.encode(" world")
    inc = IncrementalText(tok)
    for t in ids:
        inc.add(t)
        assert len(inc.ids) - inc.prefix_offset <= 4
    assert inc.text + inc.pending == tok.decode(ids, skip_special_tokens=True) == "hello world"


def test_stop_string_across_token_boundaries_is_cut_and_never_streamed():
    tok = trained("bytelevel")
    ids = tok.encode("hello world, this is a test")
    assert len(ids) > 4
    events = run(tok, -1, ids, SamplingParams(max_tokens=100, stop=("is a t",)))
    streamed = "".join(e.text for e in events)
    assert streamed == "hello world, this " and events[-1].finish_reason == "stop"
    assert all("is a t" not in "".join(e.text for e in events[:i + 1]) for i in range(len(events)))


@pytest.mark.parametrize("text", ["🙂🚀👍🏽", "中文字符", "déjà vu 🙂 中"])
def test_multibyte_characters_split_over_tokens_are_never_sent_in_halves(text):
    tok = trained("bytelevel")
    ids = [i for ch in text for i in tok.encode(ch)]  # one character at a time: each spans byte tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs characters split over tokens"
    events = run(tok, -1, ids, SamplingParams(max_tokens=len(ids)))
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == text and events[-1].finish_reason == "length"


def test_logprobs_eos_and_max_tokens():
    tok = id_tokenizer()
    eos = tok.eos_token_id
    lps = [(-0.5, [(9, -0.5)]), (-1.0, [(10, -1.0)]), (-2.0, [(eos, -2.0)])]
    events = run(tok, eos, [9, 10, eos], SamplingParams(max_tokens=10, logprobs=1), lps)
    assert [e.text for e in events] == ["w9", " w10", ""]
    assert [e.logprobs for e in events] == [[lps[0]], [lps[1]], []]  # EOS: no text, no logprob
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 3 and events[-1].token_ids == [eos]
    events = run(tok, eos, [9, eos, 10], SamplingParams(max_tokens=3, ignore_eos=True))
    assert [e.finish_reason for e in events] == [None, None, "length"]
    assert "".join(e.text for e in events) == "w9 w10"  # EOS is skipped as a special token, not an end
    events = run(tok, eos, [9, 10, 11, 12], SamplingParams(max_tokens=2))
    assert len(events) == 2 and events[-1].finish_reason == "length" and events[-1].completion_tokens == 2
