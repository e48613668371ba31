"""pyproject's promises: `import prefixtune` and the core API need only torch, transformers and safetensors;
the commands that train say which extra is missing instead of failing deep in an import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import prefixtune

TESTS, SRC = Path(__file__).parent, Path(prefixtune.__file__).parents[1]
TRAIN_EXTRA = ["accelerate", "datasets", "pandas", "matplotlib"]  # pyyaml / tqdm: transformers needs them itself


def _run_without_train_extra(code: str, tmp_path) -> subprocess.CompletedProcess:
    blocked = "".join(f"sys.modules[{m!r}] = None\n" for m in TRAIN_EXTRA)  # an import of these now fails
    prelude = f"import sys\nsys.path[:0] = [{str(SRC)!r}, {str(TESTS)!r}]\n{blocked}"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)


def test_core_api_works_without_the_train_extra(tmp_path):
    r = _run_without_train_extra(
        """
import torch, prefixtune as pt, helpers
model = pt.attach(helpers.make("llama"), pt.PrefixConfig(num_virtual_tokens=3)).eval()
kw = helpers.batch("llama")
out = model(**kw).logits
model.save_adapter("a")
again = pt.load_adapter(helpers.make("llama"), "a").eval()
assert torch.allclose(again(**kw).logits, out, atol=1e-5)
again.generate(input_ids=kw["input_ids"], max_new_tokens=2, do_sample=False, pad_token_id=0)
assert not {"accelerate", "datasets", "pandas", "matplotlib"} & {m for m, v in sys.modules.items() if v is not None}
print("ok")
""", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


def test_training_commands_name_the_missing_extra(tmp_path):
    r = _run_without_train_extra(
        "from prefixtune.cli import main\nmain(['train', '--model', 'm', '--train', 'd.jsonl', '--task', 'classify'])\n",
        tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "pip install 'prefixtune[train]'" in r.stderr and "datasets" in r.stderr
    assert "Traceback" not in r.stderr
