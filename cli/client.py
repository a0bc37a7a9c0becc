"""The HTTP client commands: ``neoxq submit|status|results|errors|cancel|batches|workers``.

They talk to a running ``neoxq api`` (``--url``/``NEOXQ_API_URL``, default
http://127.0.0.1:8000) with ``--api-key``/``NEOXQ_API_KEY``. Only httpx (and tqdm for the
progress bar) are imported: ``neoxq submit`` starts fast and needs no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from specs.status import TERMINAL, BatchStatus

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """An error to print and exit with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_parser(sub: Any) -> None:
    """Register the client commands on the root parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None,
                        help=f"API server (default $NEOXQ_API_URL or {DEFAULT_URL})")
    common.add_argument("--api-key", default=None, help="bearer key (default $NEOXQ_API_KEY)")

    p = sub.add_parser("submit", parents=[common], help="submit a file of prompts as a batch",
                       description="Upload a JSONL file (native or OpenAI Batch lines) or "
                                   "plain text (one prompt per line) and print the batch id; "
                                   "with --wait, show progress and write the results.")
    p.add_argument("file", type=Path)
    p.add_argument("--wait", action="store_true", help="wait, with a progress bar, and "
                                                       "write the results (-o or stdout)")
    p.add_argument("-o", "--output", type=Path, default=None, help="results file (--wait)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--min-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("-n", "--n", type=int, help="samples per prompt")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--format", choices=("auto", "native", "openai", "text"), default="auto",
                   help="auto: .jsonl/.json/.ndjson files and files whose first line is a "
                        "JSON object are JSONL (native or OpenAI, by their lines), anything "
                        "else plain text with one prompt per line")
    p.add_argument("--include-prompt", action="store_true",
                   help="with --wait: each result also carries its prompt (from FILE)")
    p.add_argument("--on-invalid", choices=("refuse", "record"), default="refuse",
                   help="refuse: one bad line refuses the file; record: bad lines become "
                        "item errors and the rest runs")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", default=[])
    p.add_argument("--model", default=None,
                   help="the model to run on (`neoxq models` lists them; default the "
                        "deployment's); OpenAI lines name theirs")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls (--wait)")
    p.set_defaults(func=_cmd_submit)

    s = sub.add_parser("status", parents=[common], help="a batch's state and progress",
                       description="Show a batch's state, counts, tokens/s and ETA (without "
                                   "ID: the most recent batches).")
    s.add_argument("batch_id", nargs="?")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(func=_cmd_status)

    r = sub.add_parser("results", parents=[common], help="download a batch's results (JSONL)")
    r.add_argument("batch_id")
    r.add_argument("-o", "--output", type=Path, default=None, help="file (default stdout)")
    r.set_defaults(func=_cmd_results)

    e = sub.add_parser("errors", parents=[common], help="a batch's failed items (JSONL)")
    e.add_argument("batch_id")
    e.add_argument("-o", "--output", type=Path, default=None, help="file (default stdout)")
    e.set_defaults(func=_cmd_errors)

    c = sub.add_parser("cancel", parents=[common], help="cancel a batch")
    c.add_argument("batch_id")
    c.set_defaults(func=_cmd_cancel)

    b = sub.add_parser("batches", parents=[common], help="list your batches, newest first")
    b.add_argument("--limit", type=int, default=20)
    b.add_argument("--after", default=None, help="a batch id: list those after it")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_batches)

    w = sub.add_parser("workers", parents=[common], help="workers seen in the last hour")
    w.set_defaults(func=_cmd_workers)
    m = sub.add_parser("models", parents=[common], help="models the live workers serve",
                       description="Models live workers serve (batches name one), with "
                                   "their workers, dtypes and pipeline sizes; --all adds "
                                   "known names no live worker serves now.")
    m.add_argument("--all", action="store_true", help="every known name, served or not")
    m.set_defaults(func=_cmd_models)


# ---------------------------------------------------------------------------- plumbing


def connect(url: str | None = None, api_key: str | None = None) -> Any:
    """An ``httpx.Client`` for the API at ``url`` (default ``$NEOXQ_API_URL``) with
    ``api_key`` (default ``$NEOXQ_API_KEY``)."""
    import httpx

    url = url or os.environ.get("NEOXQ_API_URL") or DEFAULT_URL
    key = api_key or os.environ.get("NEOXQ_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers,
                        timeout=httpx.Timeout(30.0, read=600.0))


def _client(args: argparse.Namespace) -> Any:
    return connect(args.url, args.api_key)


def check(resp: Any) -> Any:
    """``resp`` if it succeeded, else :class:`ClientError` with the API's error message
    (and the first bad lines of a refused file)."""
    if resp.status_code < 400:
        return resp
    try:
        resp.read()
        err = resp.json().get("error", {})
    except Exception:  # noqa: BLE001 - not our JSON: show the text
        raise ClientError(f"HTTP {resp.status_code}: {resp.text[:500]}") from None
    lines = [f"error ({resp.status_code}): {err.get('message', resp.text[:500])}"]
    for e in (err.get("errors") or [])[:20]:
        lines.append(f"  {e.get('message')}")
    more = len(err.get("errors") or []) - 20
    if more > 0:
        lines.append(f"  ... and {more} more")
    if err.get("batch_id"):
        lines.append(f"  (batch {err['batch_id']}; `neoxq errors {err['batch_id']}` lists all)")
    raise ClientError("\n".join(lines))


def run_command(args: argparse.Namespace, fn: Any) -> int:
    """Run ``fn(client, args)`` with a client for ``args`` (``--url``, ``--api-key``),
    printing API and connection errors instead of raising; the exit code."""
    import httpx

    try:
        with _client(args) as client:
            return fn(client, args)
    except ClientError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except httpx.TransportError as exc:
        url = args.url or os.environ.get("NEOXQ_API_URL") or DEFAULT_URL
        print(f"error: cannot reach the API at {url}: {exc}", file=sys.stderr)
        return 2


def _file_chunks(f: IO[bytes], block: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(block):
        yield chunk


def download(client: Any, path: str, output: Path | None, *,
             prompts_from: Path | None = None) -> int:
    """Stream a JSONL route (results, errors) to ``output`` (stdout if None); returns the
    lines written. ``prompts_from``: the input file, whose prompt each result gains as
    ``prompt`` (joined on ``line``, which names the input file's line)."""
    n = 0
    with client.stream("GET", path) as resp:
        check(resp)
        out = output.open("wb") if output else sys.stdout.buffer
        try:
            if prompts_from is None:
                for chunk in resp.iter_bytes():
                    n += chunk.count(b"\n")
                    out.write(chunk)
            else:
                prompts = _InputPrompts(prompts_from)
                for line in resp.iter_lines():
                    if line.strip():
                        out.write(_with_prompt(json.loads(line), prompts).encode() + b"\n")
                        n += 1
            out.flush()
        finally:
            if output:
                out.close()
    return n


class _InputPrompts:
    """The prompt of line N of an input file, reading the file forward only: results come
    in input order, so the join holds one line in memory, whatever the file's size."""

    def __init__(self, path: Path) -> None:
        self._file = path.open(encoding="utf-8")
        self._lineno = 0
        self._prompt: Any = None

    def at(self, lineno: int) -> Any:
        while self._lineno < lineno:
            raw = self._file.readline()
            if not raw:
                return None
            self._lineno += 1
            self._prompt = prompt_of(raw)
        return self._prompt if self._lineno == lineno else None


def prompt_of(raw: str) -> Any:
    """The prompt of one input line: a native ``{"prompt"}`` line, an OpenAI Batch line's
    ``body.prompt``, or the line itself in a plain-text file."""
    text = raw.rstrip("\r\n")
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    if not isinstance(obj, dict):
        return text
    if isinstance(obj.get("body"), dict):
        return obj["body"].get("prompt")
    return obj.get("prompt")


def _with_prompt(row: dict[str, Any], prompts: _InputPrompts) -> str:
    line = row.get("line")
    prompt = prompts.at(line) if isinstance(line, int) else None
    out: dict[str, Any] = {}
    for key, value in row.items():
        out[key] = value
        if key == "line":  # beside the line it came from
            out["prompt"] = prompt
    out.setdefault("prompt", prompt)
    return json.dumps(out, ensure_ascii=False)


# Suffixes that always mean JSONL: such a file is never reread as plain text, so a broken
# first line is reported as such instead of becoming a prompt.
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def is_plain_text(path: Path) -> bool:
    """Whether FILE is plain text, one prompt per line, rather than JSONL: its name does
    not end in .jsonl/.json/.ndjson and its first non-blank line is not a JSON object."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        return False
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                try:
                    return not isinstance(json.loads(line), dict)
                except ValueError:
                    return True
    return False


def text_to_jsonl(path: Path, dst: Path) -> Path:
    """Plain text (one prompt per line) as native JSONL at ``dst``. Blank lines stay blank
    lines (not requests), so every result's ``line`` is still the input file's line."""
    with path.open(encoding="utf-8") as src, dst.open("w", encoding="utf-8") as out:
        for line in src:
            text = line.rstrip("\r\n")
            out.write(json.dumps({"prompt": text}, ensure_ascii=False) + "\n"
                      if text.strip() else "\n")
    return dst


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _summary(b: dict[str, Any]) -> str:
    c = b["counts"]
    lines = [f"{b['id']}  {b['status']}",
             f"  items     {c['completed'] + c['failed']}/{c['total']} done "
             f"({c['completed']} ok, {c['failed']} failed, {b['progress']:.1%})",
             f"  tokens    {b['tokens']['completion']} generated, "
             f"{b['tokens']['prompt']} prompt; {b['tokens_per_s']:.1f} tok/s "
             + ("over the run" if b["status"] in TERMINAL else "now"),
             f"  eta       {_eta(b['eta_s'])}"]
    if b.get("model"):
        lines.insert(1, f"  model     {b['model']}")
    if b.get("waiting"):
        lines.append(f"  waiting   {b['waiting']}")
    for e in (b.get("errors") or [])[:10]:
        lines.append(f"  error     {e['message']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- commands


def batch_params(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The query parameters of ``POST /batches`` from the submit options on ``args``
    (batch-level defaults, ``--metadata``); options ``args`` lacks are skipped."""
    params: list[tuple[str, Any]] = []
    for name in ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed", "n"):
        if getattr(args, name, None) is not None:
            params.append((name, getattr(args, name)))
    if getattr(args, "ignore_eos", None):
        params.append(("ignore_eos", "true"))
    params += [("stop", s) for s in getattr(args, "stop", None) or []]
    if getattr(args, "model", None):
        params.append(("model", args.model))
    metadata = getattr(args, "metadata", None)
    if metadata:
        meta = dict(m.split("=", 1) if "=" in m else (m, "") for m in metadata)
        params.append(("metadata", json.dumps(meta)))
    return params


def submit_file(client: Any, path: Path, params: list[tuple[str, Any]], *,
                fmt: str = "auto") -> dict[str, Any]:
    """Upload ``path`` as a batch and return the batch object. Plain text (see
    :func:`is_plain_text`, or ``fmt="text"``) is sent as native JSONL, one prompt per line."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="neoxq-submit-") as tmp:
        if fmt == "text" or (fmt == "auto" and is_plain_text(path)):
            print(f"{path}: plain text, one prompt per line", file=sys.stderr)
            path = text_to_jsonl(path, Path(tmp) / (path.stem + ".jsonl"))
            fmt = "native"
        params = [("format", fmt), ("filename", path.name), *params]
        with path.open("rb") as f:
            resp = client.post("/batches", params=params, content=_file_chunks(f),
                               headers={"Content-Type": "application/x-ndjson",
                                        "Content-Length": str(path.stat().st_size)})
        return check(resp).json()


def finish_line(batch: dict[str, Any], n: int, output: Path | None) -> str:
    """What a waited-for batch ends with: state, results written, failures, overall rate."""
    where = f" to {output}" if output else ""
    text = (f"{batch['status']}: wrote {n} results{where}; {batch['counts']['failed']} "
            f"failed{_overall_rate(batch)}")
    if batch["counts"]["failed"]:
        text += f"\n  `neoxq errors {batch['id']}` lists the failed items"
    return text


def _cmd_submit(args: argparse.Namespace) -> int:
    """Submit FILE; print the batch id; with --wait, follow it and write the results."""
    if not args.file.is_file():
        print(f"error: {args.file}: no such file", file=sys.stderr)
        return 1
    if args.include_prompt and not args.wait:
        print("error: --include-prompt needs --wait (it joins the results with FILE)",
              file=sys.stderr)
        return 2

    def go(client: Any, args: argparse.Namespace) -> int:
        batch = submit_file(client, args.file, [("on_invalid", args.on_invalid),
                                                *batch_params(args)], fmt=args.format)
        print(batch["id"], flush=True)
        if not args.wait:
            return 0
        batch = follow(client, batch, args.poll)
        n = download(client, f"/batches/{batch['id']}/results", args.output,
                     prompts_from=args.file if args.include_prompt else None)
        print(finish_line(batch, n, args.output), file=sys.stderr)
        return 0 if batch["status"] == BatchStatus.COMPLETED else 1

    return run_command(args, go)


def follow(client: Any, batch: dict[str, Any], poll: float) -> dict[str, Any]:
    """Poll a batch until it is terminal, drawing a progress bar on stderr."""
    from tqdm import tqdm

    total = batch["counts"]["total"]
    with tqdm(total=total, unit="item", desc=batch["id"][:18], file=sys.stderr,
              dynamic_ncols=True) as bar:
        while True:
            c = batch["counts"]
            bar.n = c["completed"] + c["failed"]
            state = batch.get("waiting") or batch["status"]
            bar.set_postfix_str(f"{batch['tokens_per_s']:.1f} tok/s, ETA {_eta(batch['eta_s'])}"
                                f", {state}", refresh=False)
            bar.refresh()
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(poll)
            batch = check(client.get(f"/batches/{batch['id']}")).json()


def _cmd_status(args: argparse.Namespace) -> int:
    """Show one batch (or, without ID, the recent ones)."""
    if not args.batch_id:
        args.limit, args.after = 10, None
        return _cmd_batches(args)

    def go(client: Any, args: argparse.Namespace) -> int:
        b = check(client.get(f"/batches/{args.batch_id}")).json()
        print(json.dumps(b, indent=2) if args.json else _summary(b))
        return 0

    return run_command(args, go)


def _cmd_results(args: argparse.Namespace) -> int:
    """Write a batch's results (JSONL, input order; partial while it runs)."""
    return run_command(args, lambda client, a: (download(client, f"/batches/{a.batch_id}/results",
                                                    a.output), 0)[1])


def _cmd_errors(args: argparse.Namespace) -> int:
    """Write a batch's failed items (JSONL: line, field, reason)."""
    return run_command(args, lambda client, a: (download(client, f"/batches/{a.batch_id}/errors",
                                                    a.output), 0)[1])


def _cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a batch; finished results are kept."""

    def go(client: Any, args: argparse.Namespace) -> int:
        b = check(client.post(f"/batches/{args.batch_id}/cancel")).json()
        print(f"{b['id']}  {b['status']}")
        return 0

    return run_command(args, go)


def _cmd_batches(args: argparse.Namespace) -> int:
    """List batches, newest first."""

    def go(client: Any, args: argparse.Namespace) -> int:
        params = {"limit": args.limit, **({"after": args.after} if args.after else {})}
        page = check(client.get("/batches", params=params)).json()
        if getattr(args, "json", False):
            print(json.dumps(page, indent=2))
            return 0
        print(f"{'ID':<32} {'STATUS':<12} {'DONE':>13} {'FAILED':>7} {'TOK/S':>8}  CREATED")
        for b in page["data"]:
            c = b["counts"]
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(b["created_at"]))
            print(f"{b['id']:<32} {b['status']:<12} "
                  f"{str(c['completed'] + c['failed']) + '/' + str(c['total']):>13} "
                  f"{c['failed']:>7} {b['tokens_per_s']:>8.1f}  {created}"
                  + (f"  ({b['waiting']})" if b.get("waiting") else ""))
        if page["has_more"]:
            print(f"(more: --after {page['last_id']})")
        return 0

    return run_command(args, go)


def _cmd_models(args: argparse.Namespace) -> int:
    """List the models live workers serve (``GET /v1/models``)."""

    def go(client: Any, args: argparse.Namespace) -> int:
        rows = check(client.get("/v1/models", params={"all": "true"} if args.all else {}))
        print(f"{'MODEL':<40} {'KIND':<10} {'WORKERS':>7}  DTYPES / PP  CHECKPOINT")
        for m in rows.json()["data"]:
            pp = ",".join(map(str, m["pipeline_parallel"]))
            shape = f"{','.join(m['dtypes']) or '-'} / {pp or '-'}"
            print(f"{m['id']:<40} {m['kind']:<10} {m['workers']:>7}  {shape:<11}  "
                  f"{m.get('checkpoint') or '-'}")
        return 0

    return run_command(args, go)


def _cmd_workers(args: argparse.Namespace) -> int:
    """List workers seen in the last hour (model, devices, status, tokens/s)."""

    def go(client: Any, args: argparse.Namespace) -> int:
        rows = check(client.get("/workers")).json()["data"]
        print(f"{'ID':<28} {'STATUS':<9} {'TOK/S':>8} {'ITEMS':>8} {'PREFIX':>6} {'SEEN':>6}  "
              "MODEL (DEVICES)")
        for w in rows:
            ago = max(0, int(time.time() - w["last_seen"]))
            hits = f"{100 * w.get('prefix_cache_hit_rate', 0.0):.0f}%"
            print(f"{w['id']:<28} {w['status']:<9} {w['tokens_per_s']:>8.1f} "
                  f"{w['items_done']:>8} {hits:>6} {str(ago) + 's':>6}  {w['model']} "
                  f"({', '.join(map(str, w['devices']))})")
        return 0

    return run_command(args, go)


def _overall_rate(batch: dict[str, Any]) -> str:
    """", N tokens in S s (R tok/s)" over the whole run, once a batch has ended (the
    progress bar shows the live rate: the last 10 s of generation)."""
    start, end = batch.get("in_progress_at"), batch.get("completed_at")
    tokens = batch["tokens"]["completion"]
    if not start or not end or end <= start:
        return ""
    secs = end - start
    return f"; {tokens} completion tokens in {secs:.1f} s ({tokens / secs:.1f} tok/s)"
