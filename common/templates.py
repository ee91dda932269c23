"""How a prompt becomes token ids, once, for every consumer (sampling, teacher scoring, the learner, validation and
`learner.evaluate` all read the ids made here, so a response is scored under exactly the prompt it was sampled
from).

Templates:
- `dolly`: the paper's wrapper (common/data.py: format_prompt) around the instruction and its context;
- `chat`: the tokenizer's own chat template (`apply_chat_template(..., add_generation_prompt=True)`) over the
  example's turns (chat data) or one user turn (the instruction, then its context);
- `none`: the prompt text as it is (the instruction, then its context; chat turns' contents joined).
`auto` (data.template's default): `dolly` for Dolly data; for chat and prompt data `chat` when the tokenizer has a
chat template, else `dolly`.
"""

from __future__ import annotations

from typing import Any

from common.data import DataError, Example

TEMPLATES = ("auto", "chat", "dolly", "none")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, fmt: str, tokenizer: Any) -> str:
    """data.template after `auto`; `chat` with a tokenizer that has none is a DataError."""
    if template == "auto":
        return "chat" if fmt != "dolly" and has_chat_template(tokenizer) else "dolly"
    if template == "chat" and not has_chat_template(tokenizer):
        raise DataError(
            "chat, but the tokenizer has no chat template (tokenizer_config.json chat_template or "
            "chat_template.jinja): use dolly or none, or a tokenizer with one"
        )
    return template


def messages(ex: Example) -> list[dict[str, str]]:
    """The prompt as chat messages: chat data's own turns, else one user turn."""
    if ex.turns:
        return [{"role": role, "content": content} for role, content in ex.turns]
    return [{"role": "user", "content": plain_text(ex)}]


def plain_text(ex: Example) -> str:
    return ex.instruction.strip() + (f"\n\n{ex.context.strip()}" if ex.context.strip() else "")


def _ids(out: Any) -> list[int]:
    """apply_chat_template's token ids, whichever container this transformers version returns."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def render_prompt_text(ex: Example, tokenizer: Any, template: str) -> str:
    """The prompt as text (for samples files and logs)."""
    if template == "chat":
        return str(tokenizer.apply_chat_template(messages(ex), add_generation_prompt=True, tokenize=False))
    if template == "none":
        return plain_text(ex)
    return ex.prompt


def render_prompt_ids(ex: Example, tokenizer: Any, template: str) -> list[int]:
    """The prompt's token ids under `template` (`dolly`, `chat` or `none`; resolve `auto` first)."""
    if template == "chat":
        try:
            return _ids(tokenizer.apply_chat_template(messages(ex), add_generation_prompt=True, tokenize=True))
        except Exception as exc:  # noqa: BLE001 - a template may raise anything (jinja, roles it refuses)
            raise DataError(f"the chat template cannot render a prompt: {str(exc).splitlines()[0]}") from None
    if template == "none":
        return tokenizer.encode(plain_text(ex), add_special_tokens=False)
    if template == "dolly":
        return tokenizer.encode(ex.prompt, add_special_tokens=False)
    raise DataError(f"unknown template {template!r} (one of chat, dolly, none)")
