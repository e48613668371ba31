"""Prefix adapters inside vLLM: a v1 KV connector that puts each adapter's key/values into vLLM's paged cache.

A request for adapter A is A's P placeholder token ids followed by the prompt. The scheduler side of the
connector reports those P tokens as already computed elsewhere (a synchronous load); the worker side writes A's
per-layer keys and values for positions 0..P-1 into the request's blocks through the attention backend's own
cache-write op (`impl.do_kv_cache_update`: on CPU keys are stored transposed per block, so index writes would be
wrong). vLLM computes the prompt from position P, as our engine and peft number positions. vLLM's prefix cache
then shares the filled blocks between requests of the same adapter. A composed request ("a+b") is the same with
P = P_a + P_b: a's key/values at positions 0..P_a-1, b's at P_a..P_a+P_b-1 (compose.concat), the prompt from P.

What makes a request an adapter request, and keeps it exact (a mistake here gives plausible, wrong text):
- it names the adapter in `kv_transfer_params` ({"prefixtune_adapter": NAME}, or a list of names, in order, for a
  composed request); placeholder ids in the text alone select nothing (a bare request is never given key/values);
- its prompt starts with that adapter's placeholder ids (a composition: each part's, in order), which derive from a
  hash of the adapter's files, and its `cache_salt` is the adapter's salt (name + the same hash; a composition's
  names every part and version: vllm_prefix.PrefixId), so vLLM's prefix cache never serves one adapter's blocks to
  another adapter or composition, to a bare request, or to an updated version of the same adapter;
- anything else (unknown adapter, mismatched shapes, missing/short placeholders, a wrong salt, truncation that cut
  the placeholders, `prompt_logprobs`, which makes vLLM skip its cache and compute the placeholders as tokens)
  fails the request: its blocks are reported as failed loads and vLLM (kv_load_failure_policy "fail", its default)
  finishes it with an error. The worker logs the reason.

The adapter identity and key/values come from vllm_prefix (no vLLM there: clients of vLLM's own OpenAI server build
their requests with `vllm_prefix.request_fields`, docs/serving-vllm.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .. import compose
from ..adapter_io import CONFIG_NAME
from ..config import ConfigError
from .vllm_prefix import (  # noqa: F401 - CONNECTOR, request_fields: importable from here too
    ADAPTER_KEY,
    CONNECTOR,
    DIR_KEY,
    SHA_KEY,
    AdapterId,
    PrefixId,
    adapter_id,
    adapter_sha,
    arch_of_config,
    check_fits,
    kv_head_slice,
    placeholder_vocab,
    prefix_layers,
    request_fields,
)

log = logging.getLogger("prefixtune.vllm")
# Pipeline parallelism is untested (each stage holds some layers; the scheduler-side loads would need checking per
# stage): refused in one line, here for vLLM's own server and in vllm_engine for ours.
PP_REFUSED = ("pipeline_parallel_size {} is not supported for prefix adapters on vLLM; use pipeline_parallel_size 1 "
              "and tensor_parallel_size N to spread the model over N devices")


# ---- the connector ------------------------------------------------------------------------------------------
@dataclass
class Load:
    req_id: str
    parts: list[tuple[str, str]]  # (directory, sha) of each adapter, in order (several: a composed request)
    block_ids: list[int]
    start: int  # first position to write (what vLLM's own prefix cache did not already hold)
    end: int  # P (a composition: the sum of its parts')
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
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError(PP_REFUSED.format(vllm_config.parallel_config.pipeline_parallel_size))
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
        self._verdicts: dict[str, tuple[PrefixId | None, str | None]] = {}
        self._asked: dict[str, int] = {}  # req id -> num_computed of the last get_num_new_matched_tokens
        self._loads: list[Load] = []
        # Failing requests that loaded nothing (prompt_logprobs): vLLM checks failed blocks only among those computed
        # before a step, so they are reported one step after their prefill (which yields at most one token).
        self._doomed: dict[str, list[int]] = {}
        self._doomed_next: dict[str, list[int]] = {}
        self._per_req: dict[str, list[int]] = {}  # req id -> [loads, tokens loaded], reported when it finishes
        # worker side
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._heads = slice(None)  # the KV heads this tensor-parallel rank holds (register_kv_caches)
        self._tp = (0, 1)  # (rank, size)
        self._heads_problem: str | None = None  # _check_heads' verdict ("" fine), None until first checked
        self._prefixes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # adapter sha -> its layers
        self._failed: set[int] = set()

    # ---- scheduler side: which requests are adapter requests, and how much to load -----------------------
    def _vocab_size(self) -> int:
        if self._vocab is None:
            from ..loading import load_tokenizer

            tok = load_tokenizer(str(self.model_config.tokenizer))
            self._vocab = placeholder_vocab(self.model_config.hf_config, tok)
        return self._vocab

    def _lookup(self, name: str, directory: str | None, sha: str | None) -> AdapterId:
        """One adapter by name; directory and sha: what our engine's request says (accept_request_dirs), else None."""
        if directory is None:
            directory = self.configured.get(name)
        if directory is None and self.adapters_dir and (Path(self.adapters_dir) / name / CONFIG_NAME).is_file():
            directory = str(Path(self.adapters_dir) / name)
        if directory is None:
            raise ConfigError(f"unknown adapter {name!r} (not in the connector's adapters_dir / adapters)")
        known = self._known.get(name)
        if known is None or known.directory != str(Path(directory).resolve()) or known.sha != (sha or adapter_sha(directory)):
            check_fits(directory, self.arch, self.model_label)
            known = self._known[name] = adapter_id(name, directory, self._vocab_size())
        return known

    def _parts(self, params: dict) -> PrefixId:
        """The adapter(s) kv_transfer_params name, in order: {ADAPTER_KEY: name} or {ADAPTER_KEY: [a, b, ...]} (our
        engine adds DIR_KEY / SHA_KEY, each a value or a list of the same shape)."""
        names = params.get(ADAPTER_KEY)
        names = names if isinstance(names, list) else [names]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"{ADAPTER_KEY} must be an adapter name or a non-empty list of names (composed, in "
                              f"order); got {params.get(ADAPTER_KEY)!r}")

        def listed(key):  # what our engine says of each part; None: find it by name / hash its files
            v = params.get(key) if self.accept_request_dirs else None
            if v is None:
                return [None] * len(names)
            return v if isinstance(v, list) else [v]

        dirs, shas = listed(DIR_KEY), listed(SHA_KEY)
        if len(dirs) != len(names) or len(shas) != len(names):
            raise ConfigError(f"{DIR_KEY} / {SHA_KEY} must list one entry per adapter named in {ADAPTER_KEY}")
        return PrefixId(tuple(self._lookup(n, d, s) for n, d, s in zip(names, dirs, shas)))

    def _verdict(self, request) -> tuple[PrefixId | None, str | None]:
        """(adapter(s), error) for a request: (None, None) bare; an error means the request must fail."""
        rid = request.request_id
        if rid in self._verdicts:
            return self._verdicts[rid]
        params = request.kv_transfer_params or {}
        name = params.get(ADAPTER_KEY)
        verdict: tuple[PrefixId | None, str | None] = (None, None)
        if name is not None:
            try:
                a = self._parts(params)
                ids = list(request.prompt_token_ids or [])
                if request.skip_reading_prefix_cache:
                    raise ConfigError("prompt_logprobs (or another setting that skips the prefix cache) is not "
                                      "supported for adapter requests: vLLM would compute the placeholders as text")
                if ids[:a.P] != list(a.placeholders) or len(ids) <= a.P:
                    raise ConfigError(f"the prompt must start with {a.name!r}'s {a.P} placeholder ids (a composition: "
                                      "each part's, in order) and hold at least one more token (truncated, or built "
                                      "for another version?)")
                if request.cache_salt != a.salt:
                    raise ConfigError(f"cache_salt must be {a.name!r}'s salt {a.salt!r}")
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
        parts = [(p.directory, p.sha) for p in a.parts] if a else []
        self._loads.append(Load(request.request_id, parts, block_ids, start, start + num_external_tokens, err))
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
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        self._kv_caches = dict(kv_caches)
        # Under tensor parallelism each rank's cache holds only its KV heads: it writes that slice of the prefix.
        self._tp = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        self._heads = kv_head_slice(self.arch.kv_heads, self._tp[1], self._tp[0])
        self._heads_problem = None

    def _part(self, directory: str, sha: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if sha not in self._prefixes:
            if adapter_sha(directory) != sha:
                raise ConfigError(f"adapter {directory} changed on disk since the request was accepted")
            if len(self._prefixes) >= 64:  # a bounded cache of adapters' key/values (oldest out)
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[sha] = prefix_layers(directory, self.arch, self.model_label)
        return self._prefixes[sha]

    def _prefix(self, load: Load) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value) [kv_heads, P, head_dim] for positions 0..P-1: a composition's parts in order (the
        torch engine's numbering: a at 0..P_a-1, b from P_a), concatenated per load (a copy of P slots per layer)."""
        layers = [self._part(d, sha) for d, sha in load.parts]
        return layers[0] if len(layers) == 1 else compose.concat(layers)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        meta = self._get_connector_metadata()
        for blocks in meta.fail_blocks.values():
            self._failed.update(blocks)
        for load in meta.loads:
            try:
                if load.error:
                    raise ConfigError(load.error)
                # a slice that is not this rank's heads would write plausible, wrong keys
                self._check_heads(forward_context)
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
                k, v = (t[self._heads] for t in layers[extract_layer_index(name)])
                # [kv_heads, P, head_dim] -> [tokens, kv_heads, head_dim] as the backend's cache write takes them;
                # the keys as the adapter stores them (transformers' cache: no second rotary rotation).
                key = k[:, load.start:load.end].transpose(0, 1).to(kv_cache.device, self.model_config.dtype)
                value = v[:, load.start:load.end].transpose(0, 1).to(key.device, key.dtype)
                layer.impl.do_kv_cache_update(layer, key.contiguous(), value.contiguous(), kv_cache,
                                              slots.to(kv_cache.device))

    def _check_heads(self, forward_context) -> None:
        """This rank's slice of the adapter's KV heads must be what each of its attention layers caches. The layers
        do not change after register_kv_caches: walked once, the verdict kept for every later load."""
        if self._heads_problem is None:
            self._heads_problem = self._heads_mismatch(forward_context)
        if self._heads_problem:
            raise ConfigError(self._heads_problem)

    def _heads_mismatch(self, forward_context) -> str:
        """The first layer whose cached KV heads differ from this rank's slice, described; "" when none does."""
        want = len(range(self.arch.kv_heads)[self._heads])
        for name, kv_cache in self._kv_caches.items():
            layer = forward_context.no_compile_layers[name]
            heads, size = getattr(layer, "num_kv_heads", None), getattr(layer, "head_size", None)
            if (heads, size) != (want, self.arch.head_dim) or heads not in kv_cache.shape:
                return (f"tensor-parallel rank {self._tp[0]} of {self._tp[1]}: layer {name} caches {heads} KV heads of "
                        f"size {size} (cache shape {tuple(kv_cache.shape)}), but the adapter's slice for this rank is "
                        f"{want} of {self.arch.kv_heads} heads of size {self.arch.head_dim}")
        return ""

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return
