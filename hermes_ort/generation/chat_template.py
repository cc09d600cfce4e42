"""A model's chat template, rendered as transformers' `apply_chat_template` renders it.

The template is the Jinja text of `chat_template.jinja` or of tokenizer_config.json's
`chat_template` (the file first, as transformers loads them). Rendered in a sandboxed Jinja
environment with transformers' settings (trim_blocks, lstrip_blocks, loop controls, the
`{% generation %}` tag, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML),
given `messages`, `add_generation_prompt` and the named special tokens (`bos_token`,
`eos_token`, ...). Needs `jinja2` (the `text` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hermes_ort.core.errors import InputError, TokenizerError
from hermes_ort.generation.tokenizer import read_json, special_tokens

TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ChatTemplate:
    text: str  # the Jinja source
    source: str  # the file it came from, for messages
    special: dict[str, Any]  # bos_token, eos_token, ... as the template sees them

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text; InputError with Jinja's message in one
        line when the template fails (its own `raise_exception` included)."""
        jinja2 = _jinja2()
        try:
            template = _compile(self.text)
            return template.render(
                **self.special,
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # the template's own bug or raise_exception: one line, its words
            where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            kind = "" if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: "
            one_line = " ".join(str(e).split())
            raise InputError(
                f"the chat template of {self.source} failed{where}: {kind}{one_line}"
            ) from None


def find_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The directory's chat template, None if it has none. A tokenizer_config.json with several
    named templates gives its "default" one, as transformers does without a name."""
    model_dir = Path(model_dir)
    path = model_dir / TEMPLATE_FILE
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read '{path}': {e}") from None
        return ChatTemplate(text, str(path), special_tokens(model_dir))
    config = model_dir / "tokenizer_config.json"
    given = read_json(config).get("chat_template")
    if isinstance(given, list):  # [{"name": ..., "template": ...}] as tokenizer configs store them
        given = {t.get("name"): t.get("template") for t in given if isinstance(t, dict)}
    if isinstance(given, dict):
        if "default" not in given:
            raise TokenizerError(
                f"'{config}' has several chat templates ({', '.join(map(str, given))}) and no "
                f"'default' one"
            )
        given = given["default"]
    if not given:
        return None
    return ChatTemplate(str(given), str(config), special_tokens(model_dir))


def load_chat_template(model_dir: str | Path) -> ChatTemplate:
    """`find_chat_template`, or TokenizerError saying the model has none and what to use (or
    that jinja2 is missing)."""
    found = find_chat_template(model_dir)
    if found is None:
        raise TokenizerError(
            f"'{model_dir}' has no chat template (tokenizer_config.json has no chat_template): "
            f"use `hermes-ort generate --prompt`"
        )
    _jinja2()  # missing: said now, not at the first turn
    return found


def _jinja2():
    try:
        import jinja2
    except ImportError:
        raise TokenizerError(
            "chat templates need the `jinja2` package: pip install 'hermes-ort[text]'"
        ) from None
    return jinja2


_COMPILED: dict[str, Any] = {}  # template text -> compiled template (a chat renders every turn)


def _compile(text: str):
    if text not in _COMPILED:
        _COMPILED[text] = _environment().from_string(text)
    return _COMPILED[text]


def _environment():
    """transformers' `_compile_jinja_template` environment (chat_template_utils.py)."""
    jinja2 = _jinja2()
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: marks the assistant's text for training
        masks; rendering keeps the body as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own escapes HTML characters
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
