"""Test helpers, one module: tiny random models built from configs (no Hub), one word-level tokenizer whose
special ids are the models' own, tiny model directories and generated datasets for train/eval/CLI tests, and
seeded prefixes for the parity tests.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import prefixtune as pt

VOCAB = 128
# One set of special ids for the models and the tokenizers below: <pad>=0, <unk>=1, <eos>=2, <bos>=3.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>", "<bos>")
PAD, UNK, EOS, BOS = range(len(SPECIAL_TOKENS))
SPECIAL = dict(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)


def make(kind: str, seed: int = 0, vocab: int = VOCAB, layers: int = 2):
    torch.manual_seed(seed)
    if kind == "llama":  # grouped-query attention: 4 query heads, 2 kv heads
        m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **SPECIAL))
    elif kind == "qwen3":  # head_dim (24) != hidden / heads (16)
        m = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512, **SPECIAL))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **SPECIAL))
    elif kind == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=512, **SPECIAL))
    elif kind == "bloom":
        m = BloomForCausalLM(BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=layers, n_head=4, **SPECIAL))
    elif kind == "t5":
        m = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=layers, num_heads=4,
                                                decoder_start_token_id=0, **SPECIAL))
    elif kind == "bart":  # decoder starts from <bos>; no forced <eos> at max_length (tests compare every step)
        m = BartForConditionalGeneration(BartConfig(vocab_size=vocab, d_model=64, encoder_layers=layers, decoder_layers=layers,
                                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                                    decoder_ffn_dim=128, max_position_embeddings=512, decoder_start_token_id=BOS,
                                                    forced_eos_token_id=None, **SPECIAL))
    elif kind == "bert":
        m = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                                     intermediate_size=128, num_labels=3, max_position_embeddings=512, pad_token_id=0))
    else:
        raise ValueError(kind)
    return m.eval()


CAUSAL = ["gpt2", "llama", "qwen3", "mistral", "bloom"]
SEQ2SEQ = ["t5", "bart"]
ALL = CAUSAL + SEQ2SEQ + ["bert"]


def batch(kind: str, b: int = 3, t: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if kind in SEQ2SEQ:
        kw["labels"] = torch.randint(3, VOCAB, (b, 5), generator=g)
    elif kind == "bert":
        kw["labels"] = torch.randint(0, 3, (b,), generator=g)
    else:
        kw["labels"] = ids.clone()
    return kw


# ---- tokenizer ------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
WORDS = (
    "the a movie film was is great good bad awful fine i it this that loved hated plot acting "
    "positive negative neutral label text human assistant user system hello hi how are you "
    "what say add two and one three four five sum of numbers answer translate to french "
    "bonjour , . ! ? : < > ="
)
# id_tokenizer: every model id after the specials is a word "w<id>", so tests can write prompts as ids.
ID_WORDS = [f"w{i}" for i in range(len(SPECIAL_TOKENS), VOCAB)]
ID_CHAT_TEMPLATE = "{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}{% if add_generation_prompt %}w7{% endif %}"


def make_tokenizer(bos: bool = False, pad: bool = True, chat_template: str | None = CHAT_TEMPLATE,
                   words: str | list[str] = WORDS):
    """Word-level tokenizer: one id per word, so tests can count tokens by eye.

    Specials as the tiny models: <pad>=0, <unk>=1, <eos>=2, <bos>=3 (<bos> only added to inputs when bos=True).
    `words`: a string (its distinct words, sorted, get ids 4, 5, ...) or a list (ids in list order).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ordered = sorted(set(words.split())) if isinstance(words, str) else list(dict.fromkeys(words))
    vocab = {w: i for i, w in enumerate(list(SPECIAL_TOKENS) + ordered)}
    assert len(vocab) <= VOCAB, "the tiny models have VOCAB ids"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "<user>" -> "<", "user", ">"
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    kw = dict(unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")
    if pad:
        kw["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.chat_template = chat_template
    return fast


def id_tokenizer():
    """`make_tokenizer` over the tiny models' ids: "w4 w5" -> [4, 5] (the serving tests write prompts so)."""
    return make_tokenizer(chat_template=ID_CHAT_TEMPLATE, words=ID_WORDS)


# ---- model directories and datasets for train/eval/CLI tests ---------------------------------------------
POS, NEG = "great good fine loved".split(), "bad awful hated".split()


def model_dir(tmp: Path, kind: str = "llama") -> Path:
    """save_pretrained of a tiny random model + the word-level test tokenizer (same special ids)."""
    d = tmp / f"model-{kind}"
    if not d.exists():
        m = make(kind)
        m.save_pretrained(d)
        make_tokenizer().save_pretrained(d)
    return d


def classify_rows(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lab = rng.choice(["positive", "negative"])
        rows.append({"text": f"the movie was {rng.choice(POS if lab == 'positive' else NEG)} i think", "label": lab})
    return rows


def instruct_rows(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    nums = "one two three four five".split()
    return [{"instruction": "add two numbers", "input": f"{rng.choice(nums)} and {rng.choice(nums)}",
             "output": f"the sum is {rng.choice(nums)}"} for _ in range(n)]


# metrics.jsonl fields that time the run (training/loop.py): they differ between runs that otherwise match
WALL_CLOCK = ("tokens_per_s", "eval_seconds")


def untimed(records: list[dict]) -> list[dict]:
    """metrics.jsonl records without their wall-clock fields, for comparing two runs."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- peft as a reference on transformers >= 5.24 ------------------------------------------------------------
# peft 0.21.2, the newest, predates transformers 5.24's rename of `past_key_values` to `cache`: its generate()
# no longer follows its own forward for prefix tuning (checked against the stepwise greedy below), and it refuses
# encoder classifiers because it looks for `past_key_values` in the backbone's signature. The two references
# below stay peft's computation: its forward stepped greedily, and its prefix forward for encoders restated.


@torch.no_grad()
def greedy_by_forward(model, input_ids, attention_mask, new_tokens: int, eos: int = EOS, pad: int = PAD,
                      seq2seq: bool = False) -> torch.Tensor:
    """Greedy decoding by calling `model` on the whole sequence each step (no cache): what generate(do_sample=
    False) must return, rows that hit eos padded; shaped like generate's output."""
    start = model.config.decoder_start_token_id if seq2seq else None
    out = torch.full((input_ids.shape[0], 1), start) if seq2seq else input_ids
    mask, done = attention_mask, torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(new_tokens):
        if seq2seq:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=out).logits
        else:
            logits = model(input_ids=out, attention_mask=mask).logits
        nxt = torch.where(done, pad, logits[:, -1].argmax(-1))
        done |= nxt == eos
        out = torch.cat([out, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if done.all():  # generate() stops here too
            break
    return out


@torch.no_grad()
def peft_logits(ref, **batch) -> torch.Tensor:
    """A peft model's logits. Where peft refuses an encoder classifier ('does not support past key values', see
    above), its _prefix_tuning_forward for them, restated: peft's own prompt cache (get_prompt), P ones before the
    mask, the backbone, dropout, its classifier."""
    try:
        return ref(**batch).logits
    except ValueError as e:
        if "does not support past key values" not in str(e):
            raise
    from prefixtune.inject import cache_arg

    base, ids, mask = ref.base_model, batch.pop("input_ids"), batch.pop("attention_mask")
    P = ref.active_peft_config.num_virtual_tokens
    backbone = base.get_submodule(ref.transformer_backbone_name)
    mask = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], 1)
    out = backbone(input_ids=ids, attention_mask=mask, **{cache_arg(backbone): ref.get_prompt(ids.shape[0])}, **batch)
    pooled = out[1] if len(out) > 1 else out[0]
    if "dropout" in dict(base.named_children()):
        pooled = base.dropout(pooled)
    return base.get_submodule(ref.cls_layer_name)(pooled)


# ----------------------------------------------------------------------------- prefixes for parity tests

def randomise(model, seed=0):
    """Give every prefix non-trivial values (peft's N(0,1) is already random; make it explicit and seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prefixes.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def two_adapters(kind, p_a=5, p_b=3):
    model = pt.attach(make(kind), pt.PrefixConfig(num_virtual_tokens=p_a), name="a")
    model.add_adapter("b", pt.PrefixConfig(num_virtual_tokens=p_b))
    return randomise(model).eval()


def pad_prompts(prompts, side):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        span = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, span], mask[i, span] = p, 1
    return ids, mask


# Decoder-only models are left-padded (as for generation); BERT pools its first slot and BART numbers encoder
# positions 0..L-1 whatever the mask says, so those two are right-padded, as their tokenizers do.
PAD_SIDE = {"bert": "right", "bart": "right"}



def run_cli(argv, capsys):
    """-> (exit code, stdout, stderr) of prefixtune.cli.main.main."""
    from prefixtune.cli.main import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err

# ---- serving engines: adapters, offline references, event collectors --------------------------------------
def three_adapters(kind="llama"):
    model = pt.attach(make(kind), pt.PrefixConfig(num_virtual_tokens=5), "a")
    model.add_adapter("b", pt.PrefixConfig(num_virtual_tokens=9))
    model.add_adapter("c", pt.PrefixConfig(num_virtual_tokens=3, projection=True, projection_dim=32))
    return model.eval()


def offline(model, prompt, name, max_new):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         adapter_names=[name], do_sample=False, max_new_tokens=max_new)
    toks = out[0, len(prompt):].tolist()
    eos = model.base_model.generation_config.eos_token_id
    return toks[: toks.index(eos) + 1] if eos in toks else toks


class Collector:
    """on_event callbacks that gather tokens/text per request and signal when all are done."""

    def __init__(self, n):
        self.n, self.tokens, self.text, self.final = n, {}, {}, {}
        self.done = threading.Event()

    def __call__(self, key):
        def on_event(ev):
            self.tokens.setdefault(key, []).extend(ev.token_ids)
            self.text[key] = self.text.get(key, "") + ev.text
            if ev.finish_reason:
                self.final[key] = ev
                if len(self.final) == self.n:
                    self.done.set()
        return on_event

    def wait(self, timeout=60):
        assert self.done.wait(timeout), f"only {len(self.final)}/{self.n} requests finished"
        return self


def random_workload(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 128, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    names = [["a", "b", "c", None][i % 4] for i in range(n)]
    max_new = [int(x) for x in torch.randint(1, 16, (n,), generator=g)]
    return prompts, names, max_new


def lively(model, seed=0):
    """Tiny random BART repeats one token whatever the input; noise on the weights and N(0,1) prefixes make
    outputs depend on prompt and adapter, so equality below means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.base_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for p in model.prefixes.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def offline_seq2seq(model, prompt, name, max_new):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         adapter_names=[name], do_sample=False, num_beams=1, max_new_tokens=max_new)
    toks = out[0, 1:].tolist()  # after the decoder start token
    eos = model.base_model.generation_config.eos_token_id
    return toks[: toks.index(eos) + 1] if eos in toks else toks


def metric(text: str, name: str, **labels) -> float:
    """One sample of a /metrics page, parsed by prometheus_client's own parser (KeyError when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    return samples[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]


class LiveServer:
    """The app around `engine` on a real uvicorn server on 127.0.0.1 (a free port), in a thread; leaving the block
    is what SIGTERM does (uvicorn drains, then the app's lifespan closes the engine)."""

    def __init__(self, engine):
        import socket

        import uvicorn

        from prefixtune.serving.api import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


# ---- several processes and servers on this machine ---------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_env() -> dict:
    """The environment for a two-process CPU run: one thread each, gloo over loopback only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env.pop("WORLD_SIZE", None)
    return env


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """`accelerate launch` starting N CPU processes. On a machine without GPUs `--cpu --num_processes N` starts ONE
    process (accelerate's simple launcher; multi-CPU there means mpirun); --multi_gpu is the launcher that starts N
    processes (torch.distributed.run), and prefixtune then sets accelerate up on CPU with gloo."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]


def torchrun(num_processes: int = 2) -> list[str]:
    """`torchrun` starting N CPU processes on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(num_processes), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port())]


def run_ok(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a command under gloo_env(); it must exit 0 (the tail of its stderr says why not)."""
    res = subprocess.run(cmd, env=gloo_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res
