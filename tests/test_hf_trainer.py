"""A PrefixModel inside transformers.Trainer: trains only the prefix, checkpoints hold only the adapter, resume is
exact, save_model writes an adapter directory that loads back (ours and peft's loader)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import make
from safetensors import safe_open
from transformers import TrainingArguments

import prefixtune as pt
from prefixtune.training.hf_trainer import PrefixTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=4, t=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 128, (n, t), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=4, save_steps=2,
                logging_steps=1, report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True, save_total_limit=None)
    base.update(kw)
    return TrainingArguments(**base)


def model(seed=0, **cfg):
    base = make("llama")  # seeds torch itself
    torch.manual_seed(seed)
    cfg = {"num_virtual_tokens": 5, "projection": True, "projection_dim": 16, "init": "random", **cfg}
    return pt.attach(base, pt.PrefixConfig(**cfg))


def prefix_state(m):
    return {k: v.detach().clone() for k, v in m.prefixes["default"].state_dict().items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 4-step run with checkpoints at steps 2 and 4; shared by the tests below."""
    out = tmp_path_factory.mktemp("trainer")
    m = model()
    base_before = {k: v.clone() for k, v in m.base_model.state_dict().items()}
    prefix_before = prefix_state(m)
    trainer = PrefixTrainer(model=m, args=args(out), train_dataset=Rows())
    result = trainer.train()
    return dict(out=out, model=m, trainer=trainer, base_before=base_before, prefix_before=prefix_before, result=result)


def test_trains_only_the_prefix(run):
    m = run["model"]
    for k, v in m.base_model.state_dict().items():
        assert torch.equal(v, run["base_before"][k]), f"base weight {k} changed"
    after = prefix_state(m)
    assert any(not torch.equal(after[k], run["prefix_before"][k]) for k in after)
    losses = [h["loss"] for h in run["trainer"].state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_checkpoints_hold_only_the_adapter(run):
    m = run["model"]
    base_keys = set(m.base_model.state_dict())
    base_bytes = sum(v.numel() * v.element_size() for v in m.base_model.state_dict().values())
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    for step in (2, 4):
        ck = run["out"] / f"checkpoint-{step}"
        names = {p.name for p in ck.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "prefixtune.json", "README.md",
                "prefixtune_projection.safetensors", "optimizer.pt", "trainer_state.json"} <= names, names
        assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        assert not [n for n in names if n.startswith(".")], names  # no temp leftovers
        for f in ck.glob("*.safetensors"):
            with safe_open(f, "pt") as s:
                keys = set(s.keys())
            assert not keys & base_keys and not any(k.startswith(("model.", "lm_head")) for k in keys), (f, keys)
        total = sum(f.stat().st_size for f in ck.rglob("*") if f.is_file())
        assert total < base_bytes / 2, f"checkpoint {total} bytes vs base {base_bytes}: base weights leaked in?"
        opt = torch.load(ck / "optimizer.pt", weights_only=True)
        assert len(opt["state"]) == n_trainable  # optimizer state for the prefix only
    assert json.loads((run["out"] / "checkpoint-4" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"


def test_resume_is_exact(run, tmp_path):
    """Resuming at step 2 in a fresh process-like setup (different initial prefix) ends where the full run ended."""
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(run["out"] / "checkpoint-2", out / "checkpoint-2")
    m2 = model(seed=123)
    assert not torch.equal(prefix_state(m2)["embedding.weight"], run["prefix_before"]["embedding.weight"])
    t2 = PrefixTrainer(model=m2, args=args(out), train_dataset=Rows())
    t2.train(resume_from_checkpoint=True)
    want, got = prefix_state(run["model"]), prefix_state(m2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert t2.state.global_step == 4


def test_save_model_writes_a_loadable_adapter(run, tmp_path):
    m, trainer = run["model"], run["trainer"]
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert (out / "adapter_config.json").is_file() and (out / "README.md").is_file()
    assert not (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "trainable parameters" in card and "pt.load_adapter" in card and "PeftModel" in card
    x = Rows(n=2)[0]
    m.eval()
    with torch.no_grad():
        want = m(input_ids=x["input_ids"][None]).logits
        got = pt.load_adapter(make("llama"), out)(input_ids=x["input_ids"][None]).logits
        bare = make("llama")(input_ids=x["input_ids"][None]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bare, want, atol=1e-3)
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        via_peft = peft.PeftModel.from_pretrained(make("llama"), str(out))(input_ids=x["input_ids"][None]).logits
    torch.testing.assert_close(via_peft, want, rtol=1e-4, atol=1e-5)


def test_save_into_existing_dir_keeps_other_files(run, tmp_path):
    """save_pretrained adds adapter files to a directory (as Trainer does) instead of replacing it."""
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "checkpoint-9").mkdir()
    run["model"].save_pretrained(tmp_path, keep_projection=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "checkpoint-9").is_dir()
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "prefixtune_projection.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_resume_from_a_non_adapter_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    t = PrefixTrainer(model=model(), args=args(tmp_path), train_dataset=Rows())
    with pytest.raises(pt.ConfigError, match="not a prefixtune checkpoint"):
        t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_example_script_runs_with_tiny(tmp_path):
    """examples/seed000_t5_financial_phrasebank.py --tiny: attach, Trainer, accuracy, save, reload, generate (T5)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "seed000_t5_financial_phrasebank.py"
    spec = importlib.util.spec_from_file_location("seed000_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--tiny", "--max-steps", "6", "--output", str(tmp_path), "--max-eval", "6"])
    assert len(res["losses"]) == 6 and res["losses"][-1] < res["losses"][0]
    assert res["predictions_reloaded"] == res["predictions"] and res["accuracy_reloaded"] == res["accuracy"]
    adapter = Path(res["adapter"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["num_virtual_tokens"] == 20
    card = (adapter / "README.md").read_text()
    assert "eval_accuracy" in card and "AutoModelForSeq2SeqLM" in card and "classify" in card
    assert json.loads((tmp_path / "result.json").read_text())["accuracy"] == res["accuracy"]
