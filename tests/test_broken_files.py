"""Broken data files end in one DataError naming the file (and line), never in a datasets/pandas/arrow traceback."""

import json

import pytest

from prefixtune.cli.main import main
from prefixtune.training.data import DataError
from prefixtune.training.sources import load_records


def _rows(n=6):
    return [{"text": f"tweet number {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


def _jsonl(path, rows, broken_at=None):
    lines = [json.dumps(r) for r in rows]
    if broken_at is not None:
        lines[broken_at - 1] = lines[broken_at - 1][:-3]  # cut the closing quote and brace: line N is broken
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_broken_line_is_named(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", _rows(), broken_at=4)
    with pytest.raises(DataError, match=r"d\.jsonl line 4: not valid JSON"):
        load_records(str(path))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "b"}) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"line 2: each line must be a JSON object"):
        load_records(str(path))


def test_json_document_error_position(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a", "label": "b"},\n {"text": "c" "label": "d"}]')
    with pytest.raises(DataError, match=r"d\.json line 2 column \d+: not valid JSON"):
        load_records(str(path))


def test_jsonl_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"text": "caf", "label": "x"}).encode().replace(b"caf", b"caf\xe9\xff"))
    with pytest.raises(DataError, match=r"is not UTF-8"):
        load_records(str(path))


def test_csv_unbalanced_quote(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"fine",pos\n"no closing quote,neg\nlast,pos\n')
    with pytest.raises(DataError, match=r"d\.csv is not a well-formed CSV .*quotes"):
        load_records(str(path))


def test_csv_latin1_still_reads(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ncafé crème,pos\n".encode("latin-1"))
    assert load_records(str(path))["text"] == ["café crème"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_binary_file_is_not_text(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"text,label\n\x00\x01\x02\x00binary\n")
    with pytest.raises(DataError, match=r"is not a text file"):
        load_records(str(path))


def test_truncated_parquet(tmp_path):
    from datasets import Dataset

    path = tmp_path / "d.parquet"
    Dataset.from_list(_rows(50)).to_parquet(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"d\.parquet is not a readable Parquet file, perhaps truncated"):
        load_records(str(path))


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "notadataset").mkdir()
    (tmp_path / "notadataset" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"not a dataset saved with save_to_disk"):
        load_records(str(tmp_path / "notadataset"))


def test_cli_says_one_line_and_exits_2(tmp_path, capsys):
    from helpers import model_dir

    data = _jsonl(tmp_path / "d.jsonl", _rows(), broken_at=3)
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(model_dir(tmp_path)), "--train", str(data), "--task", "classify",
              "--output", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert e.value.code == 2 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith("prefixtune train: error:") and "d.jsonl line 3: not valid JSON" in errors[0]
