"""Chat templates: a conversation (``messages``) becomes the prompt text a model reads.

A checkpoint that was tuned for chat carries its own template, a Jinja2 program, in
``chat_template.jinja`` or in ``tokenizer_config.json``'s ``chat_template`` (a string,
or a list of named templates, of which ``default`` is used). It is rendered as Hugging
Face's ``apply_chat_template`` renders it: Jinja2's *immutable sandbox* (templates come
from checkpoints, i.e. strangers), ``trim_blocks`` and ``lstrip_blocks``, the
``raise_exception``, ``strftime_now``, ``tojson``, ``dict`` and ``namespace`` helpers,
the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables, and
``add_generation_prompt=True`` (the prompt ends where the assistant's answer starts).

GPT-NeoX-20B and Pythia are base models with no template; they get
:data:`DEFAULT_TEMPLATE`, the plain transcript ``neoxq finetune`` trains chat data in
(``train.data.render_chat``; a test holds the two equal), ending with ``Assistant:`` for
the model to continue::

    System: <system message>

    User: <user message>

    Assistant: <assistant message><|endoftext|>

    User: <user message>

    Assistant:

A model fine-tuned on it ends its answer with end-of-text (``finish_reason: "stop"``); a
base model will often go on to write the next ``User:`` turn itself: give
``"stop": ["\\nUser:"]`` to end the answer there. ``--chat-template FILE`` on
``neoxq worker``/``up``/``run``/``generate`` replaces either template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

# (Separators are written as expressions: trim_blocks eats a newline after a block tag.)
DEFAULT_TEMPLATE = (
    "{% set names = {'system': 'System', 'developer': 'System', 'user': 'User', "
    "'assistant': 'Assistant'} %}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ names[message['role']] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|endoftext|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}"
    "{{ 'Assistant:' }}{% endif %}"
)

# tokenizer_config.json keys whose values templates read as variables (HF passes the
# tokenizer's special_tokens_map).
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                   "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A conversation the template refuses (``raise_exception``) or cannot render."""


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # HF templates may mark assistant text with {% generation %} (for training masks);
        # rendering a prompt only needs the text inside.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body
                                          ).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters; HF's does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        # As HF's: no underscore-prefixed attributes (no way to reach CPython internals).
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name: object) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    env.globals["namespace"] = Namespace
    return env


class ChatTemplate:
    """A compiled chat template and the special-token variables it may read.

    ``source`` names where it came from (a file, a checkpoint, or "default").
    """

    def __init__(self, text: str, special_tokens: Mapping[str, str] | None = None, *,
                 source: str = "default") -> None:
        import jinja2

        self.text = text
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(text)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ValueError(f"chat template {source}: line {exc.lineno}: {exc.message}"
                             ) from None

    @classmethod
    def default(cls, special_tokens: Mapping[str, str] | None = None) -> ChatTemplate:
        """The plain transcript for base models (:data:`DEFAULT_TEMPLATE`)."""
        return cls(DEFAULT_TEMPLATE, special_tokens, source="default")

    def render(self, messages: Sequence[Mapping[str, Any]], *,
               add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages``; :class:`ChatTemplateError` when the template
        refuses them (roles out of order, say)."""
        import jinja2

        try:
            return self._template.render(
                messages=[dict(m) for m in messages], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.source})"


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in _SPECIAL_TOKENS:
        v = config.get(key)
        if isinstance(v, dict):  # an AddedToken written out: {"content": ..., ...}
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def load_chat_template(
    checkpoint: str | Path | None = None, *, template_file: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> ChatTemplate:
    """The template a worker renders chats with: ``template_file`` when given (a Jinja2
    file, ``--chat-template``), else the checkpoint's own (``chat_template.jinja`` or
    ``tokenizer_config.json`` in the checkpoint's folder or the tokenizer's), else the
    plain default. Special-token variables come from ``tokenizer_config.json`` when
    there is one; the default template reads none."""
    folders = []
    for p in (checkpoint, tokenizer):
        if p is None:
            continue
        p = Path(p)
        folder = p if p.is_dir() else p.parent if p.is_file() else None
        if folder is not None and folder not in folders:
            folders.append(folder)
    config: dict[str, Any] = {}
    config_file = None
    for folder in folders:
        f = folder / "tokenizer_config.json"
        if f.is_file():
            config_file = f
            try:
                config = json.loads(f.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ValueError(f"{f}: not JSON ({exc})") from None
            break
    special = _special_tokens(config)
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file not found: {path}")
        return ChatTemplate(path.read_text(encoding="utf-8"), special, source=str(path))
    for folder in folders:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return ChatTemplate(jinja.read_text(encoding="utf-8"), special, source=str(jinja))
    text = config.get("chat_template")
    if isinstance(text, list):  # named templates: [{"name", "template"}]
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default")
    if isinstance(text, str) and text:
        return ChatTemplate(text, special, source=str(config_file))
    return ChatTemplate.default(special)
