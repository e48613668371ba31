"""AdapterRegistry: which adapters exist, which are in memory, and which may leave it.

An engine may serve thousands of adapters from one directory. The registry indexes the directory without
reading any weights (name, base model, P, file size from each `adapter_config.json`), loads an adapter's
key/values through the backend on its first request, and keeps the resident set within a budget (a count
and/or bytes), evicting the least recently used adapter that no queued or running request holds. Pinned
adapters stay. Adapters added to the directory later are found when a request names them, or by `scan()`.

The backend hooks `load(name, directory) -> resident bytes` and `unload(name)` run under the engine's model
lock (the caller's); the registry's own lock guards only its bookkeeping, so `hold`/`release` are cheap from
any thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..adapter_io import CONFIG_NAME, RUN_BEST, RUN_FINAL, RUN_MARKER, WEIGHTS_NAME, resolve_adapter_dir
from ..config import ConfigError, check_adapter_name
from ..knowledge import read_layout
from .errors import AdapterExists, AdapterLoadFailed, CapacityUnavailable, InvalidRequest, UnknownAdapter
from .stats import EngineStats

log = logging.getLogger("prefixtune.serve")

# More new adapter directories than this are indexed on a thread when the engine starts (scan(background=True)):
# 100,000 configs take tens of seconds to read, and a server should answer before that.
BACKGROUND_INDEX_OVER = 1000


@dataclass
class AdapterEntry:
    name: str
    directory: Path  # the adapter directory itself (a training run's adapter/ already resolved)
    num_virtual_tokens: int
    base_model: str | None
    file_bytes: int
    problem: str | None = None  # why the config could not be read; a request for it fails with this
    resident_bytes: int = 0
    resident: bool = False
    refs: int = 0  # queued and running requests that use it
    pinned: bool = False
    last_used: float = 0.0
    layout: dict | None = None  # a knowledge prefix's trained layout (prefixtune/knowledge.py): how chat is rendered


def read_entry(name: str, directory: Path, best: bool = False) -> AdapterEntry:
    """Index one adapter directory from its config alone (no weights read): one open and one stat in the common
    case (a training run directory is resolved to its final adapter/ first, or with `best` to its best/)."""
    try:
        try:
            text, target = (directory / CONFIG_NAME).read_text(), directory
        except FileNotFoundError:
            target, _ = resolve_adapter_dir(directory, best)
            text = (target / CONFIG_NAME).read_text()
        cfg = json.loads(text)
        p = int(cfg["num_virtual_tokens"])
        try:
            size = os.stat(target / WEIGHTS_NAME).st_size
        except FileNotFoundError:
            size = 0  # read_adapter names what is missing when the adapter is loaded
        return AdapterEntry(name, target, p, cfg.get("base_model_name_or_path"), size, layout=read_layout(target))
    except (ConfigError, OSError, ValueError, KeyError, TypeError) as e:
        why = str(e) if isinstance(e, ConfigError) else f"{directory / CONFIG_NAME} is unreadable ({type(e).__name__}: {e})"
        return AdapterEntry(name, Path(directory), 0, None, 0, problem=why)


def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() or (path / RUN_MARKER).is_file()


def single_adapter_name(root: Path) -> str | None:
    """The name `--adapters ROOT` serves ROOT under when ROOT is itself one training run or one adapter, else
    None (a directory of them). A run is named after its directory and never serves its insides (adapter/, best/,
    checkpoints); a run's own adapter/ or best/ given directly is named after the run too."""
    if (root / RUN_MARKER).is_file() or (root / RUN_FINAL / CONFIG_NAME).is_file():
        return root.name
    if (root / CONFIG_NAME).is_file():
        in_run = root.name in (RUN_FINAL, RUN_BEST) and (root.parent / RUN_MARKER).is_file()
        return root.parent.name if in_run else root.name
    return None


class AdapterRegistry:
    def __init__(self, load: Callable[[str, Path], int], unload: Callable[[str], None], *, root: str | Path | None = None,
                 max_loaded: int | None = None, max_bytes: int | None = None, reserved: Iterable[str] = (),
                 best: bool = False, stats: EngineStats | None = None):
        if max_loaded is not None and max_loaded < 1:
            raise ConfigError(f"--max-loaded-adapters {max_loaded}: must be at least 1 (or unset for no limit)")
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"--adapter-memory {max_bytes}: must be a positive size such as 512MB (or unset)")
        self._load, self._unload = load, unload
        self.root = Path(root).resolve() if root else None
        self.max_loaded, self.max_bytes = max_loaded, max_bytes
        self.reserved = set(reserved)  # names that are not adapters (the base model's)
        self.best = best  # training runs serve their best/ (by eval score) instead of their final adapter/
        self._entries: dict[str, AdapterEntry] = {}
        # The resident ones, kept apart: the budget checks run on every load and must not walk 100,000 entries
        # (they did: two walks per cold load were most of what a server of 100,000 adapters lost in tokens/s).
        self._resident: dict[str, AdapterEntry] = {}
        self._lock = threading.RLock()
        self.stats = stats if stats is not None else EngineStats()  # the engine's: hits, misses, loads, evictions
        self._bytes_per_file_byte = 1.0
        self._indexer: threading.Thread | None = None

    # ---- the catalogue ---------------------------------------------------------------------------------------
    def scan(self, background: bool = False) -> tuple[list[str], list[str]]:
        """(Re)index the adapters directory: -> (names added, names removed). Resident adapters whose directory
        is gone are forgotten (running rows keep their copy of the key/values). With `background`, more than
        BACKGROUND_INDEX_OVER new directories are indexed on a thread (then none is reported added): the server
        answers at once, and a request for one not indexed yet finds it by name (`find`)."""
        if self.root is None:
            return [], []
        if not self.root.is_dir():
            raise ConfigError(f"--adapters {self.root}: not a directory; pass the directory that holds adapter "
                              "directories (each with adapter_config.json)")
        single = single_adapter_name(self.root)
        if single is not None:  # the root is one run (or one adapter): served whole, under one name
            found = {single: self.root}
        else:
            with os.scandir(self.root) as it:  # directory entries know their type: no stat per entry
                found = {d.name: self.root / d.name for d in it if d.is_dir()}
        with self._lock:
            ours = {n for n, e in self._entries.items() if self._under_root(e.directory)}
            removed = sorted(n for n in ours if n not in found)
            for n in removed:
                self._forget(n)
            todo = sorted(n for n in found if n not in self._entries and n not in self.reserved)
        if background and len(todo) > BACKGROUND_INDEX_OVER:
            self._indexer = threading.Thread(target=self._add, args=(todo, found), name="adapter-index", daemon=True)
            self._indexer.start()
            log.info("indexing %d adapter directories in the background", len(todo))
            return [], removed
        return self._add(todo, found), removed

    def _add(self, todo: list[str], found: dict[str, Path]) -> list[str]:
        t0, added = time.perf_counter(), []
        for n in todo:
            e = read_entry(n, found[n], self.best)  # outside the lock: a request's find() never waits for the index
            if e.problem and not is_adapter_dir(found[n]):
                continue  # not an adapter at all (a stray directory), rather than a broken one
            with self._lock:
                if n in self._entries:  # found by a request meanwhile
                    continue
                self._entries[n] = e
            added.append(n)
        if len(todo) > BACKGROUND_INDEX_OVER:
            log.info("indexed %d adapters in %.1f s", len(added), time.perf_counter() - t0)
        return added

    @property
    def indexing(self) -> bool:
        """A background index is still running (the listing is not complete yet)."""
        return self._indexer is not None and self._indexer.is_alive()

    def wait_indexed(self, timeout: float | None = None) -> bool:
        if self._indexer is not None:
            self._indexer.join(timeout)
        return not self.indexing

    def _under_root(self, path: Path) -> bool:
        if self.root is None:
            return False
        path = path.resolve()
        return path == self.root or self.root in path.parents

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self, on_disk: bool = False) -> list[AdapterEntry]:
        """All entries, or (on_disk) those indexed from the adapters directory."""
        with self._lock:
            return [self._entries[n] for n in sorted(self._entries)
                    if not on_disk or self._under_root(self._entries[n].directory)]

    def find(self, name: str) -> AdapterEntry:
        """The entry for `name`; an adapter directory that appeared under the root since the last scan is
        indexed now. UnknownAdapter otherwise."""
        with self._lock:
            e = self._entries.get(name)
            if e is not None:
                return e
            if self.root is not None and name not in self.reserved and _plain(name) and single_adapter_name(self.root) is None:
                d = self.root / name
                if d.is_dir() and is_adapter_dir(d):
                    e = self._entries[name] = read_entry(name, d, self.best)
                    return e
            known = sorted(self.reserved) + self.names()
            shown = f"{known[:20]}"[:-1] + (f", ... ({len(known)} in all)]" if len(known) > 20 else "]")
            raise UnknownAdapter(f"unknown model {name!r}; available: {shown}")

    def layout_of(self, model: str) -> dict | None:
        """The trained layout of the knowledge prefix a request names (the first part of a composed name that has
        one); None for the base model and other adapters."""
        for part in (model or "").split("+"):  # engine.COMPOSE
            try:
                e = self.find(part)
            except UnknownAdapter:
                return None  # the base model's name, or one the request's own lookup reports
            if e.layout is not None:
                return e.layout
        return None

    def register(self, name: str, directory: str | Path, pinned: bool = False) -> AdapterEntry:
        """Add an adapter by name and directory (a hot load, a Python caller, --pin); not loaded yet."""
        try:
            check_adapter_name(name)
        except ConfigError as e:
            raise InvalidRequest(str(e)) from None
        if name in self.reserved:
            raise AdapterExists(f"adapter name {name!r} is the base model's name; pick another")
        with self._lock:
            if name in self._entries and self._entries[name].resident:
                raise AdapterExists(f"adapter {name!r} is already loaded; unload it first")
            e = read_entry(name, Path(directory))
            if e.problem:
                raise AdapterLoadFailed(f"cannot load adapter {name!r}: {e.problem}")
            e.pinned = pinned or (name in self._entries and self._entries[name].pinned)
            self._entries[name] = e
            return e

    def register_resident(self, name: str, num_virtual_tokens: int, nbytes: int) -> None:
        """An adapter the backend already holds (attached to the model before serving): pinned, since there is
        no directory to load it again from."""
        with self._lock:
            e = self._entries[name] = AdapterEntry(name, Path(), num_virtual_tokens, None, 0, resident_bytes=nbytes,
                                                   resident=True, pinned=True)
            self._resident[name] = e

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._entries:
                raise UnknownAdapter(f"unknown adapter {name!r}; known: {self.names()}")
            self._forget(name)

    def _forget(self, name: str) -> None:
        e = self._entries.pop(name)
        if e.resident:
            self._evict(e)

    def pin(self, name: str) -> None:
        self.find(name).pinned = True

    # ---- residency ---------------------------------------------------------------------------------------------
    def hold(self, names: Iterable[str]) -> None:
        """A queued request uses these: they exist, and none of them is evicted until `release`."""
        with self._lock:
            entries = [self.find(n) for n in names]
            for e in entries:
                if e.problem:
                    raise AdapterLoadFailed(f"cannot load adapter {e.name!r}: {e.problem}")
            for e in entries:
                e.refs += 1

    def release(self, names: Iterable[str]) -> None:
        with self._lock:
            for n in names:
                e = self._entries.get(n)
                if e is not None and e.refs > 0:
                    e.refs -= 1

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(e.resident_bytes for e in self._resident.values())

    def resident_names(self) -> list[str]:
        with self._lock:
            return sorted(self._resident)

    def ensure(self, names: Iterable[str]) -> bool:
        """Make every named adapter resident (the caller holds the model lock). False when the budget is taken
        by adapters that requests hold (retry once some finish); AdapterLoadFailed / UnknownAdapter when an
        adapter cannot be loaded at all."""
        now = time.monotonic()
        with self._lock:
            entries = [self.find(n) for n in names]
            for e in entries:
                e.last_used = now
            missing = [e for e in entries if not e.resident]
            self.stats.adapter_hit(len(entries) - len(missing))
            keep = {x.name for x in entries}
            for e in missing:
                if not self._make_room(e, keep):
                    return False
                self._load_entry(e)
                if not self._make_room(None, keep):  # the estimate was low: it does not fit after all
                    self._evict(e)
                    return False
        return True

    def _load_entry(self, e: AdapterEntry) -> None:
        self.stats.adapter_missed()
        if e.problem:
            raise AdapterLoadFailed(f"cannot load adapter {e.name!r}: {e.problem}")
        if not (e.directory / CONFIG_NAME).is_file():
            self._entries.pop(e.name, None)
            raise UnknownAdapter(f"adapter {e.name!r} is gone: {e.directory} no longer holds {CONFIG_NAME}")
        t0 = time.perf_counter()
        try:
            e.resident_bytes = int(self._load(e.name, e.directory))
        except (ConfigError, OSError, ValueError, RuntimeError) as err:
            self.stats.adapter_load_failed()
            raise AdapterLoadFailed(f"cannot load adapter {e.name!r}: {err}") from None
        e.resident = True
        self._resident[e.name] = e
        if e.file_bytes:
            self._bytes_per_file_byte = e.resident_bytes / e.file_bytes
        self.stats.adapter_loaded(time.perf_counter() - t0)

    def _over(self, extra_count: int, extra_bytes: int) -> bool:
        if self.max_loaded is not None and len(self._resident) + extra_count > self.max_loaded:
            return True
        return self.max_bytes is not None and self.resident_bytes() + extra_bytes > self.max_bytes

    def _make_room(self, new: AdapterEntry | None, keep: set[str]) -> bool:
        """Evict least-recently-used, unheld, unpinned adapters until `new` (None: nothing more) fits; its size is
        estimated from its file by the resident/file ratio of the last load until it has been loaded once."""
        estimate = 0 if new is None else new.resident_bytes or int(new.file_bytes * self._bytes_per_file_byte)
        while self._over(0 if new is None else 1, estimate):
            victims = [e for e in self._resident.values() if e.refs == 0 and not e.pinned and e.name not in keep]
            if not victims:
                return False
            self._evict(min(victims, key=lambda e: e.last_used))
            self.stats.adapter_evicted()
        return True

    def _evict(self, e: AdapterEntry) -> None:
        self._unload(e.name)
        e.resident = False
        self._resident.pop(e.name, None)

    def check_fits(self, names: Iterable[str]) -> None:
        """A request whose adapters alone exceed the budget can never run: say so at once."""
        entries = [self.find(n) for n in names]
        if self.max_loaded is not None and len(set(names)) > self.max_loaded:
            raise CapacityUnavailable(f"the request composes {len(entries)} adapters but at most {self.max_loaded} "
                                      "may be loaded at once (--max-loaded-adapters)")
        size = sum(e.resident_bytes or e.file_bytes for e in entries)
        if self.max_bytes is not None and size > self.max_bytes:
            raise CapacityUnavailable(f"the request's adapters need about {size} bytes, more than the adapter "
                                      f"memory budget of {self.max_bytes} bytes (--adapter-memory)")


def _plain(name: str) -> bool:
    try:
        check_adapter_name(name)
        return True
    except ConfigError:
        return False


def parse_size(text: str | int | None) -> int | None:
    """'512MB', '2GiB', '300000' -> bytes (None stays None): the --adapter-memory flag."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abgikmt")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise ConfigError(f"--adapter-memory {text!r}: give a size such as 512MB, 2GiB or a number of bytes")
    return int(value * units[unit])
