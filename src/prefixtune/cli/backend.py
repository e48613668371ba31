"""`--backend`: which engine runs `generate` and `serve` (declared once, here), and `generate` on a serving engine."""

from __future__ import annotations

from ..config import ConfigError
from ..serving.backends import BACKENDS

BACKEND_HELP = {
    "torch": "our PyTorch engine (any supported model)",
    "llamacpp": 'a .gguf --model on llama.cpp, quantized, fast on CPUs (pip install "prefixtune[llamacpp]")',
}


def add_backend_arg(p) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="; ".join(f"{b} = {BACKEND_HELP[b]}" for b in BACKENDS) + " (default: torch)")


def generate_on_backend(args, prompts: list[str]) -> int:
    """`prefixtune generate --backend llamacpp`: the same prompts and printing as the torch path."""
    from ..training.data import encode_pair

    if args.num_beams != 1:
        raise ConfigError(f"--num-beams: beam search is not available with --backend {args.backend}; use --num-beams 1")
    if args.temperature > 0 and args.top_k != 50:
        raise ConfigError(f"--top-k is not applied by --backend {args.backend} (it samples with temperature and "
                          "--top-p); drop --top-k")
    from ..serving.llamacpp_engine import load

    gen = load(args.model, {"default": args.adapter} if args.adapter else None, max_batch_size=8)
    try:
        ids, _ = encode_pair(gen.engine.tokenizer, prompts, [], False)  # tokenized exactly as the torch path does
        texts = gen.generate([list(x) for x in ids], "default" if args.adapter else None, max_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    finally:
        gen.close()
    for p, text in zip(prompts, texts):
        print(f"### {p}\n{text.strip()}\n") if len(prompts) > 1 else print(text.strip())
    return 0
