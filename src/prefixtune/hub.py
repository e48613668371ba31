"""Adapters on the Hugging Face Hub, through `huggingface_hub` (create_repo + upload_folder / snapshot_download).

    model.push_to_hub("user/my-prefix")                    # one commit: config, weights, prefixtune.json, model card
    model = prefixtune.load_adapter(base, "user/my-prefix")   # downloads (or reuses the local cache)

Failures become `HubError` (a ValueError) with one message saying what went wrong and what to do: no
credentials, offline / Hub unreachable, repository not found or not allowed, not an adapter repository. A push
writes the adapter into a temporary directory first and uploads it as a single commit, so a failed push leaves
neither a partial commit on the Hub nor stray files locally; a failed download leaves nothing but the Hub cache.
"""

from __future__ import annotations

import re
from pathlib import Path

from .adapter_io import CONFIG_NAME, EXTRA_NAME, PROJECTION_NAME, WEIGHTS_NAME, scratch_dir
from .config import ConfigError

ADAPTER_FILES = [CONFIG_NAME, WEIGHTS_NAME, EXTRA_NAME, PROJECTION_NAME, "README.md", "task.json"]
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"^{_PART}/{_PART}$")
LOGIN_HINT = "run `hf auth login`, set the HF_TOKEN environment variable, or pass token=..."


class HubError(ConfigError):
    """A Hub push or download that cannot go ahead, with a message saying why and what to do.

    A ValueError (through ConfigError), so the command line reports it as one line like other bad input."""


def looks_like_repo_id(s) -> bool:
    """'user/name' (what the Hub accepts), as opposed to a local path such as 'runs/adapter' that exists."""
    s = str(s)
    return bool(_REPO_RE.match(s)) and ".." not in s and "--" not in s


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not looks_like_repo_id(repo_id):
        raise HubError(
            f"{repo_id!r} is not a Hub repository id: use 'user-or-org/name' (letters, digits, '-', '_', '.'; "
            "no '..' or '--', at most 96 characters per part)"
        )
    return repo_id


def _hub():
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - transformers depends on it
        raise HubError("the Hub needs huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def _is_network_error(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    mod = type(e).__module__.split(".")[0]
    return mod in ("httpx", "httpx2", "httpcore", "requests", "urllib3") and "Status" not in type(e).__name__


def _explain(e: BaseException, what: str, repo_id: str, pushing: bool) -> HubError:
    """Map a huggingface_hub / network exception onto one actionable HubError."""
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return HubError(f"{what}: {repo_id!r} is gated: request access on its Hub page, then {LOGIN_HINT}")
    if isinstance(e, errors.RepositoryNotFoundError):
        if pushing:
            return HubError(f"{what}: repository {repo_id!r} does not exist (or your token cannot see it); "
                            "create it first or call push_to_hub(..., create_repo=True)")
        return HubError(f"{what}: repository {repo_id!r} was not found on the Hub. Check the id for typos; "
                        f"if it is private or gated, {LOGIN_HINT}")
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(f"{what}: repository {repo_id!r} has no such revision (branch, tag or commit)")
    if isinstance(e, errors.LocalEntryNotFoundError) or isinstance(e, getattr(errors, "OfflineModeIsEnabled", ())):
        return HubError(
            f"{what}: the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1) and {repo_id!r} is not in the local "
            "cache. Download it on a connected machine (it is cached under ~/.cache/huggingface/hub) or pass a "
            "local adapter directory"
        )
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return HubError(f"{what}: the Hub refused the credentials for {repo_id!r} (HTTP {status}): the token "
                            f"is invalid or has no write access to that namespace; {LOGIN_HINT}")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return HubError(f"{what}: the Hub answered an error for {repo_id!r}: {first}")
    if _is_network_error(e):
        return HubError(f"{what}: cannot reach the Hugging Face Hub ({type(e).__name__}: {e}); check the network "
                        "connection or proxy, or work offline with a local adapter directory")
    return HubError(f"{what}: {type(e).__name__}: {e}")


def resolve(repo_id: str, revision: str | None = None, token=None, cache_dir=None, endpoint: str | None = None,
            local_files_only: bool = False) -> Path:
    """Download an adapter repository (only the adapter files) and return its local snapshot directory."""
    check_repo_id(repo_id)
    hf = _hub()
    what = f"{repo_id!r} is not a local directory and cannot be loaded from the Hub"
    try:
        path = hf.snapshot_download(
            repo_id, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
            allow_patterns=ADAPTER_FILES, local_files_only=local_files_only, library_name="prefixtune",
        )
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise _explain(e, what, repo_id, pushing=False) from None
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise HubError(f"{what}: the repository has no {CONFIG_NAME}, so it is not an adapter repository "
                       f"(expected {CONFIG_NAME} + {WEIGHTS_NAME}); is it a full model rather than an adapter?")
    return path


def local_adapter_dir(directory: str | Path) -> str | Path:
    """`directory` if it exists; a 'user/repo' id that does not exist locally: its downloaded (or cached) snapshot."""
    if not Path(directory).exists() and looks_like_repo_id(directory):
        return resolve(str(directory))
    return directory


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, revision: str | None = None, adapter_name: str | None = None,
                create_repo: bool = True, keep_projection: bool = False, endpoint: str | None = None,
                extra_files: dict | None = None) -> str:
    """Upload one adapter of `model` (default: the active one) to `repo_id` as a single commit; returns its URL.

    extra_files: {name_in_repo: local path} uploaded alongside (e.g. task.json).
    """
    check_repo_id(repo_id)
    hf = _hub()
    what = f"cannot push adapter to {repo_id!r}"
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise HubError(f"{what}: HF_HUB_OFFLINE=1 is set; unset it to upload")
    token = token or hf.get_token()
    if not token:
        raise HubError(f"{what}: no Hugging Face credentials found; {LOGIN_HINT}")
    with scratch_dir(prefix="prefixtune-push-") as tmp:
        folder = model.save_adapter(tmp / "adapter", name=adapter_name, keep_projection=keep_projection)
        for name, src in (extra_files or {}).items():
            (folder / name).write_bytes(Path(src).read_bytes())
        api = hf.HfApi(endpoint=endpoint, token=token)
        try:
            if create_repo:
                api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), revision=revision,
                commit_message=commit_message or "Upload prefix-tuning adapter (prefixtune)",
            )
        except HubError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _explain(e, what, repo_id, pushing=True) from None
    return str(getattr(info, "commit_url", None) or getattr(info, "repo_url", None) or f"https://huggingface.co/{repo_id}")
