"""The lines of a fine-tuning file: the one place their formats and per-line rules are
written.

Why here: two layers check these lines and the import rules let neither own them for the
other. ``train`` validates a file before any weight loads (``neoxq finetune``, and the
trainer running an API job); the API refuses an upload with ``purpose="fine-tune"`` whose
lines are bad, and may not import ``train`` (it never imports torch). So the per-line
rules are plain Python in this leaf package, and both call :func:`check_lines`.

A file is one of three JSONL formats, set by its first line; every line must have it:

- **chat** (OpenAI's fine-tuning format): ``{"messages": [{"role": "system" | "user" |
  "assistant", "content": str | [{"type": "text", "text": str}, ...], "weight"?: 0 | 1},
  ...]}`` with at least one assistant message to train on;
- **prompt/completion** (OpenAI's legacy format): ``{"prompt": str, "completion": str}``;
- **text**: ``{"text": str}``.

What a line *means* for training (rendering, tokens, loss masks) is ``train.data``'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
FORMAT_NAMES = ("chat", "prompt_completion", "text")


def _check_chat(obj: dict[str, Any]) -> str | None:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "field 'messages': expected a non-empty list of messages"
    trained = 0
    for i, m in enumerate(msgs):
        where = f"field 'messages[{i}]'"
        if not isinstance(m, dict):
            return f"{where}: expected an object with 'role' and 'content'"
        if m.get("role") not in CHAT_ROLES:
            return f"{where}.role: expected one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}"
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    return f"{where}.content[{j}]: expected {{'type': 'text', 'text': str}}"
        elif not isinstance(content, str):
            return f"{where}.content: expected a string or a list of text parts"
        if "weight" in m:
            if m["role"] != "assistant":
                return f"{where}.weight: only assistant messages carry a weight"
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                return f"{where}.weight: expected 0 or 1, got {m['weight']!r}"
        if m["role"] == "assistant" and m.get("weight", 1) == 1:
            trained += 1
    if not trained:
        return "field 'messages': no assistant message to train on (all absent or weight 0)"
    return None


def _check_prompt_completion(obj: dict[str, Any]) -> str | None:
    for key in ("prompt", "completion"):
        if key not in obj:
            return f"field '{key}': missing (prompt/completion lines need both)"
        if not isinstance(obj[key], str):
            return f"field '{key}': expected a string, got {type(obj[key]).__name__}"
    if not obj["completion"]:
        return "field 'completion': empty (nothing to train on)"
    return None


def _check_text(obj: dict[str, Any]) -> str | None:
    if not isinstance(obj.get("text"), str):
        return f"field 'text': expected a string, got {type(obj.get('text')).__name__}"
    if not obj["text"]:
        return "field 'text': empty"
    return None


_CHECKS = {"chat": _check_chat, "prompt_completion": _check_prompt_completion,
           "text": _check_text}


def format_of(obj: dict[str, Any]) -> str | None:
    """The format a parsed line has by its fields (chat, prompt_completion, text), or None."""
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def check_line(obj: dict[str, Any], fmt: str) -> str | None:
    """What is wrong with a parsed line of format ``fmt`` (naming the field), or None."""
    return _CHECKS[fmt](obj)


@dataclass(frozen=True, slots=True)
class BadLine:
    """One refused line: 1-based ``line`` and a message naming the field."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


# An escape that may decode to half a surrogate pair (a whole pair is fine).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_text(value: object) -> bool:
    """Every string in ``value`` (keys too) is valid Unicode. Iterative: depth is no risk."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v
    return True


@dataclass
class CheckedLines:
    """The outcome of :func:`check_lines`: the file's format (None if no line had one),
    the good lines as ``(line number, object)``, and every bad line."""

    format: str | None
    good: list[tuple[int, dict[str, Any]]]
    bad: list[BadLine]
    count: int = 0  # good lines (also with keep=False)


def check_lines(lines: Iterable[bytes], *, keep: bool = True) -> CheckedLines:
    """Check every line of a JSONL fine-tuning file (blank lines are skipped).

    The first line with a recognisable format sets the file's; a line of another format
    is refused. ``keep=False`` drops the parsed good lines (a validator that only needs
    the verdict on a large file).
    """
    fmt: str | None = None
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[BadLine] = []
    count = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            bad.append(BadLine(lineno, f"not valid JSON ({getattr(exc, 'msg', exc)})"))
            continue
        except RecursionError:  # the stdlib parser recurses once per nesting level
            bad.append(BadLine(lineno, "not valid JSON (nested too deeply)"))
            continue
        if not isinstance(obj, dict):
            bad.append(BadLine(lineno, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        if _SURROGATE_ESCAPE.search(line) and not _is_text(obj):
            # json lets "\ud800" through; the tokenizer refuses it mid-training instead.
            bad.append(BadLine(lineno, "a lone surrogate escape (\\ud800-\\udfff without "
                                       "its pair) is not Unicode text"))
            continue
        line_fmt = format_of(obj)
        if line_fmt is None:
            bad.append(BadLine(lineno, "expected 'messages' (chat), 'prompt' and 'completion', "
                               "or 'text'; found fields " + (", ".join(sorted(obj)) or "none")))
            continue
        if fmt is None:
            fmt = line_fmt
        elif line_fmt != fmt:
            bad.append(BadLine(lineno, f"a {line_fmt} line in a {fmt} file (the first line "
                               "sets the format; every line must have it)"))
            continue
        problem = check_line(obj, fmt)
        if problem:
            bad.append(BadLine(lineno, problem))
            continue
        count += 1
        if keep:
            good.append((lineno, obj))
    return CheckedLines(fmt, good, bad, count)
