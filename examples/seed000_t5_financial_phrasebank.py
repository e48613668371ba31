# %% [markdown]
# # Prefix tuning T5 on Financial PhraseBank, through the Python API
#
# The flow of `examples/financial_phrasebank_t5.yaml` (seed 000) written out step by step: load T5, attach a
# 20-token prefix, train it with the Hugging Face `Trainer`, measure accuracy, save the adapter, reload it on a
# fresh base model, generate.
#
#     python examples/seed000_t5_financial_phrasebank.py                   # t5-large, the real dataset
#     python examples/seed000_t5_financial_phrasebank.py --tiny            # tiny random T5 + toy data, offline, ~10 s
#
# Each `# %%` cell runs on its own in VS Code / Jupyter (jupytext); `main()` runs them all.

# %%
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

import prefixtune as pt
from prefixtune.training.hf_trainer import PrefixTrainer

LABEL_WORDS = ["negative", "neutral", "positive"]  # Financial PhraseBank's ClassLabel names, used as targets
PROMPT = "sentiment: {sentence}"
RECIPE = dict(model="t5-large", num_virtual_tokens=20, lr=1e-2, epochs=5, batch_size=8, max_length=128,
              eval_fraction=0.1, seed=42)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny random T5 and a toy dataset (no downloads)")
    p.add_argument("--model", default=RECIPE["model"])
    p.add_argument("--output", default="runs/seed000-t5-fpb")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: full epochs)")
    p.add_argument("--epochs", type=float, default=RECIPE["epochs"])
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many examples")
    return p.parse_args(argv)


# %% [markdown]
# ## Model, tokenizer and data
# `--tiny` builds everything locally: a word-level tokenizer over a toy vocabulary and a 2-layer random T5.

# %%
TOY = {
    "negative": ["profit fell sharply", "sales dropped", "the company reported a loss", "shares fell", "costs rose"],
    "neutral": ["the company is based in helsinki", "the report is due in may", "the board met today",
                "the firm has offices", "the meeting is in june"],
    "positive": ["profit rose sharply", "sales grew strongly", "the company reported record profit", "shares rose",
                 "orders increased"],
}


def tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = sorted({w for texts in TOY.values() for t in texts for w in t.split()} | set(LABEL_WORDS) | {"sentiment", ":"})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(vocab), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval(), tokenizer


def load_model_and_tokenizer(args):
    if args.tiny:
        return tiny_model_and_tokenizer()
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return AutoModelForSeq2SeqLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)


def load_examples(args) -> list[dict]:
    """[{'sentence': ..., 'label': 0|1|2}]"""
    if args.tiny:
        rows = [{"sentence": t, "label": LABEL_WORDS.index(w)} for w, texts in TOY.items() for t in texts]
        return rows * 3
    from datasets import load_dataset

    ds = load_dataset("financial_phrasebank", "sentences_allagree", split="train")
    return [{"sentence": r["sentence"], "label": int(r["label"])} for r in ds]


def split(rows, fraction, seed):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = max(1, int(len(rows) * fraction))
    return rows[n_eval:], rows[:n_eval]


def encode(rows, tokenizer, max_length):
    enc = tokenizer([PROMPT.format(sentence=r["sentence"]) for r in rows], truncation=True, max_length=max_length)
    tgt = tokenizer([LABEL_WORDS[r["label"]] for r in rows])
    return [{"input_ids": i, "attention_mask": m, "labels": t}
            for i, m, t in zip(enc["input_ids"], enc["attention_mask"], tgt["input_ids"])]


# %% [markdown]
# ## Accuracy: generate the label word and compare

# %%
@torch.no_grad()
def predict(model, tokenizer, sentences, batch_size=16, max_new_tokens=4):
    model.eval()
    out = []
    for s in range(0, len(sentences), batch_size):
        batch = tokenizer([PROMPT.format(sentence=x) for x in sentences[s : s + batch_size]], return_tensors="pt",
                          padding=True, truncation=True, max_length=RECIPE["max_length"]).to(model.device)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out += [t.strip() for t in tokenizer.batch_decode(gen, skip_special_tokens=True)]
    return out


def accuracy(model, tokenizer, rows):
    preds = predict(model, tokenizer, [r["sentence"] for r in rows])
    return sum(p == LABEL_WORDS[r["label"]] for p, r in zip(preds, rows)) / len(rows), preds


# %% [markdown]
# ## Train, evaluate, save, reload, generate

# %%
def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output)
    base, tokenizer = load_model_and_tokenizer(args)
    train_rows, eval_rows = split(load_examples(args), RECIPE["eval_fraction"] if not args.tiny else 0.2, RECIPE["seed"])
    if args.max_eval:
        eval_rows = eval_rows[: args.max_eval]

    # attach: the base model is frozen, only the prefix trains
    model = pt.attach(base, pt.PrefixConfig(num_virtual_tokens=RECIPE["num_virtual_tokens"],
                                            extra={"task": "classify", "data": "financial_phrasebank/sentences_allagree"
                                                   if not args.tiny else "toy financial sentences"}))
    model.print_trainable_parameters()
    acc_before, _ = accuracy(model, tokenizer, eval_rows)

    targs = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=RECIPE["batch_size"],
        learning_rate=RECIPE["lr"] if not args.tiny else 3e-2, num_train_epochs=args.epochs, max_steps=args.max_steps,
        lr_scheduler_type="linear", warmup_steps=0, seed=RECIPE["seed"], save_strategy="no", logging_steps=1 if args.tiny else 10,
        report_to="none", use_cpu=not torch.cuda.is_available(), disable_tqdm=args.tiny,
    )
    trainer = PrefixTrainer(model=model, args=targs, train_dataset=encode(train_rows, tokenizer, RECIPE["max_length"]),
                            data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    train_result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    acc, preds = accuracy(model, tokenizer, eval_rows)
    print(f"accuracy: {acc_before:.3f} before training, {acc:.3f} after ({len(eval_rows)} eval examples)")

    # save: a peft-format adapter directory with a model card (metrics recorded in it)
    model.configs["default"].extra["metrics"] = {"eval_accuracy": acc, "train_loss": train_result.training_loss}
    adapter_dir = model.save_adapter(out / "adapter")

    # reload on a fresh base model and check it predicts the same
    fresh, _ = load_model_and_tokenizer(args)
    reloaded = pt.load_adapter(fresh, adapter_dir)
    acc_reloaded, preds_reloaded = accuracy(reloaded, tokenizer, eval_rows)
    print(f"reloaded from {adapter_dir}: accuracy {acc_reloaded:.3f}")

    # generate
    samples = ["profit rose sharply", "sales dropped"] if args.tiny else [
        "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007.",
        "The company's net sales fell by 5 % to EUR 1.2 bn.",
    ]
    for s, p in zip(samples, predict(reloaded, tokenizer, samples)):
        print(f"{s!r} -> {p}")

    result = dict(accuracy_before=acc_before, accuracy=acc, accuracy_reloaded=acc_reloaded, losses=losses,
                  predictions=preds, predictions_reloaded=preds_reloaded, adapter=str(adapter_dir))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
