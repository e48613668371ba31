"""What a prefix adapter is to vLLM, without vLLM: the identity a request carries, and the key/values to write.

Shared by our engine (vllm_engine), the connector that runs inside vLLM (vllm_connector), and clients of vLLM's own
OpenAI server (`request_fields`), so it imports nothing of vLLM.

A request for adapter A is A's P placeholder ids (drawn, seeded by a hash of A's files, from the vocabulary) followed
by the prompt, with A's `cache_salt` (name + the same hash) and `kv_transfer_params` naming A. A composed request
("a+b": a's prefix, then b's, as compose.py and the other engines serve it) carries a's placeholders then b's, a salt
naming the composition with both versions, and `kv_transfer_params` listing the parts in order (`PrefixId`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import inject
from ..adapter_io import CONFIG_NAME, WEIGHTS_NAME
from ..config import ConfigError

# kv_transfer_params keys; each value is one string for one adapter, a list (in order) for a composed request.
ADAPTER_KEY = "prefixtune_adapter"  # the adapter's name
DIR_KEY = "prefixtune_dir"  # our engine only (extra_config accept_request_dirs): where the adapter lives
SHA_KEY = "prefixtune_sha"  # our engine: the version it accepted the request for (saves re-hashing the files)
# vLLM's kv_transfer_config for our connector (add "kv_connector_extra_config").
CONNECTOR = {"kv_connector": "PrefixConnector", "kv_connector_module_path": "prefixtune.serving.vllm_connector",
             "kv_role": "kv_both", "kv_load_failure_policy": "fail"}


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


@dataclass(frozen=True)
class PrefixId:
    """What a request carries for one adapter or a composition (the parts' prefixes concatenated in order).

    The salt of a composition names every part and its version, so vLLM's prefix cache (which hashes a block's token
    ids, chained from the first block, whose hash takes the salt) shares its blocks only between requests for the
    same parts, in the same order, at the same versions: never with "b+a", "a" alone or an updated a. Blocks of "a"
    that an "a+b" request could in principle reuse are not shared: the rule stays one line and cannot be wrong."""

    parts: tuple[AdapterId, ...]

    @property
    def name(self) -> str:
        return "+".join(a.name for a in self.parts)  # engine.COMPOSE

    @property
    def P(self) -> int:
        return sum(a.P for a in self.parts)

    @property
    def placeholders(self) -> tuple[int, ...]:
        return tuple(i for a in self.parts for i in a.placeholders)

    @property
    def salt(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0].salt
        return "prefixtune-composed:" + "+".join(f"{a.name}:{a.sha[:32]}" for a in self.parts)

    def transfer_params(self, with_location: bool = False) -> dict:
        """kv_transfer_params naming the parts in order; with_location: also their directories and versions (our
        engine, whose connector trusts them)."""
        def each(values):
            return values[0] if len(values) == 1 else list(values)

        params = {ADAPTER_KEY: each([a.name for a in self.parts])}
        if with_location:
            params |= {DIR_KEY: each([a.directory for a in self.parts]), SHA_KEY: each([a.sha for a in self.parts])}
        return params


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
    """The identity a request for adapter `name` carries: P placeholder ids drawn (seeded by the name and the files'
    hash) from [0, vocab), the same in every process that computes them."""
    d = Path(directory).resolve()
    try:
        pc = json.loads((d / CONFIG_NAME).read_text())
        P = int(pc["num_virtual_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"adapter {d}: {CONFIG_NAME} is missing or has no num_virtual_tokens ({e})") from None
    sha = adapter_sha(d)
    ids = tuple(random.Random(f"{name}:{sha}").sample(range(vocab), P)) if P <= vocab else ()
    if not ids:
        raise ConfigError(f"adapter {d}: {P} virtual tokens exceed the model's vocabulary ({vocab})")
    return AdapterId(name, str(d), sha, P, ids)


def placeholder_vocab(hf_config, tokenizer) -> int:
    """Placeholder ids must be ids vLLM accepts in a prompt: below both the model's and the tokenizer's size."""
    return min(int(hf_config.get_text_config().vocab_size), len(tokenizer))


def request_fields(name, directory, prompt_ids: list[int], vocab: int) -> dict:
    """What a client of vLLM's own OpenAI server sends for adapter `name` (completions with token ids):
    {"prompt": placeholders + prompt_ids, "cache_salt": ..., "kv_transfer_params": {...}}. A composed request: a
    list of names and the list of their directories, in order (["manual", "faq"], ["adapters/manual", ...])."""
    names, dirs = ([name], [directory]) if isinstance(name, str) else (list(name), list(directory))
    if not names or len(names) != len(dirs):
        raise ConfigError(f"request_fields: {len(names)} adapter names for {len(dirs)} directories; pass one "
                          "directory per name, in the same order")
    pid = PrefixId(tuple(adapter_id(n, d, vocab) for n, d in zip(names, dirs)))
    return {"prompt": list(pid.placeholders) + list(prompt_ids), "cache_salt": pid.salt,
            "kv_transfer_params": pid.transfer_params()}


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


def kv_head_slice(total_kv_heads: int, tp_size: int, tp_rank: int) -> slice:
    """The KV heads tensor-parallel rank `tp_rank` of `tp_size` holds in its cache, as vLLM's QKVParallelLinear splits
    them: total/tp consecutive heads each when tp <= total; when tp > total each head is replicated on tp/total
    consecutive ranks (rank r holds head r // (tp/total)). A count that divides neither way is refused (vLLM too)."""
    if tp_size <= total_kv_heads:
        if total_kv_heads % tp_size:
            raise ConfigError(f"tensor_parallel_size {tp_size} does not divide the model's {total_kv_heads} KV heads")
        n = total_kv_heads // tp_size
        return slice(tp_rank * n, (tp_rank + 1) * n)
    if tp_size % total_kv_heads:
        raise ConfigError(f"tensor_parallel_size {tp_size} is not a multiple of the model's {total_kv_heads} KV heads")
    head = tp_rank // (tp_size // total_kv_heads)
    return slice(head, head + 1)
