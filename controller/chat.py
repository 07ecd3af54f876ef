"""Chat messages to prompt tokens, with the chat template stored in the GGUF.

Models converted by llama.cpp carry a Jinja template under `tokenizer.chat_template`;
it is rendered with llama-cpp-python's formatter, the one llama.cpp's own server mirrors.
A model without one (such as the reference model) gets a plain "Role: text" transcript.
"""
from __future__ import annotations

PLAIN_TEMPLATE = ("{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant:{% endif %}")


def render(template: str | None, messages: list[dict], bos_text: str, eos_text: str) -> str:
    """The prompt text of a conversation, ending where the assistant's answer starts."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=template or PLAIN_TEMPLATE, eos_token=eos_text, bos_token=bos_text)
    return fmt(messages=messages).prompt


def chat_tokens(tok, messages: list[dict]) -> list[int]:
    """Prompt token ids for messages ({"role", "content"} with string content)."""
    text = render(tok.chat_template, messages, tok.bos_text, tok.eos_text)
    # a template that writes BOS itself must not get a second one
    starts_with_bos = bool(tok.bos_text) and text.startswith(tok.bos_text)
    return tok.encode(text, add_bos=not starts_with_bos, special=tok.chat_template is not None)
