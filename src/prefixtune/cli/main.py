"""`prefixtune` command line: train, eval, generate, demo (+ info/serve, implemented in their own modules).

Bad input ends with exit status 2 and one line on stderr naming the field and the fix; a stack trace means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2


def _known_errors() -> tuple[type, ...]:
    from .assets import AssetError
    from ..config import ConfigError
    from ..training.data import DataError

    return ConfigError, DataError, AssetError


# ----------------------------------------------------------------------------- train

TRAIN_FLAGS = {  # flag -> (TrainConfig field, type); bool flags are store_const True
    "--model": str, "--train": str, "--eval": str, "--task": str, "--output": str,
    "--text-column": str, "--label-column": str, "--prompt-template": str, "--data-config": str,
    "--num-virtual-tokens": int, "--projection-dim": int, "--init": str,
    "--max-steps": int, "--epochs": float, "--batch-size": int, "--grad-accum": int, "--lr": float, "--projection-lr": float,
    "--dropout": float, "--seed": int,
    "--max-length": int, "--on-truncate": str, "--precision": str, "--scheduler": str, "--warmup-ratio": float,
    "--weight-decay": float, "--eval-every": int, "--save-every": int, "--patience": int, "--eval-method": str,
    "--eval-batch-size": int, "--max-train-examples": int, "--max-eval-examples": int, "--eval-fraction": float,
}
TRAIN_BOOLS = ("--projection", "--resume", "--overwrite", "--gradient-checkpointing")


def _add_train(sub):
    p = sub.add_parser("train", help="train a prefix", description="Train a prefix. Flags override --config recipe values.")
    p.add_argument("--config", help="YAML recipe (keys = the flag names with _ instead of -)")
    for flag, typ in TRAIN_FLAGS.items():
        p.add_argument(flag, type=typ, default=None)
    for flag in TRAIN_BOOLS:
        p.add_argument(flag, action="store_const", const=True, default=None)
    p.add_argument("--label-words", default=None, help="comma-separated label set, e.g. negative,neutral,positive")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None)
    p.add_argument("--no-layer-scale", dest="layer_scale", action="store_const", const=False, default=None,
                   help="train the prefix table in plain key/value units (peft's parameterisation)")
    p.set_defaults(fn=cmd_train)


def cmd_train(args) -> int:
    from ..training.config import TrainConfig
    from ..training.loop import train

    over = {f.lstrip("-").replace("-", "_"): getattr(args, f.lstrip("-").replace("-", "_")) for f in (*TRAIN_FLAGS, *TRAIN_BOOLS)}
    over["progress"] = args.progress
    over["layer_scale"] = args.layer_scale
    if args.label_words:
        over["label_words"] = [w.strip() for w in args.label_words.split(",") if w.strip()]
    cfg = TrainConfig.from_sources(args.config, over)
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("model", "tokenizer")}, default=str))
    return 0


# ----------------------------------------------------------------------------- eval

def read_task_info(adapter: str | None) -> dict:
    """task.json saved next to (or inside) the adapter by `train`; {} if there is none (e.g. a peft adapter)."""
    if not adapter:
        return {}
    for p in (Path(adapter) / "task.json", Path(adapter).parent / "task.json"):
        if p.is_file():
            return json.loads(p.read_text())
    return {}


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate an adapter on a dataset")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", help="adapter directory (omit for the bare base model)")
    p.add_argument("--data", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--method", default="rank", help="classify: rank (label log-likelihood) or generate")
    p.add_argument("--output", help="where eval.json / predictions.jsonl go (default: <adapter>/eval or ./eval)")
    p.add_argument("--text-column"), p.add_argument("--label-column"), p.add_argument("--prompt-template")
    p.add_argument("--label-words", help="comma-separated; default: from the adapter's task.json, else the data")
    p.add_argument("--max-length", type=int), p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-examples", type=int)
    p.set_defaults(fn=cmd_eval)


def cmd_eval(args) -> int:
    from ..training import data as D
    from ..training import evaluate as E
    from ..loading import load_model
    from ..model import load_adapter
    from ..training.config import TASKS, RecipeError

    if args.task not in TASKS:
        raise RecipeError(f"unknown task {args.task!r}: use --task one of {', '.join(TASKS)}")
    if args.method not in ("rank", "generate"):
        raise RecipeError(f"unknown --method {args.method!r}: use rank or generate")
    info = read_task_info(args.adapter)
    if info.get("task") not in (None, args.task):
        print(f"note: the adapter was trained for task {info['task']!r}, evaluating as {args.task!r}", file=sys.stderr)
    ds = D.load_records(args.data)
    if isinstance(ds, dict):  # a DatasetDict: evaluate its eval split
        ds = ds[next((s for s in (*D.EVAL_SPLITS, "train") if s in ds), next(iter(ds)))]
    if len(ds) == 0:
        raise D.DataError(f"--data {args.data} is empty; nothing to evaluate")
    if args.max_examples:
        ds = ds.select(range(min(args.max_examples, len(ds))))
    max_length = args.max_length or info.get("max_length") or 256
    base, tok = load_model(args.model)
    model = load_adapter(base, args.adapter) if args.adapter else base
    is_ed = bool(getattr(base.config, "is_encoder_decoder", False))
    words = [w.strip() for w in args.label_words.split(",")] if args.label_words else info.get("label_words")
    kw = dict(is_encoder_decoder=is_ed, text_column=args.text_column or info.get("text_column"),
              label_column=args.label_column or info.get("label_column"),
              prompt_template=args.prompt_template or info.get("prompt_template"), max_length=max_length, on_truncate="warn")
    tokd, tinfo = D.tokenize_dataset(ds, tok, args.task, label_words=words, **kw)
    if args.task == "classify":
        task_info = {k: tinfo.get(k) for k in ("label_words", "text_column", "label_column", "prompt_template")}
        result, preds = E.evaluate_classify(model, tok, ds, task_info, method=args.method, batch_size=args.batch_size,
                                            max_length=max_length)
        result["loss"] = E.evaluate_loss(model, tok, tokd, batch_size=args.batch_size)["loss"]
    else:
        result, preds = {"task": args.task, **E.evaluate_loss(model, tok, tokd, batch_size=args.batch_size)}, None
    out = Path(args.output or (Path(args.adapter) / "eval" if args.adapter else "eval"))
    E.write_results(out, result, preds)
    print(E.format_report(result))
    print(f"wrote {out / 'eval.json'}" + (f" and {out / 'predictions.jsonl'}" if preds is not None else ""))
    return 0


# ----------------------------------------------------------------------------- generate

def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text with (or without) an adapter")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--raw", action="store_true", help="do not wrap prompts in the adapter's training template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("torch", "llamacpp"), default="torch",
                   help="llamacpp: run a .gguf --model on llama.cpp (pip install \"prefixtune[llamacpp]\")")
    p.set_defaults(fn=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    from ..training import data as D
    from ..loading import load_model
    from ..model import load_adapter

    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise D.DataError(f"--prompts {path}: file not found")
        prompts = [l for l in path.read_text().splitlines() if l.strip()]
        if not prompts:
            raise D.DataError(f"--prompts {path} has no non-empty lines")
    else:
        prompts = [args.prompt]
    info = {} if args.raw else read_task_info(args.adapter)
    template = info.get("prompt_template")
    if template and info.get("task") in ("classify", "instruct"):
        field = "text" if info["task"] == "classify" else "instruction"
        prompts = [template.replace("{" + field + "}", p).replace("{input}", "") for p in prompts]
    if args.backend == "llamacpp":
        from ..serving.llamacpp_engine import cli_generate

        return cli_generate(args, prompts)
    torch.manual_seed(args.seed)
    base, tok = load_model(args.model)
    model = load_adapter(base, args.adapter) if args.adapter else base
    seq2seq = bool(getattr(base.config, "is_encoder_decoder", False))
    ids, _ = D.encode_pair(tok, prompts, [], seq2seq)
    collate = D.PadCollator(tok, padding_side="right" if seq2seq else "left", is_encoder_decoder=seq2seq)
    kw = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, pad_token_id=collate.pad_id)
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:
        kw.update(do_sample=False)
    for s in range(0, len(ids), 8):
        batch = collate([{"input_ids": x} for x in ids[s : s + 8]])
        out = model.generate(**{k: v.to(base.device) for k, v in batch.items()}, **kw)
        out = out if seq2seq else out[:, batch["input_ids"].shape[1]:]
        for p, text in zip(prompts[s : s + 8], tok.batch_decode(out, skip_special_tokens=True)):
            print(f"### {p}\n{text.strip()}\n") if len(prompts) > 1 else print(text.strip())
    return 0


# ----------------------------------------------------------------------------- demo, hooks, main

def _add_demo(sub):
    p = sub.add_parser("demo", help="train a tweet-sentiment prefix on SmolLM2-135M (~10 min on 2 CPU cores)")
    p.add_argument("--model", help="model dir / Hub id / .gguf (default: SmolLM2-135M-Instruct, fetched once)")
    p.add_argument("--data", help="CSV/JSONL with text + sentiment columns (default: a tweet sentiment corpus)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--output", default="prefixtune-demo")
    p.add_argument("--train-examples", type=int)
    p.add_argument("--eval-examples", type=int)
    p.set_defaults(fn=lambda a: importlib.import_module("prefixtune.cli.demo").run(a))


def _add_hook(sub, name: str, help: str):
    """Subcommands implemented elsewhere (HOOKS): their main(argv) gets the remaining arguments."""
    p = sub.add_parser(name, help=help, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=lambda a: importlib.import_module(HOOKS[name]).main(a.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixtune", description="Prefix tuning for Hugging Face transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_demo(sub)
    _add_hook(sub, "info", "describe a model or adapter")
    _add_hook(sub, "serve", "serve adapters over HTTP")
    return parser


def _quiet_libraries() -> None:
    # Our own tqdm bar and messages are the output; the libraries' per-file bars are noise around them.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# Subcommands whose modules parse their own flags: command -> module with main(argv).
HOOKS = {"info": "prefixtune.cli.info", "serve": "prefixtune.serving.api"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in HOOKS:  # their modules parse their own flags (argparse.REMAINDER mishandles --help)
        command, rest = argv[0], argv[1:]
        fn = lambda: importlib.import_module(HOOKS[command]).main(rest) or 0  # noqa: E731
    else:
        args = build_parser().parse_args(argv)
        command, fn = args.command, lambda: args.fn(args)  # noqa: E731
    _quiet_libraries()
    try:
        code = fn()
    except _known_errors() as e:
        msg = " ".join(str(e).split())  # one line, whatever the source formatted
        print(f"prefixtune {command}: error: {msg}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
