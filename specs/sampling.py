"""The sampling parameters of one request: the one place their names, types, defaults,
limits and rules are written.

Why a package of its own: three layers need the schema and the import rules let none of
them own it for the others. The engine (``models``) samples with it and may import no
other project package; the line validator (``core``) and the API (``api``) check it
without torch and may not import ``models``. So it lives here, in a leaf package of
plain Python (no torch, no pydantic: it runs on the GPU image and in the light API
install alike) that every layer may import and that imports nothing of ours.
``models.sampling`` re-exports :class:`SamplingParams`; ``core.jsonl`` derives its
line checks and pydantic field model from it; ``api.native`` its query parameters.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MAX_STOP_STRINGS = 16  # OpenAI allows 4; more than a handful is a client bug, not a need
MAX_STOP_LENGTH = 256  # characters; each step scans (longest stop - 1) + new characters
MAX_STOP_TOKEN_IDS = 256
MAX_N = 128
MAX_LOGPROBS = 20  # OpenAI's limit for top alternatives per token
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # any value that folds into 64 bits

INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "n")
FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)

# Values quoted back in messages are cut short: a bad 1 MB list gives a one-line error.
_quote = reprlib.Repr()
_quote.maxstring, _quote.maxother, _quote.maxlevel = 80, 80, 3


@dataclass
class SamplingParams:
    """How to sample one request. ``validate()`` runs on construction."""

    max_tokens: int = 64
    """Most tokens to generate per sample (>= 1); the context length may stop it earlier."""
    min_tokens: int = 0
    """EOS and ``stop_token_ids`` are banned, stop strings ignored, until this many tokens."""
    temperature: float = 1.0
    """Divides the logits (>= 0); 0 means greedy (argmax, no randomness)."""
    top_k: int = 0
    """Keep the k most likely tokens (ties at the k-th value kept); 0 or -1 = off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose mass reaches p (0 < p <= 1)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's ([0, 1])."""
    repetition_penalty: float = 1.0
    """CTRL/HF style (> 0): positive logits of prompt+output tokens are divided by it,
    negative ones multiplied."""
    presence_penalty: float = 0.0
    """OpenAI ([-2, 2]): subtracted once from the logit of every token in the output."""
    frequency_penalty: float = 0.0
    """OpenAI ([-2, 2]): subtracted per occurrence of the token in the output."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sample; excluded from the text. A single str is accepted."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a sample (in addition to EOS); excluded from the text."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks); EOS is then an ordinary token."""
    seed: int | None = None
    """Per-request seed; None lets the engine pick one at arrival."""
    n: int = 1
    """Independent samples per prompt (1..128), sharing one prefill."""
    logprobs: int | None = None
    """Return each chosen token's logprob and this many top alternatives (0..20)."""
    response_format: dict[str, Any] | None = None
    """OpenAI's structured output: ``{"type": "json_schema", "json_schema": {"name",
    "schema", "strict"?}}`` (output is JSON valid against the schema),
    ``{"type": "json_object"}`` (any JSON object) or ``{"type": "text"}`` (no constraint)."""
    regex: str | None = None
    """The output matches this regular expression (whole output)."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""

    def __post_init__(self) -> None:
        # Accept the forms clients commonly send; validate() then sees only lists.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> SamplingParams:
        """Raise ``ValueError("<field>: <what was expected>, got <value>")`` on the first
        bad field; return ``self`` so calls chain."""
        problems = sampling_problems(asdict(self))
        if problems:
            name, message = problems[0]
            raise ValueError(f"{name}: {message}")
        return self

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> SamplingParams:
        """Build and validate from a request's fields, over optional batch-level defaults.

        Unknown keys (in ``d`` or ``defaults``) are an error that names them. A ``null``
        value means "not given": the default (batch-level, then the field's own) applies,
        as OpenAI's API treats it.
        """
        merged: dict[str, Any] = {}
        for source in (defaults or {}, d):
            if not isinstance(source, Mapping):
                raise ValueError(f"sampling parameters: must be an object, got {source!r}")
            unknown = sorted(str(k) for k in source if k not in FIELDS)
            if unknown:
                names = ", ".join(unknown)
                raise ValueError(f"{names}: unknown sampling parameter"
                                 f"{'s' if len(unknown) > 1 else ''}")
            merged.update({k: v for k, v in source.items() if v is not None})
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(p.to_dict()) == p``."""
        return asdict(self)

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def constraint(self) -> dict[str, Any] | None:
        """The output constraint as ``{"type": "json_schema", "schema": {...}}``,
        ``{"type": "regex", "pattern": str}`` or ``{"type": "choice", "choices": [...]}``
        (``json_object`` is the schema ``{"type": "object"}``); None when unconstrained."""
        return constraint_of(self.response_format, self.regex, self.choice)

    @property
    def has_penalties(self) -> bool:
        """True when any of the three penalties changes the logits."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def is_int(v: object) -> bool:
    """An int that is not a bool (JSON true is not 1 here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def sampling_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every problem with a full set of field values (each field present: the defaults
    merged under what was given), as ``(field, "what was expected, got value")`` in a
    fixed order. Fields of the wrong type are reported once, not range-checked too."""
    problems: list[tuple[str, str]] = []

    def bad(name: str, expected: str, got: object) -> None:
        problems.append((name, f"{expected}, got {_quote.repr(got)}"))

    for name in INT_FIELDS:
        if not is_int(values[name]):
            bad(name, "must be an integer", values[name])
    for name in FLOAT_FIELDS:
        v = values[name]
        if not is_number(v):
            bad(name, "must be a number", v)
        elif not math.isfinite(v):
            bad(name, "must be finite", v)
    typed = {n for n in (*INT_FIELDS, *FLOAT_FIELDS)} - {p[0] for p in problems}
    v = values
    if "max_tokens" in typed and v["max_tokens"] < 1:
        bad("max_tokens", "must be >= 1", v["max_tokens"])
    if {"min_tokens", "max_tokens"} <= typed and not (
            0 <= v["min_tokens"] <= max(v["max_tokens"], 0)):
        bad("min_tokens", f"must be between 0 and max_tokens ({v['max_tokens']})",
            v["min_tokens"])
    if "temperature" in typed and v["temperature"] < 0:
        bad("temperature", "must be >= 0", v["temperature"])
    if "top_k" in typed and v["top_k"] < -1:
        bad("top_k", "must be >= 1, or 0 or -1 to turn it off", v["top_k"])
    if "top_p" in typed and not 0 < v["top_p"] <= 1:
        bad("top_p", "must be in (0, 1]", v["top_p"])
    if "min_p" in typed and not 0 <= v["min_p"] <= 1:
        bad("min_p", "must be in [0, 1]", v["min_p"])
    if "repetition_penalty" in typed and v["repetition_penalty"] <= 0:
        bad("repetition_penalty", "must be > 0", v["repetition_penalty"])
    for name in ("presence_penalty", "frequency_penalty"):
        if name in typed and not -2 <= v[name] <= 2:
            bad(name, "must be in [-2, 2]", v[name])
    stop = v["stop"]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        bad("stop", "must be a string or a list of strings", stop)
    else:
        if len(stop) > MAX_STOP_STRINGS:
            bad("stop", f"at most {MAX_STOP_STRINGS} strings", len(stop))
        for s in stop:
            if not s:
                bad("stop", "strings must not be empty", s)
            elif len(s) > MAX_STOP_LENGTH:
                bad("stop", f"strings must be at most {MAX_STOP_LENGTH} characters", len(s))
    ids = v["stop_token_ids"]
    if not isinstance(ids, list) or not all(is_int(t) and t >= 0 for t in ids):
        bad("stop_token_ids", "must be a list of non-negative integers", ids)
    elif len(ids) > MAX_STOP_TOKEN_IDS:
        bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids", len(ids))
    if not isinstance(v["ignore_eos"], bool):
        bad("ignore_eos", "must be true or false", v["ignore_eos"])
    seed = v["seed"]
    if seed is not None and not (is_int(seed) and SEED_MIN <= seed <= SEED_MAX):
        bad("seed", "must be a 64-bit integer or null", seed)
    if "n" in typed and not 1 <= v["n"] <= MAX_N:
        bad("n", f"must be between 1 and {MAX_N}", v["n"])
    lp = v["logprobs"]
    if lp is not None and not (is_int(lp) and 0 <= lp <= MAX_LOGPROBS):
        bad("logprobs", f"must be an integer between 0 and {MAX_LOGPROBS} or null", lp)
    problems += constraint_problems(v)
    return problems


# ---------------------------------------------------------------------------------------
# Structured output
# ---------------------------------------------------------------------------------------

MAX_CHOICES = 1024
MAX_CHOICE_LENGTH = 4096  # characters per choice
MAX_PATTERN_LENGTH = 16_384  # characters of a regex
MAX_SCHEMA_BYTES = 256 * 1024  # a response_format's schema, as compact JSON
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
# Fields that could end or lengthen a constrained output where the grammar does not: a
# stop string inside a JSON string, EOS banned after the grammar is complete. With a
# constraint they are refused, so every output that ends with finish_reason "stop" is a
# complete match (only a max_tokens cut, "length", can leave it unfinished).
_CONFLICTS_WITH_CONSTRAINT = ("stop", "stop_token_ids", "min_tokens", "ignore_eos")


def constraint_of(response_format: Mapping[str, Any] | None, regex: str | None,
                  choice: Sequence[str] | None) -> dict[str, Any] | None:
    """The one constraint the three fields give (see :attr:`SamplingParams.constraint`);
    assumes they passed :func:`constraint_problems`."""
    if regex is not None:
        return {"type": "regex", "pattern": regex}
    if choice is not None:
        return {"type": "choice", "choices": list(choice)}
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "json_schema", "schema": {"type": "object"}}
    if kind == "json_schema":
        return {"type": "json_schema", "schema": response_format["json_schema"]["schema"]}
    return None


# Metaschema verdicts by a schema's compact JSON. The check costs milliseconds (about
# 3 ms for a five-field schema), and a batch of thousands of lines usually repeats one
# schema, which is validated again at each layer it passes (line, worker, engine).
_SCHEMA_VERDICTS: dict[str, str | None] = {}
_MAX_SCHEMA_VERDICTS = 1024


def schema_problem(schema: object) -> str | None:
    """Why ``schema`` is not a usable JSON Schema, or None. The metaschema check needs
    ``jsonschema`` (the API's install has it); where it is missing (the GPU image) only
    the shape is checked here and the grammar compiler reports the rest."""
    if not isinstance(schema, dict):
        return f"must be a JSON Schema object, got {_quote.repr(schema)}"
    try:
        text = json.dumps(schema, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return "must be a JSON-serialisable object"
    if len(text) > MAX_SCHEMA_BYTES:
        return f"at most {MAX_SCHEMA_BYTES} bytes of JSON, got {len(text)}"
    if text in _SCHEMA_VERDICTS:
        return _SCHEMA_VERDICTS[text]
    try:
        import jsonschema
    except ImportError:
        return None
    why = None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        why = f"not a valid JSON Schema ({exc.message}{' at ' + where if where else ''})"
    except RecursionError:
        why = "not a valid JSON Schema (nested too deeply)"
    if len(_SCHEMA_VERDICTS) >= _MAX_SCHEMA_VERDICTS:
        _SCHEMA_VERDICTS.clear()
    _SCHEMA_VERDICTS[text] = why
    return why


def constraint_problems(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems with ``response_format``, ``regex`` and ``choice`` in a full set of field
    values, and with fields that cannot be combined with a constraint."""
    problems: list[tuple[str, str]] = []

    def bad(name: str, expected: str, got: object) -> None:
        problems.append((name, f"{expected}, got {_quote.repr(got)}"))

    rf, regex, choice = v.get("response_format"), v.get("regex"), v.get("choice")
    given = []
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if not isinstance(rf, dict) or kind not in RESPONSE_FORMAT_TYPES:
            bad("response_format", "must be an object whose type is one of "
                + ", ".join(RESPONSE_FORMAT_TYPES), rf)
        elif unknown := sorted(set(rf) - {"type", "json_schema"}):
            bad("response_format", "unknown keys " + ", ".join(map(str, unknown)), rf)
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict):
                bad("response_format.json_schema", "must be an object with name and schema",
                    js)
            else:
                name, strict = js.get("name"), js.get("strict")
                unknown = sorted(set(js) - {"name", "schema", "strict", "description"})
                if unknown:
                    bad("response_format.json_schema",
                        "unknown keys " + ", ".join(map(str, unknown)), js)
                if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)):
                    bad("response_format.json_schema.name",
                        "must be 1-64 characters of a-z, A-Z, 0-9, _ and -", name)
                if strict is not None and not isinstance(strict, bool):
                    bad("response_format.json_schema.strict", "must be true, false or null",
                        strict)
                if "schema" not in js:
                    bad("response_format.json_schema.schema", "required", None)
                elif (why := schema_problem(js["schema"])) is not None:
                    problems.append(("response_format.json_schema.schema", why))
                given.append("response_format")
        elif kind == "json_object":
            if "json_schema" in rf:
                bad("response_format", "json_schema is only for type json_schema", rf)
            given.append("response_format")
    if regex is not None:
        if not isinstance(regex, str) or not regex or len(regex) > MAX_PATTERN_LENGTH:
            bad("regex", f"must be a non-empty string of at most {MAX_PATTERN_LENGTH} "
                "characters", regex)
        else:
            try:
                re.compile(regex)
            except re.error as exc:
                bad("regex", f"not a valid regular expression ({exc})", regex)
            given.append("regex")
    if choice is not None:
        if not (isinstance(choice, list) and choice and all(
                isinstance(c, str) and c for c in choice)):
            bad("choice", "must be a non-empty list of non-empty strings", choice)
        elif len(choice) > MAX_CHOICES:
            bad("choice", f"at most {MAX_CHOICES} strings", len(choice))
        elif any(len(c) > MAX_CHOICE_LENGTH for c in choice):
            bad("choice", f"strings must be at most {MAX_CHOICE_LENGTH} characters",
                max(map(len, choice)))
        else:
            given.append("choice")
    if len(given) > 1:
        problems.append((given[1], f"only one of response_format, regex and choice may be "
                                   f"given, got {' and '.join(given)}"))
    if given:
        defaults = {"stop": [], "stop_token_ids": [], "min_tokens": 0, "ignore_eos": False}
        for name in _CONFLICTS_WITH_CONSTRAINT:
            if name in v and v[name] != defaults[name] and v[name] is not None:
                bad(given[0], f"cannot be combined with {name} (the output ends where the "
                    f"constraint is complete; {name} could end or extend it elsewhere)",
                    v[name])
    return problems


CONSTRAINT_FIELDS = ("response_format", "regex", "choice")


def is_constraint_field(name: str) -> bool:
    """Whether a problem's field (``"response_format.json_schema.schema"``) belongs to a
    structured-output constraint: such problems concern one request's body, which OpenAI
    reports per request, not as a malformed file."""
    return name.split(".", 1)[0] in CONSTRAINT_FIELDS


# The field names, and every field's value when neither the request nor the batch gives it.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))
DEFAULTS: dict[str, Any] = SamplingParams().to_dict()
