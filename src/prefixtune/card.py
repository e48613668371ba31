"""The README.md (model card) written beside every saved adapter."""

from __future__ import annotations

import json
from pathlib import Path

AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
}


def trainable_parameter_count(peft_cfg: dict, cfg, tensors: dict) -> int:
    """Parameters trained for this adapter: the prefix table (or embedding + projection MLP) and any head."""
    P = int(peft_cfg["num_virtual_tokens"])
    table = tensors.get("prompt_embeddings")
    out = int(table.shape[1]) if table is not None else 0
    if getattr(cfg, "projection", False):
        d, h = int(peft_cfg["token_dim"]), int(cfg.projection_dim)
        n = P * d + (d * h + h) + (h * out + out)
    else:
        n = P * out
    return n + sum(t.numel() for k, t in tensors.items() if k.startswith("base_model."))


def write_model_card(directory: Path, peft_cfg: dict, cfg, tensors: dict, metrics: dict | None = None) -> None:
    n_params = sum(t.numel() for t in tensors.values())
    size_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    base = peft_cfg.get("base_model_name_or_path") or "unknown"
    extra = getattr(cfg, "extra", None) or {}
    metrics = metrics or extra.get("metrics")
    data = extra.get("data", "not recorded")
    task = extra.get("task")
    auto = AUTO_CLASS.get(peft_cfg.get("task_type"), "AutoModelForCausalLM")
    trainable = trainable_parameter_count(peft_cfg, cfg, tensors)
    labels = extra.get("labels")  # encoder classifiers: the head's outputs, in order
    head_kw = f", num_labels={len(labels)}" if labels else ""
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [prefix-tuning, prefixtune]",
        "---",
        f"# Prefix-tuning adapter for `{base}`",
        "",
        f"- base model: `{base}`",
        f"- task: {task + ' (' + peft_cfg['task_type'] + ')' if task else peft_cfg['task_type']}",
        f"- training data: {data}",
        f"- virtual tokens: {peft_cfg['num_virtual_tokens']} in {peft_cfg['num_layers']} layers"
        f" (token_dim {peft_cfg['token_dim']}, placement {getattr(cfg, 'placement', 'decoder')})",
        f"- trainable parameters: {trainable:,}" + (" (embedding + projection MLP)" if cfg.projection else ""),
        f"- stored parameters: {n_params:,} ({size_mb:.2f} MB)",
        f"- trained with projection MLP: {cfg.projection} (folded into `prompt_embeddings`)",
    ]
    if labels:
        lines.append(f"- classification head (trained with the prefix, saved as peft's `modules_to_save`): "
                     f"{len(labels)} labels, ids 0..{len(labels) - 1} = {', '.join(map(str, labels))}")
    if metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2, default=str), "```"]
    else:
        lines += ["", "## Metrics", "", "not recorded"]
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "import prefixtune as pt",
        f"from transformers import {auto}",
        f"base = {auto}.from_pretrained({base!r}{head_kw})",
        "model = pt.load_adapter(base, 'path/to/this/adapter')  # or a Hub id: 'user/repo'",
        "",
        "# or with peft",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base, 'path/to/this/adapter')",
        "```",
        "",
        "Command line: `prefixtune info path/to/this/adapter --model <base>` checks that it fits a base model.",
        "",
    ]
    (Path(directory) / "README.md").write_text("\n".join(lines))
