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

from ..knowledge import read_layout
from .adapter_args import add_adapter_args, read_task_info, resolve_adapter
from .backend import add_backend_arg, encode_prompts, generate_on_backend
from .distill import add_distill, add_distill_eval

EXIT_USAGE = 2


def _known_errors() -> tuple[type, ...]:
    from ..config import ConfigError
    from ..extras import missing
    from .assets import AssetError

    if missing("train"):  # info/serve run without the [train] extra; DataError lives with it
        return ConfigError, AssetError
    from ..training.data import DataError

    return ConfigError, DataError, AssetError


# Commands that train or read datasets: they need the [train] extra (extras.py).
NEEDS_TRAIN_EXTRA = ("train", "eval", "generate", "demo", "distill", "distill-eval")


# ----------------------------------------------------------------------------- train

def _add_train(sub):
    from .flags import add_config_flags

    p = sub.add_parser("train", help="train a prefix", description="Train a prefix. Flags override --config recipe "
                       "values; every flag is also a recipe key (with _ for -; prefix keys flat or under `prefix:`).")
    p.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe of TrainConfig keys (default: none, flags only)")
    add_config_flags(p)
    p.set_defaults(fn=cmd_train)


def cmd_train(args) -> int:
    from ..training.config import TrainConfig
    from ..training.loop import train
    from .flags import overrides

    cfg = TrainConfig.from_sources(args.config, overrides(args))
    summary = train(cfg)
    print(json.dumps(summary))
    return 0


# ----------------------------------------------------------------------------- eval



def _add_eval(sub):
    from ..training.config import EvalConfig
    from .flags import add_config_flags

    p = sub.add_parser("eval", help="evaluate an adapter on a dataset",
                       description="Evaluate an adapter (or the bare model) on a dataset; writes eval.json and "
                       "predictions.jsonl.")
    add_adapter_args(p)
    add_config_flags(p, EvalConfig)
    p.set_defaults(fn=cmd_eval)


def cmd_eval(args) -> int:
    from ..inject import kind_of_config
    from ..loading import load_config, load_model
    from ..model import load_adapter
    from ..paths import writable_dir
    from ..training import evaluate as E
    from ..training.config import EvalConfig
    from ..training.data import DataError
    from ..training.sources import load_eval_data
    from .flags import config_from_flags

    cfg = config_from_flags(args, EvalConfig).validate()
    adapter = resolve_adapter(args)
    out = writable_dir(cfg.output or (Path(adapter) / "eval" if adapter else "eval"), "--output")
    info = read_task_info(adapter)
    if info.get("task") not in (None, cfg.task):
        print(f"note: the adapter was trained for task {info['task']!r}, evaluating as {cfg.task!r}", file=sys.stderr)
    kind = kind_of_config(load_config(cfg.model), cfg.task)
    max_length = cfg.max_length or info.get("max_length") or 256
    fields = {k: getattr(cfg, k) or info.get(k) for k in ("text_column", "label_column", "prompt_template", "label_words")}
    head = kind == "encoder"
    if head and not fields["label_words"]:
        raise DataError("an encoder classifier needs its label set in training order: evaluate an adapter saved by "
                        "`prefixtune train` (task.json) or pass --label-words")
    # an adapter trained with a head brings its own (loaded over the base's), so the base's head size does not matter
    base, tok = load_model(cfg.model, task=cfg.task, label_names=fields["label_words"] if head else None,
                           new_head=bool(head and info.get("head")))
    model = load_adapter(base, adapter) if adapter else base
    # the training loop's data path: the same reading, columns, template and truncation rules
    data = load_eval_data(cfg.data, tok, cfg.task, kind, fields, max_length=max_length, max_examples=cfg.max_examples,
                          drop_incomplete=cfg.drop_incomplete, fix_text=cfg.fix_text,
                          say=lambda m: print(m, file=sys.stderr))
    if cfg.task == "classify":
        result, preds = E.evaluate_classify(model, tok, data.eval_raw, data.task_info, method=cfg.method,
                                            batch_size=cfg.batch_size, max_length=max_length)
        result["loss"] = E.evaluate_loss(model, tok, data.eval, batch_size=cfg.batch_size)["loss"]
        warning = E.single_class_warning(result, result["loss"])
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
            result["single_class_warning"] = warning
    else:
        result, preds = {"task": cfg.task, **E.evaluate_loss(model, tok, data.eval, batch_size=cfg.batch_size)}, None
    E.write_results(out, result, preds)
    print(E.format_report(result))
    print(f"wrote {out / 'eval.json'}" + (f" and {out / 'predictions.jsonl'}" if preds is not None else ""))
    return 0


def _encoder_kind(model: str, task: str | None) -> bool:
    """True for an encoder (BERT family) base model; refuses model/task pairs the CLI cannot handle."""
    from ..inject import kind_of_config
    from ..loading import load_config

    return kind_of_config(load_config(model), task) == "encoder"


# ----------------------------------------------------------------------------- generate

def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text with (or without) an adapter",
                       description="Generate text; prompts are wrapped in the adapter's training template unless --raw "
                       "(a knowledge prefix's: each prompt is one user turn in the layout it was trained on).")
    p.add_argument("--model", required=True, help="base model: directory, Hub id or .gguf file (required)")
    add_adapter_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one prompt (this or --prompts is required)")
    g.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (this or --prompt is required)")
    p.add_argument("--raw", action="store_true", help="do not wrap prompts in the adapter's training template "
                   "(default: wrap them)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy (default: 0.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0 (default: 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling, with --temperature > 0 (default: 50)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1, no beam search)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    add_backend_arg(p)
    p.set_defaults(fn=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    from .. import inject
    from ..loading import load_model
    from ..model import load_adapter
    from ..paths import existing_file
    from ..training import data as D

    if args.prompts:
        path = existing_file(args.prompts, "--prompts", "a text file with one prompt per line")
        prompts = [l for l in path.read_text().splitlines() if l.strip()]
        if not prompts:
            raise D.DataError(f"--prompts {path} has no non-empty lines")
    else:
        prompts = [args.prompt]
    if _encoder_kind(args.model, None):
        raise D.DataError(f"generate does not apply to {args.model}: it is an encoder (a classifier, not a text "
                          "generator); use `prefixtune eval` to score an encoder classifier's adapter")
    args.adapter = resolve_adapter(args)
    info = {} if args.raw else read_task_info(args.adapter)
    template = info.get("prompt_template")
    if template and info.get("task") in ("classify", "instruct"):
        field = "text" if info["task"] == "classify" else "instruction"
        prompts = [template.replace("{" + field + "}", p).replace("{input}", "") for p in prompts]
    layout = None if args.raw or not args.adapter else read_layout(args.adapter)  # a knowledge prefix's
    if args.backend != "torch":
        return generate_on_backend(args, prompts, layout)
    torch.manual_seed(args.seed)
    base, tok = load_model(args.model)
    model = load_adapter(base, args.adapter) if args.adapter else base
    seq2seq = inject.kind_of_config(base.config) == "seq2seq"
    ids = encode_prompts(tok, prompts, layout, seq2seq)
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
    from .demo import DEFAULTS, EVALS

    p = sub.add_parser("demo", help="train a tweet-sentiment prefix on SmolLM2-135M on CPU (README: how long it takes)")
    p.add_argument("--model", help="model dir / Hub id / .gguf (default: SmolLM2-135M-Instruct, fetched once)")
    p.add_argument("--data", help="CSV/JSONL with text + sentiment columns (default: a tweet sentiment corpus)")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default: {DEFAULTS['max_steps']})")
    p.add_argument("--output", default="prefixtune-demo", help="where the data subset and the run go (default: "
                   "prefixtune-demo)")
    p.add_argument("--train-examples", type=int, help=f"balanced training sample (default: {DEFAULTS['train_examples']})")
    p.add_argument("--eval-examples", type=int, help="balanced held-out sample, scored at step 0 (zero-shot) and "
                   f"{EVALS} times while training (default: {DEFAULTS['eval_examples']})")
    p.add_argument("--fix-text", action="store_true", help="with --data: repair mojibake with ftfy first (the "
                   "built-in corpus is always repaired) (default: the text as read)")
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
    add_distill(sub)
    add_distill_eval(sub)
    _add_hook(sub, "info", "describe a model or adapter")
    _add_hook(sub, "serve", "serve adapters over HTTP")
    return parser


def _quiet_libraries() -> None:
    # Our own tqdm bar and messages are the output; the libraries' per-file bars are noise around them.
    import transformers

    from ..extras import missing

    if not missing("train"):
        import datasets

        datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# Subcommands whose modules parse their own flags: command -> module with main(argv) and build_parser().
HOOKS = {"info": "prefixtune.cli.info", "serve": "prefixtune.cli.serve"}


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser as the CLI runs it, by how the command is typed (the CLI reference, docs/cli.md,
    and tests/test_docs.py read these): build_parser()'s subcommands and each hook's own parser."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: importlib.import_module(HOOKS[name]).build_parser() if name in HOOKS else parser
            for name, parser in sub.choices.items()}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in HOOKS:  # their modules parse their own flags (argparse.REMAINDER mishandles --help)
        command, rest = argv[0], argv[1:]
        def fn():
            return importlib.import_module(HOOKS[command]).main(rest) or 0
    else:
        args = build_parser().parse_args(argv)
        command, fn = args.command, lambda: args.fn(args)  # noqa: E731
    from ..extras import MissingExtra, extra_of, install_command, require

    try:
        if command in NEEDS_TRAIN_EXTRA:
            require("train", "")  # printed after "prefixtune <command>: error:"
        _quiet_libraries()
        code = fn()
    except (MissingExtra, *_known_errors()) as e:
        msg = " ".join(str(e).split())  # one line, whatever the source formatted
        print(f"prefixtune {command}: error: {msg}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except ModuleNotFoundError as e:  # an optional package no check above caught: still one line naming the extra
        if extra_of(e.name) is None:
            raise
        print(f"prefixtune {command}: error: needs the [{extra_of(e.name)}] extra (missing {e.name}): "
              f"{install_command(extra_of(e.name))}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
