"""A trained prefix on llama.cpp's quantized model vs our PyTorch fp32 path: held-out classification accuracy.

    python benchmarks/llamacpp_quality.py --adapter prefixtune-demo/run/adapter --eval prefixtune-demo/data/eval.jsonl
        [--gguf SmolLM2-135M-Instruct.Q4_1.gguf] [--max-length 64]

Both sides score the same prompts (the adapter's task.json template, tokenized by the same code) by rank
classification: the label with the highest next-token log-probability (the demo's labels are one token each).
PyTorch: the GGUF dequantized to fp32 (loading.load_model) with the adapter, through training.evaluate.rank_predict.
llama.cpp: the GGUF as it is (Q4_1) with the prefix in its KV cache (f16, llama.cpp's default), many prompts per
llama_decode. Target from issue 11: within 2 points.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--eval", required=True, help="held-out records (the demo writes <output>/data/eval.jsonl)")
    ap.add_argument("--gguf", default=None, help="default: the demo's SmolLM2-135M-Instruct Q4_1")
    ap.add_argument("--max-length", type=int, default=64, help="as the demo trains and evaluates")
    ap.add_argument("--batch", type=int, default=32, help="prompts per llama_decode")
    args = ap.parse_args()

    import prefixtune as pt
    from prefixtune.cli.main import read_task_info
    from prefixtune.loading import load_model
    from prefixtune.serving.llamacpp import LlamaCppModel
    from prefixtune.training import data as D
    from prefixtune.training import evaluate as E
    from prefixtune.training.sources import load_records

    if args.gguf is None:
        from prefixtune.cli import assets

        args.gguf = str(assets.smollm2_gguf())
    info = read_task_info(args.adapter)
    ds = load_records(args.eval)
    prompts, gold = E.classify_prompts(ds, info)
    labels = list(info["label_words"])

    t0 = time.perf_counter()
    base, tok = load_model(args.gguf, dtype="fp32", device="cpu")
    model = pt.load_adapter(base, args.adapter).eval()
    torch_pred, _ = E.rank_predict(model, tok, prompts, labels, max_length=args.max_length)
    torch_s = time.perf_counter() - t0

    p_ids, _ = D.encode_pair(tok, prompts, [labels[0]] * len(prompts), False)  # prompt ids do not depend on the target
    label_ids = [D.encode_pair(tok, [prompts[0]], [w], False)[1][0] for w in labels]
    label_ids = [t[:-1] if len(t) > 1 and t[-1] == tok.eos_token_id else t for t in label_ids]
    if any(len(t) != 1 for t in label_ids):
        raise SystemExit(f"label words {labels} are not one token each ({label_ids}); this script scores single tokens")
    label_ids = [t[0] for t in label_ids]

    t0 = time.perf_counter()
    lc = LlamaCppModel(args.gguf, n_ctx=args.batch * (args.max_length + 1) + 512, max_sequences=args.batch, max_adapters=1)
    lc.load_prefix("a", lc.adapter_layers(args.adapter))
    lc_pred = []
    for s in range(0, len(p_ids), args.batch):
        chunk = [E._fit(p, 1, args.max_length, tok.bos_token_id) for p in p_ids[s : s + args.batch]]
        seqs = [lc.open_sequence("a") for _ in chunk]
        logits = lc.decode([(q, p, pos) for (q, pos), p in zip(seqs, chunk)])
        for q, _ in seqs:
            lc.close_sequence(q)
        lc_pred += logits[:, label_ids].argmax(-1).tolist()
    lc_s = time.perf_counter() - t0

    acc = lambda pred: sum(labels[p] == g for p, g in zip(pred, gold)) / len(gold)
    agree = sum(a == b for a, b in zip(torch_pred, lc_pred)) / len(gold)
    print(f"\n{Path(args.gguf).name} + {args.adapter}, {len(gold)} held-out examples, labels {labels}\n")
    print("| path | accuracy | seconds |")
    print("|---|---:|---:|")
    print(f"| PyTorch fp32 (GGUF dequantized), rank | {acc(torch_pred):.3f} | {torch_s:.1f} |")
    print(f"| llama.cpp {Path(args.gguf).stem.split('.')[-1]} weights, f16 KV cache, rank | {acc(lc_pred):.3f} | {lc_s:.1f} |")
    diff = 100 * (acc(lc_pred) - acc(torch_pred))
    print(f"\ndifference {diff:+.1f} points (target within 2): {'PASS' if abs(diff) <= 2 else 'FAIL'}; "
          f"the two paths agree on {agree:.1%} of predictions")
    print(json.dumps({"torch_acc": acc(torch_pred), "llamacpp_acc": acc(lc_pred), "agree": agree, "n": len(gold)}))


if __name__ == "__main__":
    main()
