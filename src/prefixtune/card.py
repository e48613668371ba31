"""The README.md (model card) written beside every saved adapter."""

from __future__ import annotations

import json
from pathlib import Path


def write_model_card(directory: Path, peft_cfg: dict, cfg, tensors: dict, metrics: dict | None = None) -> None:
    n_params = sum(t.numel() for t in tensors.values())
    size_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    base = peft_cfg.get("base_model_name_or_path") or "unknown"
    metrics = metrics or cfg.extra.get("metrics")
    data = cfg.extra.get("data", "not recorded")
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [prefix-tuning, prefixtune]",
        "---",
        f"# Prefix-tuning adapter for `{base}`",
        "",
        f"- task: {peft_cfg['task_type']}",
        f"- training data: {data}",
        f"- virtual tokens: {peft_cfg['num_virtual_tokens']} in {peft_cfg['num_layers']} layers"
        f" (token_dim {peft_cfg['token_dim']})",
        f"- stored parameters: {n_params:,} ({size_mb:.2f} MB)",
        f"- trained with projection MLP: {cfg.projection} (folded into `prompt_embeddings`)",
    ]
    if metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2), "```"]
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "import prefixtune as pt",
        "from transformers import AutoModelForCausalLM  # or AutoModelForSeq2SeqLM / ...ForSequenceClassification",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        "model = pt.load_adapter(base, 'path/to/this/adapter')",
        "",
        "# or with peft",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base, 'path/to/this/adapter')",
        "```",
        "",
    ]
    (Path(directory) / "README.md").write_text("\n".join(lines))
