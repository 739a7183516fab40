"""Chat templates: the checkpoint's ``chat_template`` (``tokenizer_config.json``), rendered with
Jinja2 in a sandbox, as transformers and vLLM render it.

The template sees ``messages`` (``role`` and ``content`` strings), ``add_generation_prompt``,
``bos_token``/``eos_token`` (from the tokenizer config, else the tokenizer's tokens for the
model's BOS/EOS ids), and ``raise_exception(message)``. As in transformers, the rendered text is
tokenized without adding special tokens: the template writes BOS itself. A
checkpoint without a template serves completions only (chat answers 400 saying so) unless
``serve --chat-template`` gives one.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from step3_jax.errors import Step3Error


class TemplateError(ValueError):
    """The template refused the messages (``raise_exception``) or failed to render them."""


def _token(value) -> str:
    """A special token as tokenizer_config.json spells it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class ChatTemplate:
    """A compiled template and the special tokens it may use."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 origin: str = "template"):
        def raise_exception(message):
            raise TemplateError(str(message))

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise Step3Error(f"{origin}: not a valid Jinja2 template (line {e.lineno}: "
                             f"{e.message})") from None
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed: {e}") from None


def load(checkpoint: str | None, override: str | None = None, *, bos_token: str = "",
         eos_token: str = "") -> ChatTemplate | None:
    """The template to serve: ``override`` (a file, or the template text itself when it
    contains Jinja markup), else the checkpoint's ``tokenizer_config.json`` ``chat_template``
    (a string, or a list of named templates: ``default``), else None. ``bos_token`` and
    ``eos_token``: the special tokens' text where ``tokenizer_config.json`` names none (the
    tokenizer's tokens for the config's BOS and EOS ids)."""
    config: dict = {}
    path = Path(checkpoint) / "tokenizer_config.json" if checkpoint else None
    if path is not None and path.exists():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Step3Error(f"{path}: cannot read ({e})") from None
    tokens = dict(bos_token=_token(config.get("bos_token")) or bos_token,
                  eos_token=_token(config.get("eos_token")) or eos_token)
    if override is not None:
        if "{{" in override or "{%" in override:
            return ChatTemplate(override, origin="--chat-template", **tokens)
        try:
            source = Path(override).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Step3Error(f"--chat-template {override}: cannot read "
                             f"({getattr(e, 'strerror', None) or e})") from None
        return ChatTemplate(source, origin=f"--chat-template {override}", **tokens)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    return ChatTemplate(source, origin=str(path), **tokens)
