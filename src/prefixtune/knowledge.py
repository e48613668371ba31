"""How a knowledge prefix's requests are rendered: exactly the layout its student was trained on.

A knowledge prefix (`prefixtune distill`) stands where the document stood: the system message of the model's
chat template. The student saw, after its P key/values,

    middle + user turn + footer [+ answer + between + user turn + footer ...]

where `header` is what the template puts before the system text, `middle` what lies between the system text and the
first user turn, `footer` what follows a user turn up to the answer, and `between` what follows an answer up to the
next user turn. Each part is tokenized on its own (as training did), so a served request meets the very ids the
prefix learnt. The run records these parts (`layout`) in the adapter's task.json; training (training/selfstudy.py),
`serve` (every backend: serving/api.py), `generate`, `Generator.chat` and Python callers all render through
`chat_ids` here (`request_ids`: any chat request, as the server renders it).

Rules: a chat request for a knowledge prefix brings user (and assistant) turns only, starting and ending with a
user turn. A system message is refused (LayoutError -> HTTP 400): the prefix already is the system message, and
the template's default system message (SmolLM2's inserts one) is never added.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK_FILE = "task.json"
_DOC, _Q1, _A1, _Q2 = "QQDOCUMENTQQ", "QQQUERYQQ", "QQANSWERQQ", "QQSECONDQQ"  # locate the slots in the template


class LayoutError(ValueError):
    """A request that cannot be rendered in the trained layout (a system message, turns out of order)."""


def template_layout(tokenizer) -> dict:
    """The parts of `tokenizer`'s chat template around the document slot; a plain "Question:/Answer:" layout for a
    tokenizer without a template (or one that has no system slot). `between` is None when the template renders a
    first turn otherwise than a later one (then only single-turn requests keep the trained layout)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": _DOC}, {"role": "user", "content": _Q1}]
        one = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if [one.count(s) for s in (_DOC, _Q1)] == [1, 1] and one.index(_DOC) < one.index(_Q1):
            header, rest = one.split(_DOC)
            middle, footer = rest.split(_Q1)
            two = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": _A1},
                                                        {"role": "user", "content": _Q2}],
                                                tokenize=False, add_generation_prompt=True)
            between = None
            if two.startswith(header + _DOC + middle + _Q1 + footer + _A1) and two.endswith(_Q2 + footer):
                between = two[len(header + _DOC + middle + _Q1 + footer + _A1): -len(_Q2 + footer)]
            return {"template": "chat", "header": header, "middle": middle, "footer": footer, "between": between}
    return {"template": "plain", "header": "", "middle": "\n\nQuestion: ", "footer": "\nAnswer:",
            "between": "\n\nQuestion: "}


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def chat_ids(tokenizer, messages: list[dict], layout: dict) -> list[int]:
    """The ids that follow the prefix for a chat request: user/assistant turns in the trained layout."""
    roles = [m.get("role") for m in messages]
    if "system" in roles or "developer" in roles:
        raise LayoutError("this adapter is a knowledge prefix: it stands where the system message stood, so a request "
                          "for it must not bring one; send user (and assistant) turns only")
    if not roles or roles[0] != "user" or roles[-1] != "user" or any(
            r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise LayoutError("a request for a knowledge prefix alternates user and assistant turns, starting and ending "
                          f"with a user turn; got roles {roles}")
    if len(messages) > 1 and layout.get("between") is None:
        raise LayoutError("this model's chat template renders later turns otherwise than the first, so the knowledge "
                          "prefix keeps its trained layout for single-turn requests only; send one user turn")
    ids = encode(tokenizer, layout["middle"])
    for i, m in enumerate(messages):
        content = m.get("content") or ""
        if i % 2 == 0:
            ids += encode(tokenizer, content) + encode(tokenizer, layout["footer"])
        else:
            ids += encode(tokenizer, content) + encode(tokenizer, layout["between"])
    return ids


def request_ids(tokenizer, messages: list[dict], layout: dict | None) -> list[int]:
    """A chat request's prompt ids, as `serve` renders them for every backend: in the trained layout for a knowledge
    prefix (`layout`), else by the tokenizer's chat template (or "role: content" lines when it has none)."""
    if layout is not None:
        return chat_ids(tokenizer, messages, layout)
    if getattr(tokenizer, "chat_template", None):  # the template writes its own special tokens
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text)["input_ids"])


def query_ids(tokenizer, query: str, layout: dict) -> list[int]:
    """One user turn in the trained layout (what `chat_ids` gives for [{"role": "user", "content": query}])."""
    return chat_ids(tokenizer, [{"role": "user", "content": query}], layout)


def read_layout(adapter_dir: str | Path) -> dict | None:
    """The layout a knowledge prefix was trained with (its task.json, in or next to the adapter); None otherwise."""
    for p in (Path(adapter_dir) / TASK_FILE, Path(adapter_dir).parent / TASK_FILE):
        if p.is_file():
            try:
                info = json.loads(p.read_text())
            except (OSError, ValueError):
                return None
            return info.get("layout") if info.get("task") == "distill" else None
    return None
