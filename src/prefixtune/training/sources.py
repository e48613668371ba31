"""Where a run's rows come from, and the one data path `fit` and `prefixtune eval` share.

    data = load_run_data(cfg, tokenizer, kind)        # training: read, split, cap, tokenize (RunData)
    data = load_eval_data("test.csv", tokenizer, ...)  # `prefixtune eval`: read, pick the eval split, cap, tokenize

Reading: .csv/.jsonl/.json/.parquet files, save_to_disk directories and Hub datasets, each failure a DataError
naming the file and the fix. Formatting and tokenizing the rows is data.py's job; this module decides which rows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from .data import DataError, dataset_label, tokenize_dataset

log = logging.getLogger(__name__)

EVAL_SPLITS = ("validation", "test", "eval")
# what task.json holds besides the task and max_length: how eval/generate format inputs the way training did
TASK_FIELDS = ("label_words", "text_column", "label_column", "prompt_template")


def load_records(source: str, split: str | None = None) -> DatasetDict | Dataset:
    """Load a save_to_disk directory, a .csv/.jsonl/.json/.parquet file, or a Hub dataset name."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        if not any(path.iterdir()):
            raise DataError(f"{path} is an empty directory; pass a data file or the directory save_to_disk wrote")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path} is a directory but not a dataset saved with save_to_disk ({type(e).__name__}: "
                            f"{_first_line(e)}); pass the directory save_to_disk wrote, or a data file") from None
    elif suffix in (".csv", ".jsonl", ".json", ".parquet"):
        if not path.exists():
            raise DataError(f"data file {path} does not exist; check the path")
        ds = _read_file(path, suffix)
        ds.info.dataset_name = path.name  # so column errors can say which file
    elif path.is_file():
        raise DataError(f"{path} is a {suffix or 'suffix-less'} file; pass a .csv, .jsonl, .json or .parquet file (or "
                        "a save_to_disk directory)")
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise DataError(
                f"{source!r} does not exist locally and could not be loaded from the Hugging Face Hub "
                f"({type(e).__name__}: {e}). Pass a local .csv/.jsonl/.parquet file or save_to_disk directory."
            ) from e
        return ds
    if split is not None and isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"split {split!r} not in {source}; available splits: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _read_file(path: Path, suffix: str) -> Dataset:
    """Read one data file; a broken file is a DataError naming the file (and the line, where one is to blame)."""
    if suffix != ".parquet":
        with open(path, "rb") as f:
            if b"\0" in f.read(1 << 16):  # text in any encoding we read has no NUL bytes
                raise DataError(f"{path} is not a text file (it holds NUL bytes): save it as UTF-8 or Latin-1 "
                                f"{suffix[1:].upper()}")
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        try:
            return Dataset.from_parquet(str(path))
        except Exception as e:
            raise DataError(f"{path} is not a readable Parquet file, perhaps truncated or corrupt "
                            f"({type(e).__name__}: {_first_line(e)}); write it again") from None
    _check_utf8(path)
    try:
        return Dataset.from_json(str(path))
    except Exception as e:
        raise DataError(_json_problem(path, suffix) or f"{path} could not be read as JSON Lines "
                        f"({type(e).__name__}: {_first_line(e)})") from None


def _check_utf8(path: Path) -> None:
    """JSON is UTF-8 by definition, and Arrow's reader would otherwise skip or mangle rows with a bad byte."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 (byte {offset + e.start}): JSON must be UTF-8; re-save it as "
                                "UTF-8") from None
            offset += len(chunk)


def _json_problem(path: Path, suffix: str) -> str | None:
    """The first broken line of a JSON Lines file (or the position in a .json document), said plainly."""
    text = path.read_text(encoding="utf-8")  # _check_utf8 passed
    if suffix == ".json" and text.lstrip().startswith(("[", "{")) and "\n{" not in text.strip():
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); fix that line"
        return None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path} line {n}: not valid JSON ({e.msg}, column {e.colno}); fix or remove that line"
        if not isinstance(row, dict):
            return f"{path} line {n}: each line must be a JSON object {{...}}, got {type(row).__name__}"
    return None


def _read_csv(path: Path) -> Dataset:
    import pandas as pd

    # keep_default_na=False: a tweet that says "NA" is text, not a missing value
    for enc in ("utf-8", "latin-1"):  # latin-1 decodes any byte string, so it is the last resort
        try:
            df = pd.read_csv(path, encoding=enc, keep_default_na=False)
            break
        except UnicodeDecodeError:
            log.info("%s is not utf-8, retrying as latin-1", path)
        except pd.errors.ParserError as e:  # e.g. an unbalanced quote: "EOF inside string starting at row 7"
            raise DataError(f"{path} is not a well-formed CSV ({_first_line(e)}); check the quotes on that row") from None
        except pd.errors.EmptyDataError:
            raise DataError(f"{path} is empty; it needs a header row and data rows") from None
    if len(df.columns) == 0:
        raise DataError(f"{path} has no columns; is it an empty CSV?")
    return Dataset.from_pandas(df, preserve_index=False)


def split_train_eval(
    ds_or_dict: Dataset | DatasetDict,
    eval_fraction: float = 0.1,
    seed: int = 0,
    eval_source: str | Dataset | DatasetDict | None = None,
) -> tuple[Dataset, Dataset]:
    """(train, eval): explicit eval_source > the dict's own eval split > a seeded random split."""
    if isinstance(ds_or_dict, DatasetDict):
        if "train" in ds_or_dict:
            train = ds_or_dict["train"]
        elif len(ds_or_dict) == 1:
            train = next(iter(ds_or_dict.values()))
        else:
            raise DataError(f"no 'train' split; available splits: {', '.join(ds_or_dict)}. Rename one to 'train'")
        own_eval = next((ds_or_dict[s] for s in EVAL_SPLITS if s in ds_or_dict), None)
    else:
        train, own_eval = ds_or_dict, None
    if len(train) == 0:
        raise DataError(f"the training data ({dataset_label(train)}) is empty")

    if eval_source is not None:
        ev = load_records(eval_source) if isinstance(eval_source, str) else eval_source
        if isinstance(ev, DatasetDict):
            name = next((s for s in (*EVAL_SPLITS, "train") if s in ev), None)
            if name is None:
                raise DataError(f"eval source has no {'/'.join(EVAL_SPLITS)} split; available: {', '.join(ev)}")
            ev = ev[name]
    elif own_eval is not None:
        ev = own_eval
    else:
        if not 0 < eval_fraction < 1:
            raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        if len(train) < 2:
            raise DataError(f"{dataset_label(train)} has {len(train)} example; need at least 2 to split off an eval set")
        n_eval = min(len(train) - 1, max(1, round(len(train) * eval_fraction)))
        parts = train.train_test_split(test_size=n_eval, seed=seed)
        train, ev = parts["train"], parts["test"]
    if len(ev) == 0:
        raise DataError("the eval data is empty; pass a non-empty eval source or use eval_fraction")
    return train, ev


def load_source(source: str, config_name: str | None = None) -> Dataset | DatasetDict:
    """load_records, plus Hub dataset configs (e.g. financial_phrasebank / sentences_allagree)."""
    p = Path(source)
    if p.is_file() and not p.read_bytes()[:4096].strip():  # `datasets` fails on empty files with StopIteration
        raise DataError(f"data file {p} is empty; nothing to train on")
    if config_name and not Path(source).exists():
        try:
            return datasets.load_dataset(source, config_name)
        except Exception as e:
            raise DataError(f"could not load Hub dataset {source!r} (config {config_name!r}): {type(e).__name__}: "
                            f"{str(e)[:200]}. Pass a local .csv/.jsonl/.parquet file or save_to_disk directory") from None
    return load_records(source)


# ----------------------------------------------------------------------------- the run's data path

@dataclass
class RunData:
    """What a run trains and evaluates on."""

    train: Dataset | None  # tokenized training rows (None for `prefixtune eval`)
    eval: Dataset  # tokenized evaluation rows: the loss
    eval_raw: Dataset  # the evaluation rows as read: classification is scored from their text
    task_info: dict  # task.json: task, max_length, TASK_FIELDS (+ "head" for encoder classifiers)


def tokenize_rows(ds: Dataset, tokenizer, task: str, kind: str, fields: dict, *, max_length: int,
                  on_truncate: str, which: str) -> tuple[Dataset, dict]:
    """data.tokenize_dataset for a model of `kind` ("causal"/"seq2seq"/"encoder") -> (tokenized, task_info).

    `fields`: TASK_FIELDS given (None: guessed from the data, or the task's template). A target that does not fit
    is never dropped silently: with on_truncate="warn" it stops with a DataError (drop: set on_truncate drop)."""
    head = kind == "encoder"  # encoder classifiers: class-index labels for the classification head
    tok, info = tokenize_dataset(ds, tokenizer, task, is_encoder_decoder=kind == "seq2seq", head=head,
                                 max_length=max_length, on_truncate=on_truncate, **{k: fields.get(k) for k in TASK_FIELDS})
    if on_truncate == "warn" and info.get("n_dropped"):
        raise DataError(
            f"{info['n_dropped']} {which} example(s) have a target longer than max_length={max_length}; "
            "raise --max-length (max_length in the recipe) or set on_truncate: drop to skip them"
        )
    task_info = {"task": task, "max_length": max_length, **{k: info.get(k) for k in TASK_FIELDS}}
    if head:  # eval / info / generate read this to know the adapter carries a classification head
        task_info["head"] = "sequence-classification"
    return tok, task_info


def load_run_data(cfg, tokenizer, kind: str, say=print) -> RunData:
    """A training run's rows (`cfg`: a TrainConfig): read --train, split off (or read --eval), cap, tokenize."""
    from .clean import prepare

    # --fix-text and the incomplete-row check see the files' own row order (messages give the files' row numbers)
    kw = dict(text_column=cfg.text_column, label_column=cfg.label_column, drop_incomplete=cfg.drop_incomplete,
              repair_text=cfg.fix_text, say=say)
    raw = prepare(load_source(cfg.train, cfg.data_config), cfg.task, where=f"--train {cfg.train}", **kw)
    eval_source = prepare(load_source(cfg.eval), cfg.task, where=f"--eval {cfg.eval}", **kw) if cfg.eval else None
    train_raw, eval_raw = split_train_eval(raw, cfg.eval_fraction, cfg.seed, eval_source=eval_source)
    if cfg.max_train_examples and len(train_raw) > cfg.max_train_examples:
        train_raw = train_raw.shuffle(seed=cfg.seed).select(range(cfg.max_train_examples))
    cap = cfg.max_eval_examples
    if cap is None and cfg.eval is None and cfg.max_auto_eval_examples and len(eval_raw) > cfg.max_auto_eval_examples:
        cap = cfg.max_auto_eval_examples
        say(f"evaluating {cap} of the {len(eval_raw)} evaluation rows taken from --train (--max-auto-eval-examples 0 for all, "
            "or --eval FILE / --max-eval-examples N)")
    if cap and len(eval_raw) > cap:
        eval_raw = eval_raw.select(range(cap))
    given = {k: getattr(cfg, k) for k in TASK_FIELDS}
    kw = dict(max_length=cfg.max_length, on_truncate=cfg.on_truncate)
    train_tok, task_info = tokenize_rows(train_raw, tokenizer, cfg.task, kind, given, which="training", **kw)
    # the eval rows in the training rows' label set and columns (the template as given: instruct picks per row)
    seen = {k: task_info[k] or given[k] for k in ("label_words", "text_column", "label_column")}
    eval_tok, _ = tokenize_rows(eval_raw, tokenizer, cfg.task, kind, {**given, **seen}, which="eval", **kw)
    return RunData(train_tok, eval_tok, eval_raw, task_info)


def load_eval_data(source: str, tokenizer, task: str, kind: str, fields: dict, *, max_length: int,
                   max_examples: int | None = None, drop_incomplete: bool = False, fix_text: bool = False,
                   say=print) -> RunData:
    """`prefixtune eval`'s rows: read `source` (a DatasetDict: its eval split), check, cap, tokenize as training did."""
    from .clean import prepare

    ds = load_source(source)
    if isinstance(ds, DatasetDict):
        ds = ds[next((s for s in (*EVAL_SPLITS, "train") if s in ds), next(iter(ds)))]
    if len(ds) == 0:
        raise DataError(f"--data {source} is empty; nothing to evaluate")
    ds = prepare(ds, task, text_column=fields.get("text_column"), label_column=fields.get("label_column"),
                 drop_incomplete=drop_incomplete, repair_text=fix_text, where=f"--data {source}", say=say)
    if max_examples:
        ds = ds.select(range(min(max_examples, len(ds))))
    tok, task_info = tokenize_rows(ds, tokenizer, task, kind, fields, max_length=max_length, on_truncate="warn",
                                   which="eval")
    return RunData(None, tok, ds, task_info)
