"""Row checks on data as loaded, before any split or shuffle: incomplete rows, and mojibake repair (`--fix-text`).

Both run on the rows in file order, so the row numbers in messages are the file's (1 = the first data row).
An incomplete row (empty text or label for classify, empty instruction or output for instruct) is an error naming
how many and the first ones, unless `--drop-incomplete` asks to skip them (then counted in the log): an empty label
would otherwise train as a class of its own, and an empty output teaches the model to stop at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from datasets import ClassLabel, Dataset, DatasetDict, Value

from . import data as D

SHOW_ROWS = 5  # how many row numbers a message lists


def _blank(value, class_label: bool) -> bool:
    if value is None:
        return True
    if class_label:  # datasets' ClassLabel uses -1 for "no label"
        return value == -1
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def required_columns(ds: Dataset, task: str, text_column: str | None, label_column: str | None) -> list[str]:
    """The columns a row of `task` cannot do without (found the way tokenizing finds them)."""
    if task == "classify":
        return [D._column(ds, text_column, D.TEXT_COLUMNS, "text", "--text-column"),
                D._column(ds, label_column, D.LABEL_COLUMNS, "label", "--label-column")]
    if task == "instruct":  # a missing column is tokenizing's error (it names the task's columns)
        return [c for c in ("instruction", "output") if c in ds.column_names]
    return []


def incomplete_rows(ds: Dataset, columns: list[str]) -> dict[str, list[int]]:
    """column -> indices of the rows where it is empty (None, blank text, NaN, ClassLabel -1)."""
    out = {}
    for c in columns:
        is_class = isinstance(ds.features[c], ClassLabel)
        out[c] = [i for i, v in enumerate(ds[c]) if _blank(v, is_class)]
    return out


def check_complete(ds: Dataset, task: str, *, text_column: str | None = None, label_column: str | None = None,
                   drop: bool = False, where: str = "the data", say: Callable = print) -> Dataset:
    """`ds` unchanged if every row is complete; else a DataError, or with drop=True the complete rows (said)."""
    if len(ds) == 0:
        return ds
    bad = incomplete_rows(ds, required_columns(ds, task, text_column, label_column))
    rows = sorted({i for idx in bad.values() for i in idx})
    if not rows:
        return ds
    what = ", ".join(f"{len(idx)} with an empty {c!r}" for c, idx in bad.items() if idx)
    first = ", ".join(str(i + 1) for i in rows[:SHOW_ROWS]) + (", ..." if len(rows) > SHOW_ROWS else "")
    detail = f"{len(rows)} of {len(ds)} rows in {where} are incomplete ({what}; rows {first}, 1 = the first data row)"
    if not drop:
        raise D.DataError(f"{detail}: fill or remove them, or pass --drop-incomplete to skip them")
    say(f"{detail}: dropped them (--drop-incomplete); {len(ds) - len(rows)} rows remain")
    gone = set(rows)
    return ds.select([i for i in range(len(ds)) if i not in gone])


def string_columns(ds: Dataset) -> list[str]:
    return [c for c, f in ds.features.items() if isinstance(f, Value) and f.dtype in ("string", "large_string")]


def ftfy_fixer():
    """ftfy.fix_text limited to encoding repairs: quotes, character widths, ligatures, line breaks and HTML entities
    stay as written. -> a function str -> str."""
    try:
        import ftfy
    except ImportError:
        raise D.DataError("--fix-text needs ftfy: pip install 'prefixtune[train]' (or pip install ftfy)") from None
    config = ftfy.TextFixerConfig(unescape_html=False, uncurl_quotes=False, fix_character_width=False,
                                  fix_latin_ligatures=False, fix_line_breaks=False, normalization=None)
    return lambda text: ftfy.fix_text(text, config)


def fix_text(ds: Dataset) -> tuple[Dataset, int]:
    """Repair mojibake (UTF-8 read as Latin-1/Windows-1252, "Ã©" for "é") in every text column with ftfy
    (`ftfy_fixer`). -> (dataset, rows changed). A changed row is not always a clean one: bytes lost before the file
    was written stay lost (`still_garbled` counts what ftfy still takes for mojibake)."""
    fix = ftfy_fixer()
    cols = string_columns(ds)
    old = {c: ds[c] for c in cols}
    new = {c: [v if v is None else fix(v) for v in old[c]] for c in cols}
    changed = sum(any(old[c][i] != new[c][i] for c in cols) for i in range(len(ds)))
    if changed:
        ds = ds.map(lambda _, i: {c: new[c][i] for c in cols}, with_indices=True)
    return ds, changed


def still_garbled(ds: Dataset) -> int:
    """Rows whose text ftfy's own heuristic still takes for mojibake."""
    from ftfy.badness import is_bad

    cols = string_columns(ds)
    return sum(any(isinstance(v, str) and is_bad(v) for v in row) for row in zip(*(ds[c] for c in cols)))


def prepare(ds: Dataset | DatasetDict, task: str, *, text_column: str | None = None, label_column: str | None = None,
            drop_incomplete: bool = False, repair_text: bool = False, where: str = "the data",
            say: Callable = print) -> Dataset | DatasetDict:
    """--fix-text then the incomplete-row check, on a dataset or each split of a DatasetDict."""
    if isinstance(ds, DatasetDict):
        return DatasetDict({name: prepare(split, task, text_column=text_column, label_column=label_column,
                                          drop_incomplete=drop_incomplete, repair_text=repair_text,
                                          where=f"{where} (split {name!r})", say=say) for name, split in ds.items()})
    if repair_text:
        ds, changed = fix_text(ds)
        bad = still_garbled(ds)
        say(f"--fix-text: ftfy changed the text of {changed} of {len(ds)} rows in {where}"
            + (f"; {bad} rows still look garbled (bytes lost before the file was written can't be restored)" if bad else ""))
    return check_complete(ds, task, text_column=text_column, label_column=label_column, drop=drop_incomplete,
                          where=where, say=say)
