"""The newcomer's path, end to end, as the README and the demo lead it: the README's demo install has what the
demo's printed next step needs; `prefixtune demo` (on a tiny model and tweets in the demo corpus's shape, instead of
SmolLM2 and the real corpus) -> the serve command the demo prints, run as printed -> a completion through the
`openai` client for the trained adapter, equal to what the adapter generates offline."""

from __future__ import annotations

import csv
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

from helpers import id_tokenizer, make
from test_tutorials import free_port, wait_healthy

import prefixtune

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(prefixtune.__file__).parents[1]


def test_readme_demo_install_includes_what_the_demo_hint_needs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(l for l in readme.splitlines() if l.rstrip().endswith("prefixtune demo"))
    extras = re.search(r'pip install -e "\.\[([\w,]+)\]"', line).group(1).split(",")
    assert {"train", "serve"} <= set(extras), line  # demo needs [train]; its printed `prefixtune serve` needs [serve]


def test_demo_then_its_serve_command_then_the_openai_client(tmp_path):
    from openai import OpenAI

    import prefixtune as pt
    from prefixtune.cli.demo import TEMPLATE
    from prefixtune.loading import load_model

    # a tiny random Llama whose tokenizer has a word for every id ("w4", "w5", ...), so any generated token is text
    mdir = tmp_path / "tiny-llama"
    make("llama").save_pretrained(mdir)
    id_tokenizer().save_pretrained(mdir)
    rng = random.Random(0)
    with open(tmp_path / "tweets.csv", "w", newline="") as f:  # the demo corpus's columns: text, sentiment
        w = csv.writer(f)
        w.writerow(["text", "sentiment"])
        for _ in range(60):
            label = rng.choice(["w20", "w21"])  # the label's cue word is in the text
            w.writerow([f"w{rng.randrange(30, 60)} {'w10' if label == 'w20' else 'w11'} w{rng.randrange(30, 60)}", label])
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    demo = subprocess.run([sys.executable, "-m", "prefixtune", "demo", "--model", str(mdir), "--data", "tweets.csv",
                           "--output", "prefixtune-demo", "--max-steps", "4", "--train-examples", "40",
                           "--eval-examples", "10"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]

    # the next step as the demo prints it (the first serve line: the PyTorch engine)
    hint = next(l.strip() for l in demo.stdout.splitlines() if "prefixtune serve" in l)
    assert not hint.startswith("pip install"), hint  # this environment has [serve]: the hint is the command alone
    argv = shlex.split(hint.split("#")[0])
    name = re.search(r"requests name the adapter '([^']+)'", demo.stdout).group(1)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", *argv, "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(server, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        models = {m.id for m in client.models.list()}
        assert models == {mdir.name, name}, models  # the run, named after itself; never adapter/, best/, checkpoints
        prompt = TEMPLATE.format(text="w31 w10 w40")
        served = client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0).choices[0].text
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    assert f"adapter {name!r} <- " in err, err[-3000:]  # the start-up log says the name and where it comes from

    base, tok = load_model(str(mdir), dtype="fp32")
    model = pt.load_adapter(base, tmp_path / "prefixtune-demo" / "run" / "adapter").eval()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert served.strip() and served == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
