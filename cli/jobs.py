"""`neoxq jobs create|list|status|events|cancel`: fine-tuning jobs through the API.

They talk to a running ``neoxq api`` like the batch commands (``--url``/``NEOXQ_API_URL``,
``--api-key``/``NEOXQ_API_KEY``), over OpenAI's routes (``/v1/files`` with
``purpose=fine-tune``, ``/v1/fine_tuning/jobs``); ``neoxq trainer`` processes run the jobs.
Only httpx is imported: no torch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cli.client import ClientError, check, run_command
from specs.status import JOB_TERMINAL

JOBS = "/v1/fine_tuning/jobs"


def add_parser(sub: Any) -> None:
    """Register `jobs` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None,
                        help="API server (default $NEOXQ_API_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key", default=None, help="bearer key (default $NEOXQ_API_KEY)")
    p = sub.add_parser("jobs", help="fine-tuning jobs: create, list, status, events, cancel",
                       description="Fine-tuning jobs run by `neoxq trainer` processes; a "
                                   "succeeded job's model (ft:BASE:SUFFIX:JOBID) is served by "
                                   "`neoxq worker --model NAME` and named by batches.")
    jobs = p.add_subparsers(dest="jobs_command", metavar="COMMAND")

    c = jobs.add_parser("create", parents=[common], help="upload training data, create a job",
                        description="Upload --train (and --validation) with purpose "
                                    "fine-tune (every line is checked; bad lines are listed) "
                                    "and create a job fine-tuning MODEL on them.")
    c.add_argument("model", help="the base model's name (`neoxq models --all`), or an "
                                 "earlier fine-tune's ft:... name")
    c.add_argument("--train", required=True, type=Path,
                   help="chat, prompt/completion or {\"text\"} JSONL")
    c.add_argument("--validation", type=Path)
    c.add_argument("--suffix", help="part of the result's name ft:BASE:SUFFIX:JOBID")
    c.add_argument("--seed", type=int)
    c.add_argument("--epochs", type=int, help="n_epochs (default auto)")
    c.add_argument("--batch-size", type=int, help="sequences per step (default auto)")
    c.add_argument("--lr-multiplier", type=float,
                   help="learning_rate_multiplier: times the method's default rate")
    c.add_argument("--method", choices=("lora", "full"), default=None)
    c.add_argument("--lora-rank", type=int)
    c.add_argument("--max-length", type=int, help="tokens per packed sequence")
    c.add_argument("--max-steps", type=int, help="train exactly N steps")
    c.add_argument("--save-every", type=int, help="checkpoint every N steps (default 50)")
    c.add_argument("--wait", action="store_true", help="follow its events until it ends")
    c.set_defaults(func=_cmd_create)

    ls = jobs.add_parser("list", parents=[common], help="your jobs, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--after", default=None, help="a job id: list those after it")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_list)

    s = jobs.add_parser("status", parents=[common], help="a job's state and latest losses")
    s.add_argument("job_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_status)

    e = jobs.add_parser("events", parents=[common], help="a job's events, oldest first")
    e.add_argument("job_id")
    e.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    e.add_argument("--poll", type=float, default=2.0)
    e.set_defaults(func=_cmd_events)

    x = jobs.add_parser("cancel", parents=[common], help="cancel a job")
    x.add_argument("job_id")
    x.set_defaults(func=_cmd_cancel)
    p.set_defaults(func=lambda _args: p.print_help() or 2)


def upload_training_file(client: Any, path: Path) -> str:
    """Upload ``path`` with purpose fine-tune; its file id (bad lines: a ClientError
    listing them)."""
    try:
        with path.open("rb") as f:
            resp = client.post("/v1/files", files={"file": (path.name, f)},
                               data={"purpose": "fine-tune"})
    except OSError as exc:
        raise ClientError(f"error: cannot read {path}: {exc.strerror}") from None
    return check(resp).json()["id"]


def job_body(args: argparse.Namespace, training: str, validation: str | None
             ) -> dict[str, Any]:
    """The ``POST /v1/fine_tuning/jobs`` body for ``neoxq jobs create``'s options."""
    hp = {k: v for k, v in {"n_epochs": args.epochs, "batch_size": args.batch_size,
                            "learning_rate_multiplier": args.lr_multiplier}.items()
          if v is not None}
    neoxq = {k: v for k, v in {"method": args.method, "lora_rank": args.lora_rank,
                               "max_length": args.max_length, "max_steps": args.max_steps,
                               "save_every": args.save_every}.items() if v is not None}
    body: dict[str, Any] = {"model": args.model, "training_file": training,
                            "method": {"type": "supervised",
                                       "supervised": {"hyperparameters": hp},
                                       "neoxq": neoxq}}
    for key, value in (("validation_file", validation), ("suffix", args.suffix),
                       ("seed", args.seed)):
        if value is not None:
            body[key] = value
    return body


def _line(job: dict[str, Any]) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job["created_at"]))
    return (f"{job['id']:<32} {job['status']:<17} {job['model']:<24} {created}  "
            f"{job.get('fine_tuned_model') or ''}")


def _event_line(e: dict[str, Any]) -> str:
    at = time.strftime("%H:%M:%S", time.gmtime(e["created_at"]))
    return f"{at}  {e['level']:<5} {e['message']}"


def follow_events(client: Any, job_id: str, poll: float) -> dict[str, Any]:
    """Print a job's events oldest first as they come, until it ends; the final job."""
    seen: set[str] = set()
    while True:
        job = check(client.get(f"{JOBS}/{job_id}")).json()
        page = check(client.get(f"{JOBS}/{job_id}/events", params={"limit": 1000})).json()
        for e in reversed(page["data"]):
            if e["id"] not in seen:
                seen.add(e["id"])
                print(_event_line(e), flush=True)
        if job["status"] in JOB_TERMINAL:
            return job
        time.sleep(poll)


def _cmd_create(args: argparse.Namespace) -> int:
    """Upload the files, create the job, print its id (and follow it with --wait)."""

    def go(client: Any, args: argparse.Namespace) -> int:
        training = upload_training_file(client, args.train)
        validation = upload_training_file(client, args.validation) if args.validation else None
        job = check(client.post(JOBS, json=job_body(args, training, validation))).json()
        print(job["id"], flush=True)
        if not args.wait:
            return 0
        job = follow_events(client, job["id"], 2.0)
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            raise ClientError(f"job {job['id']} {job['status']}"
                              + (f": {err.get('message')}" if err else ""))
        print(job["fine_tuned_model"])
        return 0

    return run_command(args, go)


def _cmd_list(args: argparse.Namespace) -> int:
    """List jobs, newest first."""

    def go(client: Any, args: argparse.Namespace) -> int:
        params = {"limit": args.limit, **({"after": args.after} if args.after else {})}
        page = check(client.get(JOBS, params=params)).json()
        if args.json:
            print(json.dumps(page, indent=2))
            return 0
        print(f"{'ID':<32} {'STATUS':<17} {'MODEL':<24} {'CREATED':<19}  FINE-TUNED MODEL")
        for job in page["data"]:
            print(_line(job))
        if page["has_more"] and page["data"]:
            print(f"(more: --after {page['data'][-1]['id']})")
        return 0

    return run_command(args, go)


def _cmd_status(args: argparse.Namespace) -> int:
    """A job's state, hyperparameters, latest losses and checkpoints."""

    def go(client: Any, args: argparse.Namespace) -> int:
        job = check(client.get(f"{JOBS}/{args.job_id}")).json()
        if args.json:
            print(json.dumps(job, indent=2))
            return 0
        print(f"{job['id']}  {job['status']}")
        print(f"  model: {job['model']}  method: {job['method']['neoxq'].get('method')}  "
              f"hyperparameters: {json.dumps(job['hyperparameters'])}")
        events = check(client.get(f"{JOBS}/{args.job_id}/events",
                                  params={"limit": 50})).json()["data"]
        last = next((e for e in events if e["type"] == "metrics"), None)
        if last:
            d = last["data"] or {}
            val = d.get("valid_loss")
            print(f"  step {d.get('step')}: train loss {d.get('train_loss'):.4f}"
                  + (f", validation loss {val:.4f}" if val is not None else ""))
        ckpts = check(client.get(f"{JOBS}/{args.job_id}/checkpoints")).json()["data"]
        if ckpts:
            print("  checkpoints: " + ", ".join(str(c["step_number"]) for c in ckpts))
        if job.get("fine_tuned_model"):
            print(f"  fine-tuned model: {job['fine_tuned_model']}")
        if job.get("error"):
            print(f"  error: {job['error']['message']}")
        return 0

    return run_command(args, go)


def _cmd_events(args: argparse.Namespace) -> int:
    """Print a job's events, oldest first (``--follow``: until it ends)."""

    def go(client: Any, args: argparse.Namespace) -> int:
        if args.follow:
            follow_events(client, args.job_id, args.poll)
            return 0
        events: list[dict[str, Any]] = []
        after = None
        while True:  # every page, newest first from the API
            page = check(client.get(f"{JOBS}/{args.job_id}/events", params={
                "limit": 1000, **({"after": after} if after else {})})).json()
            events += page["data"]
            if not page["has_more"] or not page["data"]:
                break
            after = page["data"][-1]["id"]
        for e in reversed(events):
            print(_event_line(e))
        return 0

    return run_command(args, go)


def _cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job (409 for one that has finished)."""

    def go(client: Any, args: argparse.Namespace) -> int:
        job = check(client.post(f"{JOBS}/{args.job_id}/cancel")).json()
        print(f"{job['id']}  {job['status']}")
        return 0

    return run_command(args, go)
