"""Training loop: learning, checkpoint/resume (in-process and after SIGKILL), metrics, curves, guards."""

import json
import subprocess
import sys

import helpers
import pytest
import torch
from helpers import WALL_CLOCK, classify_rows, instruct_rows, make_tokenizer, model_dir, untimed, write_jsonl
from safetensors.torch import load_file

from prefixtune import attach
from prefixtune.config import PrefixConfig
from prefixtune.training.checkpoints import TrainingError, latest_checkpoint
from prefixtune.training.config import RecipeError, TrainConfig
from prefixtune.training.ema import ParamEMA
from prefixtune.training.loop import fit, train
from prefixtune.training.optim import param_groups


def _model(kind="llama"):
    m = helpers.make(kind)
    return m


def _cfg(tmp_path, out="out", **kw):
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    base = dict(model="tiny", train=str(data), task="classify", output=str(tmp_path / out), max_steps=8, batch_size=4,
                lr=3e-2, num_virtual_tokens=4, eval_every=4, save_every=3, progress=False)
    return TrainConfig.from_dict({**base, **kw})  # flat prefix keys (num_virtual_tokens, ...) go to cfg.prefix


def _table(path):
    return load_file(path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_train_writes_artifacts_and_learns(tmp_path, kind):
    cfg = _cfg(tmp_path, max_steps=25, batch_size=8, eval_every=25)
    res = train(cfg, model=_model(kind), tokenizer=make_tokenizer())
    out = tmp_path / "out"
    for name in ("adapter/adapter_model.safetensors", "best/adapter_model.safetensors", "metrics.jsonl",
                 "loss_curve.png", "accuracy_curve.png", "eval.json", "predictions.jsonl", "task.json", "run.json"):
        assert (out / name).is_file(), name
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 25 and all(r["tokens_per_s"] > 0 for r in recs if "loss" in r)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns something
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == len((out / "predictions.jsonl").read_text().splitlines()) and 0 <= ev["accuracy"] <= 1
    assert json.loads((out / "task.json").read_text())["label_words"] == ["negative", "positive"]
    assert res["steps"] == 25


def test_resume_matches_uninterrupted(tmp_path):
    kw = dict(projection=True, projection_dim=16, dropout=0.1, grad_accum=2, scheduler="cosine", ema=0.9)
    train(_cfg(tmp_path, "a", **kw), model=_model(), tokenizer=make_tokenizer())
    stopped = train(_cfg(tmp_path, "b", **kw), model=_model(), tokenizer=make_tokenizer(), stop_after=5)
    assert stopped == {"stopped_at": 5}
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-000003"  # steps 4-5 are redone
    with pytest.raises(TrainingError, match="--resume"):
        train(_cfg(tmp_path, "b", **kw), model=_model(), tokenizer=make_tokenizer())
    train(_cfg(tmp_path, "b", resume=True, **kw), model=_model(), tokenizer=make_tokenizer())
    torch.testing.assert_close(_table(tmp_path / "a"), _table(tmp_path / "b"), rtol=0, atol=1e-6)
    recs = {run: [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in "ab"}
    assert all(r[k] >= 0 for rs in recs.values() for r in rs for k in WALL_CLOCK if k in r)
    assert untimed(recs["a"]) == untimed(recs["b"])  # every number but the wall-clock ones


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """A real crash: the CLI run is SIGKILLed from outside as soon as a checkpoint exists; --resume finishes it with
    the same adapter as an uninterrupted run."""
    import time

    mdir = model_dir(tmp_path)
    data = write_jsonl(tmp_path / "cls.jsonl", classify_rows())
    args = [sys.executable, "-m", "prefixtune", "train", "--model", str(mdir), "--train", str(data), "--task", "classify",
            "--max-steps", "300", "--batch-size", "4", "--num-virtual-tokens", "4", "--save-every", "3", "--no-progress",
            "--eval-every", "1000"]
    p = subprocess.Popen(args + ["--output", str(tmp_path / "b")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while latest_checkpoint(tmp_path / "b") is None and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.kill()
    assert p.wait() == -9, "the run ended before a checkpoint could be interrupted: " + p.stderr.read().decode()[-2000:]
    assert not (tmp_path / "b" / "adapter").exists() and latest_checkpoint(tmp_path / "b") is not None
    q = subprocess.run(args + ["--output", str(tmp_path / "b"), "--resume"], capture_output=True, text=True)
    assert q.returncode == 0, q.stderr[-2000:]
    q = subprocess.run(args + ["--output", str(tmp_path / "a")], capture_output=True, text=True)
    assert q.returncode == 0, q.stderr[-2000:]
    torch.testing.assert_close(_table(tmp_path / "a"), _table(tmp_path / "b"), rtol=0, atol=1e-6)


def test_instruct_task_masks_prompt_and_trains(tmp_path):
    data = write_jsonl(tmp_path / "ins.jsonl", instruct_rows())
    cfg = TrainConfig(model="tiny", train=str(data), task="instruct", output=str(tmp_path / "o"), max_steps=6,
                      batch_size=4, prefix=PrefixConfig(num_virtual_tokens=3, projection=True, projection_dim=8),
                      progress=False)
    res = train(cfg, model=_model("bloom"), tokenizer=make_tokenizer())
    ev = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert ev["task"] == "instruct" and ev["perplexity"] > 1 and res["best"] == pytest.approx(-ev["loss"], rel=1e-5)


def test_early_stopping(tmp_path):
    # lr tiny: no eval improves on the first one, so patience 2 stops after the third eval
    res = train(_cfg(tmp_path, max_steps=40, eval_every=2, patience=2, lr=1e-9), model=_model(), tokenizer=make_tokenizer())
    assert res["stopped_early"] and res["steps"] == 6


def test_nan_loss_stops_with_message(tmp_path, monkeypatch):
    import prefixtune.training.evaluate as E

    real, calls = E.token_nll, []

    def flaky(model, batch):  # the 5th training micro-batch produces nan
        nll, n = real(model, batch)
        calls.append(model.training)
        return (nll * float("nan"), n) if model.training and sum(calls) == 5 else (nll, n)

    monkeypatch.setattr(E, "token_nll", flaky)
    model = _model()
    attention = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    for m in attention:
        m.attention_dropout = 0.2
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*checkpoint-000003"):
        train(_cfg(tmp_path, max_steps=30, eval_every=100, base_dropout=False), model=model, tokenizer=make_tokenizer())
    assert attention and all(m.attention_dropout == 0.2 for m in attention)  # the stop gave the model its dropout back
    assert latest_checkpoint(tmp_path / "out").name == "checkpoint-000003"
    assert not (tmp_path / "out" / "adapter").exists()


def test_output_dir_guards(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(TrainingError, match="holds no prefixtune run"):
        train(_cfg(tmp_path, "junk", overwrite=True), model=_model(), tokenizer=make_tokenizer())
    assert (tmp_path / "junk" / "x.txt").exists()
    train(_cfg(tmp_path, max_steps=2), model=_model(), tokenizer=make_tokenizer())
    with pytest.raises(TrainingError, match="different run.*lr"):
        train(_cfg(tmp_path, max_steps=2, lr=0.5, resume=True), model=_model(), tokenizer=make_tokenizer())
    train(_cfg(tmp_path, max_steps=2, lr=0.5, overwrite=True), model=_model(), tokenizer=make_tokenizer())


def test_config_validation():
    with pytest.raises(RecipeError, match="either max_steps or epochs"):
        TrainConfig(model="m", train="t", task="lm", output="o", max_steps=3, epochs=1).validate()
    with pytest.raises(RecipeError, match="unknown task 'summarize'"):
        TrainConfig(model="m", train="t", task="summarize", output="o").validate()
    with pytest.raises(RecipeError, match="projection_lr must be a positive number"):
        TrainConfig(model="m", train="t", task="lm", output="o", projection_lr=-1).validate()
    with pytest.raises(RecipeError, match=r"ema must be a decay in \[0, 1\)"):
        TrainConfig(model="m", train="t", task="lm", output="o", ema=1.0).validate()


def test_param_ema_follows_its_recurrence_and_applied_restores_the_live_weights():
    w = torch.nn.Parameter(torch.zeros(3))
    ema = ParamEMA([w], decay=0.9)
    expect = torch.zeros(3)
    for n in range(1, 40):
        with torch.no_grad():
            w.fill_(float(n))
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # the short memory at the start, then the decay
        expect = d * expect + (1 - d) * w.detach()
    torch.testing.assert_close(ema.shadow[0], expect)
    with ema.applied():
        torch.testing.assert_close(w.detach(), expect)
    assert torch.equal(w.detach(), torch.full((3,), 39.0))
    state = ema.state_dict()
    other = ParamEMA([torch.nn.Parameter(torch.zeros(3))], decay=0.9)
    other.load_state_dict(state)
    assert other.updates == 39 and torch.equal(other.shadow[0], ema.shadow[0])
    off = ParamEMA([w], decay=0.0)  # off: no copy, and nothing it does touches the weights
    off.update()
    with off.applied():
        assert torch.equal(w.detach(), torch.full((3,), 39.0))
    off.copy_to_params()
    assert off.shadow == [] and torch.equal(w.detach(), torch.full((3,), 39.0))


def test_ema_run_saves_the_average_of_the_steps(tmp_path, monkeypatch):
    """The adapter of an --ema run is the moving average of the prefixes the same run had after each step (replayed
    here with ema off, stopping after 1, 2, ... steps: the average does not change training), and the model handed
    back holds it."""
    import prefixtune.training.loop as loop

    steps, decay = 5, 0.6
    weight = lambda pm: pm.prefixes["default"].embedding.weight.detach().clone()  # noqa: E731
    live = [weight(fit(_cfg(tmp_path, f"live{k}", max_steps=steps, ema=0.0), model=_model(),
                       tokenizer=make_tokenizer(), stop_after=k)[1]) for k in range(1, steps + 1)]
    starts = []

    class Recording(ParamEMA):  # the average starts at the initial prefix: record it
        def __init__(self, params, decay):
            super().__init__(params, decay)
            starts.append(self.shadow[0].clone())

    monkeypatch.setattr(loop, "ParamEMA", Recording)
    _, pm = fit(_cfg(tmp_path, "avg", max_steps=steps, ema=decay), model=_model(), tokenizer=make_tokenizer())
    expect = starts[0]
    for n, w in enumerate(live, 1):
        d = min(decay, (1 + n) / (10 + n))
        expect = d * expect + (1 - d) * w
    torch.testing.assert_close(weight(pm), expect, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expect, live[-1], atol=1e-4)  # the average is not the last step's prefix
    torch.testing.assert_close(_table(tmp_path / "avg"), pm.prefixes["default"].folded())  # and it is what was saved


def test_task_defaults_fill_only_what_is_unset():
    from prefixtune.training.config import TASK_DEFAULTS, resolve

    for task, defaults in TASK_DEFAULTS.items():
        task, _, kind = task.partition(":")
        cfg = resolve(TrainConfig(model="m", train="t", task=task, output="o").validate(), kind or None).config
        assert cfg.lr == defaults["lr"]
        assert all(getattr(cfg.prefix, k) == v for k, v in defaults.get("prefix", {}).items())
        assert cfg.base_dropout is defaults.get("base_dropout", True)
    assert resolve(TrainConfig(model="m", train="t", task="classify", output="o", lr=0.123).validate()).config.lr == 0.123
    # classify: generative models and encoder classifiers differ; resolution with the model's kind fills only
    # what was not given, and says what it filled
    over = TrainConfig.from_sources(None, {"model": "m", "train": "t", "task": "classify", "output": "o",
                                           "num_virtual_tokens": 7}).validate()
    causal = resolve(over, "causal")
    c = causal.config
    assert (c.lr, c.prefix.num_virtual_tokens, c.prefix.init) == (TASK_DEFAULTS["classify"]["lr"], 7, "examples")
    assert causal.defaults == {"lr": TASK_DEFAULTS["classify"]["lr"], "base_dropout": True, "epochs": 1,
                               "prefix.init": "examples"}  # num_virtual_tokens was given
    assert "lr 0.01" in causal.describe("causal") and "num_virtual_tokens" not in causal.describe("causal")
    enc = resolve(over, "encoder").config
    assert (enc.lr, enc.prefix.num_virtual_tokens, enc.prefix.init) == (TASK_DEFAULTS["classify:encoder"]["lr"], 7, "vocab")
    assert over.lr is None and over.prefix == {"num_virtual_tokens": 7}  # resolve fills a copy
    assert resolve(TrainConfig(model="m", train="t", task="classify", output="o", lr=0.5).validate(), "encoder").config.lr == 0.5
    # base_dropout: off for encoder classifiers unless asked for; a run's identity names it only when off
    assert enc.base_dropout is False and enc.run_identity()["base_dropout"] is False
    kept = resolve(TrainConfig(model="m", train="t", task="classify", output="o", base_dropout=True).validate(), "encoder").config
    assert kept.base_dropout is True and "base_dropout" not in kept.run_identity()
    with pytest.raises(RecipeError, match="base_dropout must be true or false"):
        TrainConfig(model="m", train="t", task="classify", output="o", base_dropout="no").validate()
    # a PrefixConfig passed whole is the caller's: the task's prefix defaults do not touch it
    mine = resolve(TrainConfig(model="m", train="t", task="classify", output="o", prefix=PrefixConfig()).validate(), "causal")
    assert mine.config.prefix == PrefixConfig() and not any(k.startswith("prefix.") for k in mine.defaults)


@pytest.mark.parametrize("kind", ["gpt2", "t5", "bart", "bert"])
def test_base_dropout_off_makes_train_mode_deterministic_and_restores(kind):
    """Every dropout of the model is zeroed (nn.Dropout modules and the float rates T5/BART attention keep):
    train-mode outputs equal eval-mode ones; restore() brings the noise and the rates back."""
    import helpers

    from prefixtune.training.loop import base_dropout_off

    model = helpers.make(kind)
    for m in model.modules():  # raise every rate, float or module, so each path is exercised
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.3)
    batch = helpers.batch(kind)
    with torch.no_grad():
        want = model.eval()(**batch).logits
        model.train()
        assert not torch.allclose(model(**batch).logits, want)
        restore = base_dropout_off(model)
        torch.testing.assert_close(model(**batch).logits, want)
        restore()
        assert not torch.allclose(model(**batch).logits, want)
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_automatic_eval_split_is_capped_and_says_so(tmp_path, capsys):
    """Without --eval the held-out rows come from --train; their evaluation is capped by default (and logged)."""
    from helpers import classify_rows, model_dir, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", classify_rows(200))
    base = dict(model=str(model_dir(tmp_path)), train=str(data), task="classify", max_steps=1, batch_size=4,
                eval_fraction=0.5, progress=False, save_every=None)
    capped = train(TrainConfig(**base, output=str(tmp_path / "a"), max_auto_eval_examples=20).validate())
    assert "evaluating 20 of the 100 evaluation rows taken from --train" in capsys.readouterr().out
    full = train(TrainConfig(**base, output=str(tmp_path / "b"), max_auto_eval_examples=0).validate())
    n = lambda run: sum(1 for _ in open(tmp_path / run / "predictions.jsonl"))  # noqa: E731
    assert (n("a"), n("b")) == (20, 100), (capped.get("report"), full.get("report"))


def test_report_to_tensorboard_logs_metrics_and_config(tmp_path):
    """--report-to tensorboard: the event files hold the losses metrics.jsonl holds, and the run config."""
    pytest.importorskip("tensorboard")
    from helpers import classify_rows, model_dir, write_jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "d.jsonl", classify_rows(24))
    cfg = TrainConfig(model=str(model_dir(tmp_path)), train=str(data), task="classify", output=str(tmp_path / "run"),
                      max_steps=3, batch_size=4, progress=False, save_every=None, report_to="tensorboard").validate()
    train(cfg)
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    runs = [p.parent for p in (tmp_path / "run" / "prefixtune").rglob("events.out.tfevents.*")]
    scalars = {}
    for d in runs:
        acc = EventAccumulator(str(d)).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    want = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [s for s, _ in scalars["loss"]] == [s for s, _ in want]
    assert all(abs(v - w) < 1e-5 for (_, v), (_, w) in zip(scalars["loss"], want))
    assert "eval_loss" in scalars  # the eval records too
    raw = b"".join(p.read_bytes() for p in (tmp_path / "run" / "prefixtune").rglob("events.out.tfevents.*"))
    assert b"prefix.num_virtual_tokens" in raw and b"report_to" in raw  # the run config, as hparams


def test_report_to_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from prefixtune.training.reporting import tracker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    msg = r"--report-to wandb needs the \[wandb\] extra \(missing wandb\): pip install 'prefixtune\[wandb\]'"
    with pytest.raises(Exception, match=msg):
        tracker("wandb")


def test_param_groups_give_the_projection_mlp_its_own_learning_rate():
    model = attach(helpers.make("llama"), PrefixConfig(num_virtual_tokens=4, projection=True, projection_dim=16))
    enc = model.prefixes["default"]
    groups = param_groups(model, 1e-2, 1e-5)
    assert [g["lr"] for g in groups] == [1e-2, 1e-5]
    assert [id(p) for p in groups[0]["params"]] == [id(enc.embedding.weight)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in enc.transform.parameters()}
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    ids = torch.randint(3, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in enc.named_parameters()}
    assert moved["embedding.weight"] == pytest.approx(1e-2, rel=1e-3)  # Adam's first step is lr * sign(grad)
    assert moved["transform.0.weight"] == pytest.approx(1e-5, rel=1e-3)
    assert len(param_groups(attach(helpers.make("llama"), PrefixConfig(num_virtual_tokens=4)), 1e-2, 1e-5)) == 1


def test_head_lr_moves_an_encoder_classifiers_head_at_its_own_rate():
    model = attach(helpers.make("bert"), PrefixConfig(num_virtual_tokens=4))
    assert len(param_groups(model, 1e-2)) == 1  # no head_lr: one group, as older checkpoints' optimizer state holds
    groups = param_groups(model, 1e-2, head_lr=1e-4)
    head = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("prefixes.")]
    assert head and all("classifier" in n for n in head)
    assert [g["lr"] for g in groups] == [1e-2, 1e-4] and len(groups[1]["params"]) == len(head)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    model(input_ids=torch.randint(3, 100, (2, 6)), labels=torch.tensor([0, 2])).loss.backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    assert moved[head[0]] == pytest.approx(1e-4, rel=1e-3)
    assert moved["prefixes.default.embedding.weight"] == pytest.approx(1e-2, rel=1e-2)  # tiny grads: Adam eps


def test_task_defaults_are_resolved_once_logged_and_recorded(tmp_path, capsys):
    """What the task's defaults filled in is said before training and kept in run.json; given values are not."""
    from prefixtune.training.config import TASK_DEFAULTS

    cfg = _cfg(tmp_path, max_steps=2, lr=None, save_every=None)
    train(cfg, model=_model(), tokenizer=make_tokenizer())
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    lr = TASK_DEFAULTS["classify"]["lr"]
    assert run["defaults"] == {"lr": lr, "base_dropout": True, "prefix.init": "examples"}  # num_virtual_tokens was given
    assert run["config"]["lr"] == lr and run["config"]["prefix"]["num_virtual_tokens"] == 4
    assert f"defaults for classify on a causal model: lr {lr}, base_dropout True, init examples" in capsys.readouterr().out
    assert cfg.lr is None and cfg.prefix == {"num_virtual_tokens": 4}  # the caller's config is left as given
