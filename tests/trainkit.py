"""Old name of the train/eval/CLI helpers: everything lives in helpers.py."""

from helpers import NEG, POS, classify_rows, instruct_rows, make_tokenizer, model_dir, write_jsonl  # noqa: F401
