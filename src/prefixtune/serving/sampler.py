"""Per-row sampling from one step's logits, with transformers' own logits processors (generate()'s order)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy (argmax), identical to generate(do_sample=False)
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: fixed output lengths
    # OpenAI's penalties on tokens generated so far: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF/vLLM's multiplicative penalty on every token of prompt + output (1.0 = off), as generate() applies it.
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely


class Row(Protocol):
    """What sampling reads of a request (request.Request; named here so sampler does not import request)."""
    prompt_ids: list[int]
    generated: list[int]
    params: SamplingParams
    gen: torch.Generator | None
    shaping: LogitsProcessorList
    warping: LogitsProcessorList



class OpenAIPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI's presence/frequency penalties, counted over the generated tokens only (not the prompt):
    logit -= frequency * count + presence * (count > 0). transformers has no processor for these."""

    def __init__(self, presence: float, frequency: float, prompt_len: int):
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        out = input_ids[:, self.prompt_len:]
        if out.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def logits_processors(p: SamplingParams, prompt_len: int = 0) -> tuple[LogitsProcessorList, LogitsProcessorList]:
    """(shaping, warping) for one request: penalties and biases shape the scores (greedy takes their argmax),
    warpers apply only when sampling (temperature > 0)."""
    shaping = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        shaping.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.presence_penalty or p.frequency_penalty:
        shaping.append(OpenAIPenaltyLogitsProcessor(p.presence_penalty, p.frequency_penalty, prompt_len))
    if p.logit_bias:
        shaping.append(SequenceBiasLogitsProcessor([[[tok], bias] for tok, bias in p.logit_bias]))
    warping = LogitsProcessorList()
    if p.temperature > 0:
        if p.temperature != 1.0:
            warping.append(TemperatureLogitsWarper(p.temperature))
        if p.top_p < 1.0:
            warping.append(TopPLogitsWarper(p.top_p))
    return shaping, warping


def next_token(r: Row, scores: torch.Tensor) -> int:
    """One row's next token from its logits [1, vocab]: shaped, then argmax (greedy) or warped and sampled with
    the request's own generator, as generate() does for one sequence."""
    ids = torch.tensor([r.prompt_ids + r.generated], device=scores.device) if r.shaping else None
    scores = r.shaping(ids, scores) if r.shaping else scores
    if r.gen is None:
        return int(scores.argmax(-1))
    scores = r.warping(ids, scores)
    probs = torch.softmax(scores.float(), -1)[0].cpu()
    return int(torch.multinomial(probs, 1, generator=r.gen))


Logprob = tuple[float, list[tuple[int, float]]]  # the chosen token's logprob, and the top-k (id, logprob)


def sample_rows(rows: list[Row], logits: torch.Tensor) -> list[tuple[int, Logprob | None]]:
    """One (token, logprob entry or None) per row from the step's logits [len(rows), vocab]. Logprobs are the
    model's own distribution (before penalties and temperature), as vLLM reports them."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    logp = dict(zip(want, torch.log_softmax(logits[want].float(), -1))) if want else {}
    plain = [i for i, r in enumerate(rows) if r.gen is None and not r.shaping]
    greedy = dict(zip(plain, logits[plain].argmax(-1).tolist())) if plain else {}
    out = []
    for i, r in enumerate(rows):
        tok = greedy[i] if i in greedy else next_token(r, logits[i:i + 1])
        entry = None
        if i in logp:
            k = r.params.logprobs
            top = logp[i].topk(k) if k else None
            entry = (float(logp[i][tok]), list(zip(top.indices.tolist(), top.values.tolist())) if k else [])
        out.append((tok, entry))
    return out
