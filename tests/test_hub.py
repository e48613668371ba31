"""Hub push / load. The Hub is unreachable here: the happy path runs against a fake Hub patched in at the
huggingface_hub boundary (HfApi.create_repo / HfApi.upload_folder / snapshot_download); the offline paths use the
real huggingface_hub against a closed local port or HF_HUB_OFFLINE."""

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import make
from huggingface_hub import constants, errors

import prefixtune as pt
from prefixtune import hub

CLOSED = "http://127.0.0.1:9"  # nothing listens there: connection refused at once


def _response(status):
    import importlib

    httpx = importlib.import_module("httpx2") if importlib.util.find_spec("httpx2") else importlib.import_module("httpx")
    return httpx.Response(status, request=httpx.Request("POST", "https://hub.invalid/api"))


class FakeHub:
    """Repos as folders. 'me/...' is writable with token 'hf_good'; other namespaces refuse writes (403)."""

    def __init__(self, root: Path):
        self.root, self.uploads, self.created = root, [], []

    def install(self, mp):
        fake = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kw):
            if api.token != "hf_good":
                raise errors.HfHubHTTPError("401 Unauthorized: invalid token", response=_response(401))
            if not repo_id.startswith("me/"):
                raise errors.HfHubHTTPError("403 Forbidden: you cannot create repos in this namespace", response=_response(403))
            fake.created.append(repo_id)
            (fake.root / repo_id).mkdir(parents=True, exist_ok=True)

        def upload_folder(api, *, repo_id, folder_path, commit_message=None, revision=None, **kw):
            dest = fake.root / repo_id
            if not dest.is_dir():
                raise errors.RepositoryNotFoundError("404 Repository Not Found", response=_response(404))
            fake.uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir()), commit_message))
            shutil.copytree(folder_path, dest, dirs_exist_ok=True)  # one call = one commit
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="",
                                              commit_description="", oid="1" * 40)

        def snapshot_download(repo_id, *, allow_patterns=None, **kw):
            src = fake.root / repo_id
            if not src.is_dir():
                raise errors.RepositoryNotFoundError("404 Repository Not Found", response=_response(404))
            out = fake.root.parent / "cache" / repo_id.replace("/", "--")
            shutil.copytree(src, out, dirs_exist_ok=True)
            return str(out)

        mp.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        mp.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        mp.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        return self


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    (tmp_path / "hub").mkdir()
    return FakeHub(tmp_path / "hub").install(monkeypatch)


@pytest.fixture
def no_tmp_leftovers(tmp_path, monkeypatch):
    """Point tempfile at an empty folder; the test asserts it is still empty afterwards."""
    import tempfile

    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def trained():
    base = make("llama")
    torch.manual_seed(0)
    return pt.attach(base, pt.PrefixConfig(num_virtual_tokens=4, init="random", extra={"task": "classify", "data": "toy"}))


def test_push_then_load_round_trip(fake_hub, no_tmp_leftovers):
    model = trained()
    url = model.push_to_hub("me/tiny-prefix", token="hf_good")
    assert url.startswith("https://huggingface.co/me/tiny-prefix")
    assert len(fake_hub.uploads) == 1  # a single commit
    repo, files, _ = fake_hub.uploads[0]
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "prefixtune.json"]
    card = (fake_hub.root / "me/tiny-prefix/README.md").read_text()
    assert "classify" in card and "toy" in card and "trainable parameters" in card
    assert list(no_tmp_leftovers.iterdir()) == []

    loaded = pt.load_adapter(make("llama"), "me/tiny-prefix")  # not a local path: resolved on the Hub
    ids = torch.randint(3, 128, (2, 6))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_push_without_credentials(fake_hub, monkeypatch, no_tmp_leftovers):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(pt.HubError, match="no Hugging Face credentials.*hf auth login"):
        trained().push_to_hub("me/x")
    assert fake_hub.uploads == [] and fake_hub.created == []
    assert list(no_tmp_leftovers.iterdir()) == []


def test_push_with_a_rejected_token_or_foreign_namespace(fake_hub, no_tmp_leftovers):
    with pytest.raises(pt.HubError, match=r"refused the credentials.*HTTP 401"):
        trained().push_to_hub("me/x", token="hf_bad")
    with pytest.raises(pt.HubError, match=r"HTTP 403"):
        trained().push_to_hub("someone-else/x", token="hf_good")
    with pytest.raises(pt.HubError, match="does not exist.*create_repo=True"):
        trained().push_to_hub("me/never-created", token="hf_good", create_repo=False)
    assert fake_hub.uploads == [] and list(no_tmp_leftovers.iterdir()) == []


def test_push_offline(monkeypatch, no_tmp_leftovers):
    """Real huggingface_hub, nothing listening: a clear message, nothing left behind."""
    with pytest.raises(pt.HubError, match="cannot reach the Hugging Face Hub"):
        trained().push_to_hub("me/x", token="hf_good", endpoint=CLOSED)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(pt.HubError, match="HF_HUB_OFFLINE"):
        trained().push_to_hub("me/x", token="hf_good")
    assert list(no_tmp_leftovers.iterdir()) == []


def test_load_offline_is_clear(monkeypatch, tmp_path):
    with pytest.raises(pt.HubError, match="cannot be reached.*not in the local cache"):
        hub.resolve("me/x", endpoint=CLOSED, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(pt.HubError, match="not a local directory.*cannot be reached"):
        pt.load_adapter(make("llama"), "me/not-cached")


def test_load_missing_repo_and_non_adapter_repo(fake_hub):
    with pytest.raises(pt.HubError, match="'me/nothing-here' was not found on the Hub"):
        pt.load_adapter(make("llama"), "me/nothing-here")
    (fake_hub.root / "me/full-model").mkdir(parents=True)
    (fake_hub.root / "me/full-model/config.json").write_text("{}")
    with pytest.raises(pt.HubError, match="no adapter_config.json, so it is not an adapter repository"):
        pt.load_adapter(make("llama"), "me/full-model")


def test_bad_repo_ids_and_local_dirs(tmp_path, fake_hub):
    for bad in ("no-slash", "a/b/c", "me/..", "/abs/path", "me/x y"):
        with pytest.raises(pt.HubError, match="not a Hub repository id"):
            trained().push_to_hub(bad, token="hf_good")
    assert fake_hub.uploads == []
    # an existing local directory is never mistaken for a repo id; without a config it is a ConfigError
    local = tmp_path / "me" / "adapter"
    local.mkdir(parents=True)
    with pytest.raises(pt.ConfigError, match="no adapter_config.json"):
        pt.load_adapter(make("llama"), local)
    assert hub.looks_like_repo_id("user/repo-1.2") and not hub.looks_like_repo_id("./user/repo")
    assert issubclass(pt.HubError, ValueError) and issubclass(pt.HubError, pt.ConfigError)
