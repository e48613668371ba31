"""Load a base model + tokenizer from a local directory, a Hub id, or a .gguf file.

    model, tokenizer = load_model("path/or/hub-id", dtype="auto", device="cpu")

Errors are `ModelLoadError` (a ConfigError) with a message that says what the path is and what to pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import ConfigError
from .extras import require
from .inject import CLASSIFIER_HEADS, kind_of_config

log = logging.getLogger(__name__)

DTYPES = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelLoadError(ConfigError):
    """--model does not point at a usable model."""


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """'auto' = fp32 on CPU (bf16 matmuls are slow there), bf16 on GPUs that support it, else fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _source(path: str) -> tuple[str, dict]:
    """-> (what to give from_pretrained, extra kwargs), or a ModelLoadError for local paths that aren't models."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"--model {path}: GGUF file not found; check the path")
        require("gguf", f"--model {path}")  # transformers reads GGUF weights through the gguf package
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"--model {path} is a directory without config.json, so not a transformers model; pass a "
                "directory written by save_pretrained, a Hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or a .gguf file"
            )
        return str(p), {}
    if p.exists():
        raise ModelLoadError(f"--model {path} is a file but not a .gguf; pass a model directory, a Hub id or a .gguf file")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"--model {path} does not exist; check the path (or pass a Hub id like org/name)")
    return path, {}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    src, kw = _source(path)
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
    except Exception as e:
        raise ModelLoadError(f"--model {path}: could not load a tokenizer ({type(e).__name__}: {str(e)[:300]})") from None
    if tok.pad_token_id is None:  # batching needs a pad id; eos is the usual stand-in for causal LMs
        tok.pad_token = tok.eos_token
    return tok


def load_config(path: str):
    """The model's transformers config (no weights read)."""
    from transformers import AutoConfig

    src, kw = _source(path)
    try:
        return AutoConfig.from_pretrained(src, **kw)
    except Exception as e:
        raise ModelLoadError(
            f"--model {path}: not a model I can load ({type(e).__name__}: {str(e)[:300]}). Pass a local model "
            "directory, a reachable Hub id, or a .gguf file"
        ) from None


def _head_kwargs(config, label_names) -> dict:
    """num_labels / id2label / label2id for a sequence-classification head (label id = position in label_names)."""
    if label_names is None:
        return {}
    names = [str(n) for n in label_names]
    if len(names) < 2:
        raise ModelLoadError(f"a classifier needs at least 2 labels, the data has {names}; check --label-column")
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _checkpoint_labels(config) -> list[str] | None:
    """The label names a checkpoint's head was trained for; None where they are transformers' LABEL_i defaults."""
    names = [str(config.id2label[i]) for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names


def _reorder_head(model, order: list[int]) -> None:
    """Permute the outputs of the head's last linear layer: output j becomes the checkpoint's output order[j]."""
    from torch import nn

    from .inject import head_name

    name = head_name(model)
    layers = [m for m in getattr(model, name).modules() if isinstance(m, nn.Linear)] if name else []
    if not layers or layers[-1].out_features != len(order):
        raise ModelLoadError(f"{type(model).__name__}: cannot find the classification head's output layer to put its "
                             "labels in the data's order; pass --new-head to start a new head")
    last = layers[-1]
    with torch.no_grad():
        last.weight.copy_(last.weight[order].clone())
        if last.bias is not None:
            last.bias.copy_(last.bias[order].clone())


def _say_head(path: str, model, config, label_names, order: list[int] | None, info: dict) -> None:
    """Put a reused head's outputs in the data's order, and log what became of the checkpoint's head."""
    names, have = ", ".join(map(str, label_names)), _checkpoint_labels(config)
    head_keys = [k for k in info.get("missing_keys", []) if k.split(".")[0] in CLASSIFIER_HEADS]
    if order is not None:
        _reorder_head(model, order)
        model.config.update(_head_kwargs(model.config, label_names))
        log.warning("reusing the classification head of %s: its labels are the data's, its outputs put in the data's "
                    "order (%s)", path, names)
    elif info.get("mismatched_keys"):
        log.warning("--new-head: the %d-way classification head of %s is replaced by a new %d-way head (randomly "
                    "initialised)", config.num_labels, path, len(label_names))
    elif have and not head_keys and have != [str(n) for n in label_names]:
        log.warning("reusing the classification head of %s, trained for labels %s, for the data's labels %s by position",
                    path, ", ".join(have), names)


def _mismatch(path: str, config, names: list[str]) -> ModelLoadError:
    have = _checkpoint_labels(config)
    said = f" ({', '.join(have)})" if have else ""
    return ModelLoadError(
        f"--model {path}: its classification head has {config.num_labels} outputs{said}, the data has {len(names)} "
        f"labels ({', '.join(names)}); pass --new-head to replace the head with a new {len(names)}-way one (its "
        "trained weights are dropped), or train on data with the head's labels")


# --quantize -> optimum-quanto's weight type; transformers quantizes every Linear but the output head as it loads,
# on CPU and GPU alike, and runs the rest (embeddings, norms, the prefix) in the compute dtype
QUANTIZE = {"8bit": "int8", "4bit": "int4"}


def quantization_config(quantize: str):
    """transformers' QuantoConfig for `--quantize 8bit|4bit`; a missing extra is one line naming the pip command."""
    require("quant", f"--quantize {quantize}")
    from transformers import QuantoConfig

    return QuantoConfig(weights=QUANTIZE[quantize])


def _quantize_kwargs(path: str, config, kw: dict, quantize: str) -> dict:
    """from_pretrained kwargs that load `path` quantized. A directory converted from a GGUF file keeps a
    quantization_config naming that file although its weights are plain (cli/assets.py): dropped here, else
    transformers refuses a second quantization config. A model stored quantized is refused in one line."""
    if "gguf_file" in kw:
        raise ModelLoadError(f"--quantize {quantize}: --model {path} is a GGUF file, quantized already; pass a transformers "
                             "model directory, or drop --quantize")
    method = getattr(config, "quantization_config", None)
    method = method.get("quant_method") if isinstance(method, dict) else getattr(method, "quant_method", method)
    if method is not None and str(getattr(method, "value", method)) != "gguf":
        raise ModelLoadError(f"--quantize {quantize}: --model {path} is stored quantized already ({method}); drop --quantize")
    extra = {"quantization_config": quantization_config(quantize)}
    if method is not None:
        del config.quantization_config
        extra["config"] = config
    return extra


def load_model(path: str, dtype: str | torch.dtype = "auto", device: str | None = None, task: str | None = None,
               label_names: list[str] | None = None, new_head: bool = False, quantize: str | None = None):
    """-> (model in eval mode on `device`, tokenizer).

    The head follows `inject.kind_of_config`: encoders (BERT family) get AutoModelForSequenceClassification with one
    output per entry of `label_names` (default: the config's labels), encoder-decoders AutoModelForSeq2SeqLM,
    others AutoModelForCausalLM. With `task`, a model/task pair the CLI cannot train correctly is refused.
    An encoder checkpoint's own head is reused when its labels are the data's (in the data's order); a head of another
    size is an error unless `new_head` (transformers' ignore_mismatched_sizes: a new head, said in the log).
    `quantize` ("8bit"/"4bit"): the weights are stored quantized (QUANTIZE), frozen; for prefix training.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification


    src, kw = _source(path)
    config = load_config(path)
    kind = kind_of_config(config, task)
    cls = {"encoder": AutoModelForSequenceClassification, "seq2seq": AutoModelForSeq2SeqLM}.get(kind, AutoModelForCausalLM)
    order = None
    if kind == "encoder" and label_names is not None:
        names, have = [str(n) for n in label_names], _checkpoint_labels(config)
        if have and sorted(have) == sorted(names) and have != names:  # same labels, another order: reuse, reordered
            order = [have.index(n) for n in names]
        else:
            kw.update(_head_kwargs(config, label_names))
        if new_head:
            kw["ignore_mismatched_sizes"] = True
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    head = kind == "encoder" and label_names is not None
    if quantize:
        kw.update(_quantize_kwargs(path, config, kw, quantize))
    try:
        model = cls.from_pretrained(src, dtype=torch_dtype, output_loading_info=head, **kw)
    except Exception as e:
        if head and "ignore_mismatched_sizes" in str(e):
            raise _mismatch(path, config, [str(n) for n in label_names]) from None
        raise ModelLoadError(f"--model {path}: loading the weights failed ({type(e).__name__}: {str(e)[:300]})") from None
    if head:
        model, info = model
        _say_head(path, model, config, label_names, order, info)
    tok = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


def check_classifier(model, label_names) -> None:
    """An encoder given to `train` must carry a sequence-classification head with one output per label."""
    has_head = any(hasattr(model, n) for n in CLASSIFIER_HEADS)
    n = getattr(model.config, "num_labels", None)
    if not has_head or n != len(label_names):
        raise ModelLoadError(
            f"{type(model).__name__} cannot classify {len(label_names)} labels {list(label_names)}: an encoder trains with "
            f"a sequence-classification head of that size (AutoModelForSequenceClassification.from_pretrained(..., "
            f"num_labels={len(label_names)})){'' if has_head else '; this model has no classification head'}"
        )
