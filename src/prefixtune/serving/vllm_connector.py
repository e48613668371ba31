"""Prefix adapters inside vLLM: a v1 KV connector that puts each adapter's key/values into vLLM's paged cache.

A request for adapter A is A's P placeholder token ids followed by the prompt. The scheduler side of the
connector reports those P tokens as already computed elsewhere (a synchronous load); the worker side writes A's
per-layer keys and values for positions 0..P-1 into the request's blocks through the attention backend's own
cache-write op (`impl.do_kv_cache_update`: on CPU keys are stored transposed per block, so index writes would be
wrong). vLLM computes the prompt from position P, as our engine and peft number positions. vLLM's prefix cache
then shares the filled blocks between requests of the same adapter.

What makes a request an adapter request, and keeps it exact (a mistake here gives plausible, wrong text):
- it names the adapter in `kv_transfer_params` ({"prefixtune_adapter": NAME}); placeholder ids in the text alone
  select nothing (a bare request is never given an adapter's key/values);
- its prompt starts with that adapter's placeholder ids, which derive from a hash of the adapter's files, and its
  `cache_salt` is the adapter's salt (name + the same hash), so vLLM's prefix cache never serves one adapter's
  blocks to another adapter, to a bare request, or to an updated version of the same adapter;
- anything else (unknown adapter, mismatched shapes, missing/short placeholders, a wrong salt, truncation that cut
  the placeholders, `prompt_logprobs`, which makes vLLM skip its cache and compute the placeholders as tokens)
  fails the request: its blocks are reported as failed loads and vLLM (kv_load_failure_policy "fail", its default)
  finishes it with an error. The worker logs the reason.

`request_fields(...)` builds what a client of vLLM's own OpenAI server sends (README, "vLLM").
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .. import inject
from ..adapter_io import CONFIG_NAME, WEIGHTS_NAME
from ..config import ConfigError

log = logging.getLogger("prefixtune.vllm")

ADAPTER_KEY = "prefixtune_adapter"  # kv_transfer_params key naming the adapter
DIR_KEY = "prefixtune_dir"  # our engine only (extra_config accept_request_dirs): where the adapter lives
SHA_KEY = "prefixtune_sha"  # our engine: the version it accepted the request for (saves re-hashing the files)
CONNECTOR = {"kv_connector": "PrefixConnector", "kv_connector_module_path": __name__, "kv_role": "kv_both",
             "kv_load_failure_policy": "fail"}


# ---- adapter identity (shared by our engine, the connector and clients of vLLM's server) --------------------
@dataclass(frozen=True)
class AdapterId:
    name: str
    directory: str
    sha: str  # of adapter_config.json + the weights: a changed adapter is a different adapter
    P: int
    placeholders: tuple[int, ...]

    @property
    def salt(self) -> str:
        return f"prefixtune:{self.name}:{self.sha[:32]}"


def adapter_sha(directory) -> str:
    d = Path(directory)
    h = hashlib.sha256()
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            h.update((d / f).read_bytes())
        except OSError as e:
            raise ConfigError(f"adapter {d}: cannot read {f} ({e}); pass an adapter directory") from None
    return h.hexdigest()


def adapter_id(name: str, directory, vocab: int) -> AdapterId:
    """The identity a request for adapter `name` carries: P placeholder ids drawn (seeded by the weights' hash)
    from [0, vocab), the same in every process that computes them."""
    d = Path(directory).resolve()
    try:
        pc = json.loads((d / CONFIG_NAME).read_text())
        P = int(pc["num_virtual_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"adapter {d}: {CONFIG_NAME} is missing or has no num_virtual_tokens ({e})") from None
    sha = adapter_sha(d)
    ids = tuple(random.Random(sha).sample(range(vocab), P)) if P <= vocab else ()
    if not ids:
        raise ConfigError(f"adapter {d}: {P} virtual tokens exceed the model's vocabulary ({vocab})")
    return AdapterId(name, str(d), sha, P, ids)


def placeholder_vocab(hf_config, tokenizer) -> int:
    """Placeholder ids must be ids vLLM accepts in a prompt: below both the model's and the tokenizer's size."""
    return min(int(hf_config.get_text_config().vocab_size), len(tokenizer))


def request_fields(name: str, directory, prompt_ids: list[int], vocab: int) -> dict:
    """What a client of vLLM's own OpenAI server sends for adapter `name` (completions with token ids):
    {"prompt": placeholders + prompt_ids, "cache_salt": ..., "kv_transfer_params": {...}}."""
    a = adapter_id(name, directory, vocab)
    return {"prompt": list(a.placeholders) + list(prompt_ids), "cache_salt": a.salt,
            "kv_transfer_params": {ADAPTER_KEY: name}}


def arch_of_config(hf_config) -> inject.Arch:
    return inject.arch_of(SimpleNamespace(config=hf_config))


def check_fits(directory, arch: inject.Arch, model: str) -> None:
    """Compare an adapter's shapes with the model, naming each of layers / KV heads / head size that differs."""
    try:
        pc = json.loads((Path(directory) / CONFIG_NAME).read_text())
        layers, kv, token_dim = int(pc["num_layers"]), int(pc["num_attention_heads"]), int(pc["token_dim"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"adapter {directory}: unreadable {CONFIG_NAME} ({e})") from None
    if pc.get("peft_type") != "PREFIX_TUNING":
        raise ConfigError(f"adapter {directory}: peft_type {pc.get('peft_type')!r}, not a prefix-tuning adapter")
    diffs = [f"{what}: adapter {mine} vs model {theirs}" for what, mine, theirs in (
        ("layers", layers, arch.num_layers), ("KV heads", kv, arch.kv_heads),
        ("head size", token_dim // max(kv, 1), arch.head_dim)) if mine != theirs]
    if diffs:
        raise ConfigError(f"adapter {directory} was made for another model ({pc.get('base_model_name_or_path')}), "
                          f"not {model}: " + "; ".join(diffs))


def prefix_layers(directory, arch: inject.Arch, model: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An adapter directory (ours or peft's) -> per-layer (key, value), each [kv_heads, P, head_dim], fp32."""
    from ..adapter_io import read_adapter
    from ..encoder import PrefixEncoder

    check_fits(directory, arch, model)
    cfg, state, _ = read_adapter(directory, arch, None)
    if cfg.placement != "decoder":
        raise ConfigError(f"adapter {directory}: placement {cfg.placement!r} is for encoder-decoder models")
    enc = PrefixEncoder(cfg, arch.num_layers, arch.token_dim)
    enc.load_state_dict(state)
    with torch.no_grad():
        return [(k.clone(), v.clone()) for k, v in inject.split_layers(enc.eval()(), arch)]


# ---- the connector ------------------------------------------------------------------------------------------
@dataclass
class Load:
    req_id: str
    directory: str
    sha: str
    block_ids: list[int]
    start: int  # first position to write (what vLLM's own prefix cache did not already hold)
    end: int  # P
    error: str | None = None  # set: the request must fail; its blocks are reported as failed loads


@dataclass
class PrefixMeta(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)
    fail_blocks: dict[str, list[int]] = field(default_factory=dict)  # req id -> its block to report failed


class PrefixConnector(KVConnectorBase_V1):
    """kv_connector_extra_config: adapters_dir (each subdirectory an adapter, named after it), adapters
    ({name: dir}), accept_request_dirs (trust `prefixtune_dir` in requests: our in-process engine only)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        par = vllm_config.parallel_config
        if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
            raise ValueError(
                "prefixtune's vLLM connector is not tested with tensor/pipeline parallelism "
                f"(tensor_parallel_size={par.tensor_parallel_size}, pipeline_parallel_size="
                f"{par.pipeline_parallel_size}); run with 1 and 1")
        self.model_config = vllm_config.model_config
        self.model_label = str(self.model_config.model)
        self.arch = arch_of_config(self.model_config.hf_config)
        self.block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.adapters_dir = extra.get("adapters_dir")
        self.configured = dict(extra.get("adapters") or {})
        self.accept_request_dirs = bool(extra.get("accept_request_dirs"))
        self._vocab: int | None = extra.get("vocab")
        # scheduler side
        self._known: dict[str, AdapterId] = {}
        self._verdicts: dict[str, tuple[AdapterId | None, str | None]] = {}
        self._asked: dict[str, int] = {}  # req id -> num_computed of the last get_num_new_matched_tokens
        self._loads: list[Load] = []
        # Failing requests that loaded nothing (prompt_logprobs): vLLM checks failed blocks only among those computed
        # before a step, so they are reported one step after their prefill (which yields at most one token).
        self._doomed: dict[str, list[int]] = {}
        self._doomed_next: dict[str, list[int]] = {}
        self._per_req: dict[str, list[int]] = {}  # req id -> [loads, tokens loaded], reported when it finishes
        # worker side
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._prefixes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._failed: set[int] = set()

    # ---- scheduler side: which requests are adapter requests, and how much to load -----------------------
    def _vocab_size(self) -> int:
        if self._vocab is None:
            from ..loading import load_tokenizer

            tok = load_tokenizer(str(self.model_config.tokenizer))
            self._vocab = placeholder_vocab(self.model_config.hf_config, tok)
        return self._vocab

    def _lookup(self, name: str, params: dict) -> AdapterId:
        directory = params.get(DIR_KEY) if self.accept_request_dirs else None
        if directory is None:
            directory = self.configured.get(name)
        if directory is None and self.adapters_dir and (Path(self.adapters_dir) / name / CONFIG_NAME).is_file():
            directory = str(Path(self.adapters_dir) / name)
        if directory is None:
            raise ConfigError(f"unknown adapter {name!r} (not in the connector's adapters_dir / adapters)")
        known = self._known.get(name)
        sha = params.get(SHA_KEY) if self.accept_request_dirs else None
        if known is None or known.directory != str(Path(directory).resolve()) or known.sha != (sha or adapter_sha(directory)):
            check_fits(directory, self.arch, self.model_label)
            known = self._known[name] = adapter_id(name, directory, self._vocab_size())
        return known

    def _verdict(self, request) -> tuple[AdapterId | None, str | None]:
        """(adapter, error) for a request: (None, None) bare; an error means the request must fail."""
        rid = request.request_id
        if rid in self._verdicts:
            return self._verdicts[rid]
        params = request.kv_transfer_params or {}
        name = params.get(ADAPTER_KEY)
        verdict: tuple[AdapterId | None, str | None] = (None, None)
        if name is not None:
            try:
                a = self._lookup(str(name), params)
                ids = list(request.prompt_token_ids or [])
                if request.skip_reading_prefix_cache:
                    raise ConfigError("prompt_logprobs (or another setting that skips the prefix cache) is not "
                                      "supported for adapter requests: vLLM would compute the placeholders as text")
                if ids[:a.P] != list(a.placeholders) or len(ids) <= a.P:
                    raise ConfigError(f"the prompt must start with adapter {a.name!r}'s {a.P} placeholder ids and "
                                      "hold at least one more token (truncated, or built for another version?)")
                if request.cache_salt != a.salt:
                    raise ConfigError(f"cache_salt must be adapter {a.name!r}'s salt {a.salt!r}")
                verdict = (a, None)
            except (ConfigError, OSError) as e:
                verdict = (None, f"request {rid}: adapter {name!r}: {e}")
                log.error("%s", verdict[1])
        self._verdicts[rid] = verdict
        return verdict

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        a, err = self._verdict(request)
        if a is None and err is None:
            return 0, False
        self._asked[request.request_id] = num_computed_tokens
        # A failing request claims its prompt but one token, so its blocks exist and can be reported failed.
        end = a.P if a is not None else len(request.prompt_token_ids or []) - 1
        return max(end - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        a, err = self._verdict(request)
        if a is None and err is None:
            return
        block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens == 0:
            if err is not None:  # nothing to load, so no failed load this step: fail it on the next one
                self._doomed_next[request.request_id] = block_ids[:1]
            return
        start = self._asked.get(request.request_id, 0)
        self._loads.append(Load(request.request_id, a.directory if a else "", a.sha if a else "", block_ids,
                                start, start + num_external_tokens, err))
        counts = self._per_req.setdefault(request.request_id, [0, 0])
        counts[0] += 1
        counts[1] += num_external_tokens

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = PrefixMeta(self._loads, self._doomed)
        self._loads, self._doomed, self._doomed_next = [], self._doomed_next, {}
        return meta

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        for d in (self._verdicts, self._asked, self._doomed, self._doomed_next):  # (its blocks may go to others)
            d.pop(request.request_id, None)
        loads, tokens = self._per_req.pop(request.request_id, (0, 0))
        # In the request's output (RequestOutput.kv_transfer_params): how often its prefix was written (more than
        # once after a preemption) and how many positions (fewer than P when vLLM's prefix cache held the rest).
        return False, ({"prefixtune_loads": loads, "prefixtune_tokens": tokens} if loads else None)

    # ---- worker side: write the key/values ----------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)

    def _prefix(self, load: Load) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if load.sha not in self._prefixes:
            if adapter_sha(load.directory) != load.sha:
                raise ConfigError(f"adapter {load.directory} changed on disk since the request was accepted")
            if len(self._prefixes) >= 64:  # a bounded cache of adapters' key/values (oldest out)
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[load.sha] = prefix_layers(load.directory, self.arch, self.model_label)
        return self._prefixes[load.sha]

    def start_load_kv(self, forward_context, **kwargs) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        meta = self._get_connector_metadata()
        for blocks in meta.fail_blocks.values():
            self._failed.update(blocks)
        for load in meta.loads:
            try:
                if load.error:
                    raise ConfigError(load.error)
                layers = self._prefix(load)
            except Exception as e:  # any failure fails the request; vLLM never computes the placeholders
                log.error("prefixtune: cannot load the prefix for request %s: %s", load.req_id, e)
                # The first block this load fills (new, not shared: start is where vLLM's own cache hit ends) is
                # enough: vLLM fails the request and evicts that block and the ones after it.
                self._failed.add(load.block_ids[load.start // self.block_size])
                continue
            bs = self.block_size
            slots = torch.tensor([load.block_ids[p // bs] * bs + p % bs for p in range(load.start, load.end)],
                                 dtype=torch.long)
            for name, kv_cache in self._kv_caches.items():
                layer = forward_context.no_compile_layers[name]
                k, v = layers[extract_layer_index(name)]
                # [kv_heads, P, head_dim] -> [tokens, kv_heads, head_dim] as the backend's cache write takes them;
                # the keys as the adapter stores them (transformers' cache: no second rotary rotation).
                key = k[:, load.start:load.end].transpose(0, 1).to(kv_cache.device, self.model_config.dtype)
                value = v[:, load.start:load.end].transpose(0, 1).to(key.device, key.dtype)
                layer.impl.do_kv_cache_update(layer, key.contiguous(), value.contiguous(), kv_cache,
                                              slots.to(kv_cache.device))

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return
