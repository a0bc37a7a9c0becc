"""JSONL request lines, native and OpenAI Batch, validated one line at a time.

Pure functions and small classes: no database, no broker, no torch. The API and the CLI
feed raw lines (bytes) to :class:`LineValidator` as they stream in; every problem becomes
a :class:`LineError` naming the line, the field and what was expected, so a bad line in a
50,000-line file is found without reading the file twice or holding it whole.

Two line shapes:

- native: ``{"prompt": str | [int], "custom_id"?: str, <sampling fields>...}``, or
  ``"messages"`` (a chat) instead of ``"prompt"``
- OpenAI Batch: ``{"custom_id": str, "method": "POST", "url": "/v1/completions",
  "body": {"model": str, "prompt": str | [int], <sampling fields>...}}``, or
  ``"url": "/v1/chat/completions"`` with ``"body": {"model", "messages", ...}`` (chat's
  ``logprobs: bool`` + ``top_logprobs`` and ``max_completion_tokens`` are mapped to the
  sampling fields). Every line's ``url`` is the batch's endpoint, as OpenAI requires.

The sampling fields and their rules are ``specs.sampling``'s (the one place they are
written, shared with the engine's ``SamplingParams``).
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, create_model

from specs import sampling
from specs import sampling as sampling_spec  # (parse_* shadow the name with a local)

# ---------------------------------------------------------------------------------------
# Sampling fields: derived from specs/sampling.py, the one place they are written
# ---------------------------------------------------------------------------------------

MAX_CUSTOM_ID = 512  # items.custom_id is VARCHAR(512)

# What a field is when neither the line nor the batch gives it.
SAMPLING_DEFAULTS: dict[str, Any] = dict(sampling.DEFAULTS)
SAMPLING_FIELDS: frozenset[str] = frozenset(sampling.FIELDS)
# Each field's type, as SamplingParams declares it.
SAMPLING_TYPES: dict[str, Any] = get_type_hints(sampling.SamplingParams)

# Per-request sampling fields as they appear on a line or in batch defaults (for schemas
# and documentation); each optional: ``null`` = not given, the batch default and then the
# field's own default apply. The checks themselves are :func:`check_sampling`'s.
SamplingFields: type[BaseModel] = create_model(
    "SamplingFields", __config__=ConfigDict(extra="forbid", strict=True),
    **{name: (SAMPLING_TYPES[name] | None, None) for name in sampling.FIELDS},
)


# Values quoted back in error messages are cut short: a bad 1 MB list (or one nested 900
# deep) must give a one-line message, not a copy of itself.
_quote = reprlib.Repr()
_quote.maxstring, _quote.maxother, _quote.maxlevel = 80, 80, 3


def quoted(value: object) -> str:
    """``repr(value)``, shortened for an error message."""
    return _quote.repr(value)


# Strings the store cannot hold faithfully: U+0000 (PostgreSQL text refuses it) and lone
# surrogates (JSON can escape them, "\ud800", but they are not Unicode text: UTF-8 encoders,
# the database drivers and the JSON responses all refuse them). Refused on every backend
# alike, naming the field, so a file means the same on SQLite and PostgreSQL.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None."""
    if "\x00" in value:
        return "NUL characters (\\u0000) are not allowed"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"a lone surrogate (\\u{ord(value[exc.start]):04x}) is not valid Unicode "
                "text")
    return None


def find_bad_text(value: object, path: str = "") -> tuple[str, str] | None:
    """The first ``(field path, problem)`` of a decoded JSON value whose strings (keys
    included) cannot be stored; None when all are fine. Iterative: depth is not a risk."""
    stack: list[tuple[object, str]] = [(value, path)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if (why := text_problem(v)) is not None:
                return where, why
        elif isinstance(v, dict):
            for k, item in v.items():
                sub = f"{where}.{k}" if where else str(k)
                if (why := text_problem(str(k))) is not None:
                    return where or "(key)", why
                stack.append((item, sub))
        elif isinstance(v, list):
            stack.extend((item, where) for item in reversed(v))
    return None


def check_sampling(
    given: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Validate sampling fields as ``SamplingParams.from_dict(given, defaults)`` would.

    Returns ``(clean, problems)``: ``clean`` is ``given`` without nulls (``stop`` as a
    list), ``problems`` a list of ``(field, "what was expected, got value")`` - every bad
    field, not just the first. Cross-field rules (min_tokens <= max_tokens) see the
    batch defaults and the fields' own defaults, as the worker will.
    """
    clean = {k: v for k, v in given.items() if v is not None}
    problems = [(name, "not a known field (known: " + ", ".join(sorted(SAMPLING_FIELDS))
                 + f"), got {quoted(clean[name])}")
                for name in sorted(k for k in clean if k not in SAMPLING_FIELDS)]
    if isinstance(clean.get("stop"), str):
        clean["stop"] = [clean["stop"]]
    merged = {**SAMPLING_DEFAULTS,
              **{k: v for k, v in (defaults or {}).items()
                 if v is not None and k in SAMPLING_FIELDS},
              **{k: v for k, v in clean.items() if k in SAMPLING_FIELDS}}
    if isinstance(merged.get("stop"), str):
        merged["stop"] = [merged["stop"]]
    return clean, problems + sampling.sampling_problems(merged)


def check_defaults(defaults: Mapping[str, Any]) -> list[str]:
    """Problems with batch-level defaults, as ``"field: expected, got value"`` strings."""
    if not isinstance(defaults, Mapping):
        return [f"defaults: must be an object, got {quoted(defaults)}"]
    bad = find_bad_text(dict(defaults))
    if bad is not None:
        return [f"{bad[0] or 'defaults'}: {bad[1]}"]
    _, problems = check_sampling(defaults)
    return [f"{name}: {msg}" for name, msg in problems]


# ---------------------------------------------------------------------------------------
# Lines
# ---------------------------------------------------------------------------------------

Format = Literal["native", "openai"]
COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
OPENAI_URLS = (COMPLETIONS_URL, CHAT_URL)
# An item parameter (not a sampling field) for OpenAI's ``echo``: "prompt" = the prompt's
# tokens with their logprobs come before the completion's; "score" = only those
# (``max_tokens: 0``, how evaluation tools score text over HTTP). The worker pops it.
ECHO = "echo"
CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 2048
# Chat body fields that are not sampling fields of ours but map onto them.
_CHAT_MAPPED = {"logprobs", "top_logprobs", "max_completion_tokens"}
# OpenAI body fields we accept but do not act on, and the only values that make sense.
_OPENAI_IGNORED = {"user"}
_OPENAI_FIXED: dict[str, tuple[Any, ...]] = {
    "stream": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "logit_bias": ({},),
    "stream_options": ({},),
}


@dataclass(frozen=True, slots=True)
class LineError:
    """One problem: ``line`` is 1-based (0 for the file as a whole); ``code`` is OpenAI's
    where OpenAI has one (``invalid_json_line``, ``duplicate_custom_id``, ``empty_file``,
    ``too_many_tasks``, ``invalid_url``, ...); ``custom_id`` is the line's, when it has a
    valid one of its own (so a caller can match the error to its request)."""

    line: int
    field: str | None
    code: str
    message: str
    custom_id: str | None = None
    # False for a problem with one request's content that OpenAI reports per request (a
    # bad response_format schema): the line becomes a failed item and the file is not
    # refused for it.
    fatal: bool = True

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"

    def as_dict(self) -> dict[str, Any]:
        """JSON shape stored in ``batches.errors`` (OpenAI's ``errors.data`` entries)."""
        return {"line": self.line or None, "param": self.field, "code": self.code,
                "message": str(self), "custom_id": self.custom_id}


@dataclass(slots=True)
class ParsedLine:
    """A line turned into a request (or not: ``errors`` non-empty)."""

    line: int
    custom_id: str | None = None
    prompt: str | list[int] = ""
    messages: list[dict[str, str]] | None = None  # a chat, normalised (see check_messages)
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    url: str | None = None  # an OpenAI line's url
    errors: list[LineError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def fatal(self) -> bool:
        """A problem that refuses the whole file (in ``on_invalid="refuse"`` mode)."""
        return any(e.fatal for e in self.errors)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _type_name(v: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def parse_json_line(raw: bytes | str, line: int) -> tuple[dict[str, Any] | None, LineError | None]:
    """Decode one line to a JSON object, or say why not (bytes, JSON, not an object)."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")  # strict: raw bytes can never hold a lone surrogate
        except UnicodeDecodeError as exc:
            return None, LineError(line, None, "invalid_utf8",
                                   f"not valid UTF-8 (byte {exc.start + 1} of the line)")
    else:
        text = raw
    if line == 1 and text.startswith("\ufeff"):  # a byte-order mark some editors write
        text = text[1:]
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        col = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        return None, LineError(line, None, "invalid_json_line",
                               f"invalid JSON: {msg}{col}")
    except RecursionError:
        return None, LineError(line, None, "invalid_json_line",
                               "invalid JSON: nested too deeply")
    if not isinstance(obj, dict):
        return None, LineError(line, None, "invalid_json_line",
                               f"a JSON object expected, got {_type_name(obj)}")
    if _SUSPECT_ESCAPE.search(text) and (bad := find_bad_text(obj)) is not None:
        cid = obj.get("custom_id")
        ok_cid = isinstance(cid, str) and _check_custom_id(cid, line, False) is None
        return None, LineError(line, bad[0], "invalid_value", bad[1],
                               custom_id=cid if ok_cid else None)
    return obj, None


def _check_prompt(value: object, field_name: str, line: int) -> LineError | None:
    if value is None:
        return LineError(line, field_name, "missing_prompt", "required, a string expected")
    if isinstance(value, str):
        return None if value else LineError(line, field_name, "invalid_value",
                                            "a non-empty string expected, got ''")
    if isinstance(value, list) and value and all(sampling.is_int(t) and t >= 0 for t in value):
        return None
    return LineError(line, field_name, "invalid_value",
                     "a string or a non-empty list of token ids expected (one prompt per line),"
                     f" got {_type_name(value)}")


def check_messages(value: object, field_name: str, line: int
                   ) -> tuple[list[dict[str, str]] | None, LineError | None]:
    """A chat's ``messages`` as ``[{"role", "content": str, "name"?}]``, or the first
    problem. Content may be a string or OpenAI's list of text parts (joined with newlines,
    as vLLM does); other part types (images, audio) and tool calls are refused."""
    def err(where: str, msg: str) -> tuple[None, LineError]:
        return None, LineError(line, where, "invalid_value", msg)

    if not isinstance(value, list) or not value:
        return err(field_name, f"a non-empty list of messages expected, got {quoted(value)}")
    if len(value) > MAX_MESSAGES:
        return err(field_name, f"at most {MAX_MESSAGES} messages, got {len(value)}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            return err(where, f"a message object expected, got {_type_name(m)}")
        if unknown := sorted(str(k) for k in m if k not in ("role", "content", "name")):
            return err(f"{where}.{unknown[0]}", "unknown or unsupported message field "
                       "(expected role, content, name)")
        role = m.get("role")
        if role not in CHAT_ROLES:
            return err(f"{where}.role", f"one of {', '.join(CHAT_ROLES)} expected, "
                       f"got {quoted(role)}")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}):
                    return err(f"{where}.content[{j}]", "a text part "
                               f"{{'type': 'text', 'text': str}} expected, got {quoted(part)}")
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            return err(f"{where}.content", "a string or a list of text parts expected, got "
                       f"{quoted(content)}")
        msg = {"role": role, "content": content}
        if "name" in m:
            if not isinstance(m["name"], str) or not m["name"]:
                return err(f"{where}.name", f"a non-empty string expected, got "
                           f"{quoted(m['name'])}")
            msg["name"] = m["name"]
        out.append(msg)
    return out, None


def _chat_sampling(body: Mapping[str, Any], line: int
                   ) -> tuple[dict[str, Any], list[LineError]]:
    """A chat body's sampling fields, with OpenAI chat's own names mapped onto ours:
    ``logprobs`` (bool) + ``top_logprobs`` -> ``logprobs`` (count of alternatives),
    ``max_completion_tokens`` -> ``max_tokens``."""
    errors: list[LineError] = []
    fields_ = {k: v for k, v in body.items() if k in SAMPLING_FIELDS and k != "logprobs"}
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want is not None and not isinstance(want, bool):
        errors.append(LineError(line, "body.logprobs", "invalid_value",
                                f"true, false or null expected, got {quoted(want)}"))
    elif top is not None and want is not True:
        errors.append(LineError(line, "body.top_logprobs", "invalid_value",
                                "requires logprobs: true"))
    elif want:
        fields_["logprobs"] = 0 if top is None else top
    mct = body.get("max_completion_tokens")
    if mct is not None:
        if body.get("max_tokens") is not None and body["max_tokens"] != mct:
            errors.append(LineError(line, "body.max_completion_tokens", "invalid_value",
                                    "give max_completion_tokens or max_tokens, not both"))
        fields_["max_tokens"] = mct
    return fields_, errors


def _check_custom_id(value: object, line: int, required: bool) -> LineError | None:
    if value is None:
        return LineError(line, "custom_id", "missing_custom_id", "required, a string expected") \
            if required else None
    if not isinstance(value, str) or not value:
        return LineError(line, "custom_id", "invalid_value",
                         f"a non-empty string expected, got {quoted(value)}")
    if len(value) > MAX_CUSTOM_ID:
        return LineError(line, "custom_id", "invalid_value",
                         f"at most {MAX_CUSTOM_ID} characters expected, got {len(value)}")
    if (why := text_problem(value)) is not None:
        return LineError(line, "custom_id", "invalid_value", why)
    return None


def parse_native(obj: Mapping[str, Any], line: int,
                 defaults: Mapping[str, Any] | None = None) -> ParsedLine:
    """A native line: ``{"prompt", "custom_id"?, <sampling fields>}``."""
    out = ParsedLine(line=line)
    for key in sorted(k for k in obj if k not in SAMPLING_FIELDS and k not in
                      ("prompt", "messages", "custom_id")):
        out.errors.append(LineError(line, key, "unknown_field",
                                    "unknown field (expected prompt or messages, custom_id or a "
                                    "sampling field: " + ", ".join(sorted(SAMPLING_FIELDS))
                                    + ")"))
    messages = None
    if obj.get("messages") is not None:
        if obj.get("prompt") is not None:
            out.errors.append(LineError(line, "messages", "invalid_value",
                                        "give prompt or messages, not both"))
        messages, err = check_messages(obj["messages"], "messages", line)
        if err:
            out.errors.append(err)
    elif err := _check_prompt(obj.get("prompt"), "prompt", line):
        out.errors.append(err)
    if err := _check_custom_id(obj.get("custom_id"), line, required=False):
        out.errors.append(err)
    else:
        out.custom_id = obj.get("custom_id")
    sampling = {k: v for k, v in obj.items() if k in SAMPLING_FIELDS}
    out.params, problems = check_sampling(sampling, defaults)
    out.errors += [LineError(line, f, "invalid_value", m,
                             fatal=not sampling_spec.is_constraint_field(f))
                   for f, m in problems]
    if not out.errors:
        if messages is not None:
            out.messages = messages
        else:
            out.prompt = obj["prompt"]
    return out


def parse_openai(obj: Mapping[str, Any], line: int,
                 defaults: Mapping[str, Any] | None = None) -> ParsedLine:
    """An OpenAI Batch line: ``{"custom_id", "method": "POST", "url", "body": {...}}``."""
    out = ParsedLine(line=line)
    for key in sorted(k for k in obj if k not in ("custom_id", "method", "url", "body")):
        out.errors.append(LineError(line, key, "unknown_field",
                                    "unknown field (expected custom_id, method, url, body)"))
    if err := _check_custom_id(obj.get("custom_id"), line, required=True):
        out.errors.append(err)
    else:
        out.custom_id = obj["custom_id"]
    if obj.get("method") != "POST":
        out.errors.append(LineError(line, "method", "invalid_method",
                                    f"'POST' expected, got {quoted(obj.get('method'))}"))
    url = obj.get("url")
    if url not in OPENAI_URLS:
        out.errors.append(LineError(line, "url", "invalid_url",
                                    f"{' or '.join(map(repr, OPENAI_URLS))} expected, "
                                    f"got {quoted(url)}"))
    else:
        out.url = url
    chat = url == CHAT_URL
    body = obj.get("body")
    if not isinstance(body, dict):
        out.errors.append(LineError(line, "body", "invalid_value",
                                    f"an object expected, got {_type_name(body)}"))
        return out
    known = SAMPLING_FIELDS | {"model"} | _OPENAI_IGNORED | set(_OPENAI_FIXED)
    known |= {"messages"} | _CHAT_MAPPED if chat else {"prompt", ECHO}
    for key in sorted(k for k in body if k not in known):
        out.errors.append(LineError(line, f"body.{key}", "unknown_field",
                                    "unknown or unsupported field"))
    for key, allowed in _OPENAI_FIXED.items():
        if body.get(key) is not None and body[key] not in allowed:
            out.errors.append(LineError(line, f"body.{key}", "invalid_value",
                                        f"{allowed[0]!r} or null expected (not supported), "
                                        f"got {quoted(body[key])}"))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        out.errors.append(LineError(line, "body.model", "invalid_value",
                                    f"a model name expected, got {quoted(model)}"))
    messages = None
    echo = None
    if chat:
        messages, err = check_messages(body.get("messages"), "body.messages", line)
        sampling, mapped = _chat_sampling(body, line)
        out.errors += [err] if err else []
        out.errors += mapped
    else:
        if err := _check_prompt(body.get("prompt"), "body.prompt", line):
            out.errors.append(err)
        echo = body.get(ECHO)
        if echo is not None and not isinstance(echo, bool):
            out.errors.append(LineError(line, f"body.{ECHO}", "invalid_value",
                                        f"true, false or null expected, got {quoted(echo)}"))
        score_only = echo is True and body.get("max_tokens") == 0
        sampling = {k: v for k, v in body.items() if k in SAMPLING_FIELDS
                    and not (score_only and k == "max_tokens")}
    out.params, problems = check_sampling(sampling, defaults)
    out.errors += [LineError(line, f"body.{f}", "invalid_value", m,
                             fatal=not sampling_spec.is_constraint_field(f))
                   for f, m in problems]
    if echo is True:
        out.params[ECHO] = "score" if score_only else "prompt"
    if not out.errors:
        if chat:
            out.messages = messages
        else:
            out.prompt = body["prompt"]
        out.model = model
    return out


class LineValidator:
    """Validates a file line by line, keeping only what spans lines (custom_ids seen,
    counts). Call :meth:`feed` for every raw line, then :meth:`finish`.

    ``fmt="auto"`` decides from the first line that is a JSON object: OpenAI if it has a
    ``body`` or ``url``, native otherwise.

    ``endpoint``: the batch's (OpenAI's ``/v1/completions`` or ``/v1/chat/completions``);
    every OpenAI line's ``url`` must be it. Without one, the first line's url sets it for
    the rest of the file (:attr:`endpoint` then says which).
    """

    def __init__(self, fmt: Format | Literal["auto"] = "native", *,
                 defaults: Mapping[str, Any] | None = None, max_lines: int = 50_000,
                 endpoint: str | None = None) -> None:
        self.fmt = fmt
        self.endpoint = endpoint if endpoint in OPENAI_URLS else None
        self._endpoint_line = 0  # the line whose url set the endpoint (0: the batch's)
        self.defaults = dict(defaults or {})
        self.max_lines = max_lines
        self.line = 0  # physical lines seen
        self.requests = 0  # non-blank lines seen
        self.first_model: str | None = None
        self._seen: dict[str, int] = {}  # custom_id -> line it first appeared on

    @property
    def too_many(self) -> bool:
        return self.requests > self.max_lines

    def feed(self, raw: bytes | str) -> ParsedLine | None:
        """Validate the next line; None for a blank line (not a request)."""
        self.line += 1
        line = self.line
        if not raw.strip():
            return None
        self.requests += 1
        obj, err = parse_json_line(raw, line)
        if err is not None:
            return ParsedLine(line=line, custom_id=err.custom_id, errors=[err])
        assert obj is not None
        if self.fmt == "auto":
            self.fmt = "openai" if ("body" in obj or "url" in obj) else "native"
        parser = parse_openai if self.fmt == "openai" else parse_native
        parsed = parser(obj, line, self.defaults)
        if parsed.url is not None:
            if self.endpoint is None:
                self.endpoint, self._endpoint_line = parsed.url, line
            elif parsed.url != self.endpoint:
                whose = (f"line {self._endpoint_line}'s url" if self._endpoint_line
                         else "the batch's endpoint")
                parsed.errors.insert(0, LineError(
                    line, "url", "invalid_url",
                    f"every line's url must be the batch's endpoint {self.endpoint!r} "
                    f"({whose}), got {parsed.url!r}"))
        cid = parsed.custom_id
        if cid is not None:
            first = self._seen.get(cid)
            if first is not None:
                # Not this line's id to report: it names the request on line `first`.
                parsed.custom_id = None
                parsed.errors.append(LineError(line, "custom_id", "duplicate_custom_id",
                                               f"{quoted(cid)} already used on line {first}"))
            else:
                self._seen[cid] = line
        if parsed.errors and parsed.custom_id is not None:
            parsed.errors = [replace(e, custom_id=parsed.custom_id) for e in parsed.errors]
        if parsed.model and self.first_model is None:
            self.first_model = parsed.model
        return parsed

    def finish(self) -> list[LineError]:
        """File-level problems, known only at the end: empty file, too many lines."""
        errors = []
        if self.requests == 0:
            errors.append(LineError(0, None, "empty_file", "the file has no requests"))
        if self.too_many:
            errors.append(LineError(0, None, "too_many_tasks",
                                    f"at most {self.max_lines} requests per file, "
                                    f"got {self.requests}"))
        return errors
