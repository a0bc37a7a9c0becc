"""`neoxq generate` and `neoxq convert`: greedy output equals HF ``generate`` for every
prompt of a mixed-length file (HF checkpoint, NeoX TP=2 checkpoint, converted form)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli.main import main
from models.config import pad_vocab
from models.tokenizer import load_tokenizer
from tests.models.hf_fixtures import VARIANTS, hf_model, write_hf_dir, write_neox_checkpoint

PROMPTS = [
    "The capital of France is",
    "a",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled "
    "with the ends of worms and an oozy smell",
    "Ünïcödé — 日本語のテキスト",
    "Once upon a time",
]
MAX_TOKENS = 12


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def hf_greedy(hf, tokenizer_path: Path, prompts: list[str]) -> list[tuple[str, int, str]]:
    """(text, length, finish_reason) from HF greedy generate, one prompt at a time.

    Rows of the padded embedding beyond the tokenizer are suppressed, as neoxq's engine
    never samples ids the tokenizer does not have.
    """
    tok = load_tokenizer(tokenizer_path)
    suppress = list(range(tok.vocab_size, hf.config.vocab_size))
    out = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=MAX_TOKENS, eos_token_id=0, pad_token_id=1,
                              suppress_tokens=suppress or None)
        new = gen[0, ids.shape[1]:].tolist()
        if 0 in new:
            new = new[: new.index(0)]
            out.append((tok.decode(new), len(new), "stop"))
        else:
            out.append((tok.decode(new), len(new), "length"))
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    return f


def _check_greedy(spec: Path, hf, tokenizer_path: Path, prompts_file: Path, out: Path,
                  *extra: str) -> None:
    rc = run_cli("generate", spec, "-i", prompts_file, "-o", out, "--temperature", "0",
                 "--dtype", "float32", "--device", "cpu", "--max-tokens", MAX_TOKENS,
                 "--batch-size", 3, "--quiet", *extra)
    assert rc == 0
    got = read_jsonl(out)
    want = hf_greedy(hf, tokenizer_path, PROMPTS)
    assert [r["context"] for r in got] == PROMPTS  # input order, blank line skipped
    for r, (text, length, reason) in zip(got, want, strict=True):
        assert (r["text"], r["length"], r["finish_reason"]) == (text, length, reason), r
        assert r["finished"] == (reason == "stop")
        assert r["duration_seconds"] >= 0


@pytest.mark.slow
def test_greedy_matches_hf(tmp_path, tokenizer_path, prompts_file) -> None:
    hf = hf_model("parallel-rot25", seed=21)
    d = write_hf_dir(hf, tmp_path / "hf", tokenizer_path)
    _check_greedy(d, hf, tokenizer_path, prompts_file, tmp_path / "out.jsonl")
    # the converted form gives the same lines
    assert run_cli("convert", d, tmp_path / "nq") == 0
    _check_greedy(tmp_path / "nq", hf, tokenizer_path, prompts_file, tmp_path / "out2.jsonl")


def test_greedy_matches_hf_sequential_tied(tmp_path, tokenizer_path, prompts_file) -> None:
    hf = hf_model("sequential-rot50-tied", seed=22)
    d = write_hf_dir(hf, tmp_path / "hf", None)  # tokenizer given on the command line
    _check_greedy(d, hf, tokenizer_path, prompts_file, tmp_path / "out.jsonl",
                  "--tokenizer", tokenizer_path, "--no-prefix-caching")


def test_prefix_caching_flag_reaches_the_engine(tmp_path) -> None:
    from cli.generate import _engine_kwargs
    from cli.main import build_parser

    on = build_parser().parse_args(["generate", "preset:tiny"])
    off = build_parser().parse_args(["generate", "preset:tiny", "--no-prefix-caching"])
    assert _engine_kwargs(on)["enable_prefix_caching"] is True
    assert _engine_kwargs(off)["enable_prefix_caching"] is False
    worker = build_parser().parse_args(["worker", "--model", "m", "--no-prefix-caching"])
    assert worker.prefix_caching is False
    for cmd in (["up"], ["run", "f.txt", "-o", "o.jsonl"]):
        assert "--no-prefix-caching" in _worker_argv(tmp_path, cmd, "--no-prefix-caching")


def _worker_argv(tmp_path: Path, cmd: list[str], *flags: str) -> list[str]:
    """The worker command line ``neoxq up`` / ``neoxq run`` (``cmd``) with ``flags``
    would start."""
    from cli.main import build_parser
    from cli.up import Stack, stack_options

    args = build_parser().parse_args([*cmd, "--device", "cpu", *flags])
    return Stack(model="preset:tiny", data_dir=tmp_path, **stack_options(args)).worker_argv


def test_cascade_flag_reaches_the_engine(tmp_path) -> None:
    from cli.generate import _engine_kwargs
    from cli.main import build_parser

    on = build_parser().parse_args(["generate", "preset:tiny"])
    off = build_parser().parse_args(["generate", "preset:tiny", "--no-cascade"])
    assert "enable_cascade" not in _engine_kwargs(on)  # the engine's default decides
    assert _engine_kwargs(off)["enable_cascade"] is False
    worker = build_parser().parse_args(["worker", "--model", "m", "--no-cascade"])
    assert worker.cascade is False
    for cmd in (["up"], ["run", "f.txt", "-o", "o.jsonl"]):
        assert "--no-cascade" in _worker_argv(tmp_path, cmd, "--no-cascade")
        assert "--no-cascade" not in _worker_argv(tmp_path, cmd)
        assert "--no-prefix-caching" not in _worker_argv(tmp_path, cmd)
        # --chat-template travels the same way to the workers up and run start.
        argv = _worker_argv(tmp_path, cmd, "--chat-template", "t.j")
        assert argv[argv.index("--chat-template") + 1] == "t.j"
    worker = build_parser().parse_args(["worker", "--model", "m", "--chat-template", "t.j"])
    assert worker.chat_template == "t.j"


@pytest.mark.slow
def test_greedy_neox_tp2_checkpoint(tmp_path, tokenizer_path, prompts_file) -> None:
    hf = hf_model(dict(VARIANTS["parallel-rot25"], vocab_size=pad_vocab(50277, 256)), seed=23)
    yml = write_neox_checkpoint(hf, tmp_path, tokenizer_path, tp=2)
    _check_greedy(yml, hf, tokenizer_path, prompts_file, tmp_path / "out.jsonl")


def test_jsonl_input_stop_and_samples(tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p, "custom_id": f"c{i}"})
                             for i, p in enumerate(["ab", "hello"])) + "\n")
    out = tmp_path / "out.jsonl"
    base = ("generate", "preset:tiny", "-i", src, "-o", out, "--max-tokens", 16, "--quiet",
            "--device", "cpu")
    assert run_cli(*base, "--temperature", "0") == 0
    first = read_jsonl(out)
    assert [r["custom_id"] for r in first] == ["c0", "c1"]
    assert all(r["length"] == 16 and r["finish_reason"] == "length" for r in first)
    stop = first[1]["text"][3:5]
    assert run_cli(*base, "--temperature", "0", "--stop", stop) == 0
    stopped = read_jsonl(out)[1]
    assert stopped["finish_reason"] == "stop" and stopped["finished"] is True
    assert stopped["text"] == first[1]["text"][: first[1]["text"].index(stop)]
    # sampling: two samples per prompt, reproducible with the same seed
    assert run_cli(*base, "--num-samples", 2, "--seed", 5) == 0
    a = read_jsonl(out)
    assert [(r["custom_id"], r["sample"]) for r in a] == [("c0", 0), ("c0", 1), ("c1", 0),
                                                          ("c1", 1)]
    assert run_cli(*base, "--num-samples", 2, "--seed", 5) == 0
    assert [r["text"] for r in read_jsonl(out)] == [r["text"] for r in a]


def test_per_line_fields_override_the_options(tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [{"prompt": "ab", "max_tokens": 3},
             {"prompt": "ab", "max_tokens": 7, "temperature": 0},
             {"prompt": "ab", "temperature": 0, "n": 2},
             {"prompt": "ab", "seed": 11},
             {"prompt": "ab", "seed": 11}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    assert run_cli("generate", "preset:tiny", "-i", src, "-o", out, "--max-tokens", 5,
                   "--quiet", "--device", "cpu") == 0
    rows = read_jsonl(out)
    assert [r["length"] for r in rows] == [3, 7, 5, 5, 5, 5]
    assert rows[2]["sample"] == 0 and rows[3]["sample"] == 1  # n from the line
    assert rows[2]["text"] == rows[3]["text"] == rows[1]["text"][:len(rows[2]["text"])]
    assert rows[4]["text"] == rows[5]["text"]  # the line's seed, not --seed + index
    # a stop string on its line ends that line's text only
    stop = rows[1]["text"][2:4]
    src.write_text(json.dumps({"prompt": "ab", "max_tokens": 7, "temperature": 0,
                               "stop": stop}) + "\n" + json.dumps(lines[1]) + "\n")
    assert run_cli("generate", "preset:tiny", "-i", src, "-o", out, "--quiet",
                   "--device", "cpu") == 0
    stopped, full = read_jsonl(out)
    assert stopped["finish_reason"] == "stop" and full["text"] == rows[1]["text"]
    # OpenAI Batch lines: the body's fields
    src.write_text(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "m", "prompt": "ab", "max_tokens": 2}}) + "\n")
    assert run_cli("generate", "preset:tiny", "-i", src, "-o", out, "--quiet",
                   "--device", "cpu") == 0
    [row] = read_jsonl(out)
    assert row["custom_id"] == "x" and row["length"] == 2


def test_unconditional(tmp_path, capsys) -> None:
    assert run_cli("generate", "preset:tiny", "--num-samples", 3, "--max-tokens", 4,
                   "--device", "cpu") == 0
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert len(lines) == 3 and all(r["context"] == "" and r["length"] == 4 for r in lines)
    assert len({r["text"] for r in lines}) > 1  # each sample has its own seed
    assert "generate" in captured.err  # the progress bar goes to stderr


def test_bad_inputs(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n\n'
                   '{"custom_id": "c", "prompt": "p", "max_tokens": 0}\n')
    assert run_cli("generate", "preset:tiny", "-i", bad) == 2
    err = capsys.readouterr().err
    # every bad line, named as the API names it
    assert "bad.jsonl:2: prompt: required" in err and "bad.jsonl:2: text: unknown field" in err
    assert "bad.jsonl:4: max_tokens:" in err
    assert run_cli("generate", "preset:tiny", "--temperature", "-1") == 2
    assert "temperature" in capsys.readouterr().err
    assert run_cli("generate", tmp_path / "nothing-here", "--num-samples", 1) == 2
    assert "nothing-here" in capsys.readouterr().err
    # a prompt longer than the context is an error line; the others still run
    long = tmp_path / "long.txt"
    long.write_text("x" * 600 + "\nshort\n")
    out = tmp_path / "out.jsonl"
    assert run_cli("generate", "preset:tiny", "-i", long, "-o", out, "--max-tokens", 2,
                   "--quiet") == 0
    a, b = read_jsonl(out)
    assert a["finish_reason"] == "error" and "prompt" in a["error"]
    assert b["length"] == 2


def test_chat_lines_templates_and_structured_output(tmp_path) -> None:
    """Lines with messages are rendered as the worker renders them (the default
    transcript, or --chat-template); a choice or JSON schema constrains that line."""
    src = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Hi"}]
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                      "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    src.write_text("".join(json.dumps(x) + "\n" for x in [
        {"messages": msgs, "choice": ["yes", "no"], "max_tokens": 5},
        {"custom_id": "j", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": msgs, "max_tokens": 40, "temperature": 0,
                  "response_format": {"type": "json_schema",
                                      "json_schema": {"name": "n", "schema": schema}}}},
    ]))
    out = tmp_path / "out.jsonl"
    assert run_cli("generate", "preset:tiny", "-i", src, "-o", out, "--quiet",
                   "--device", "cpu", "--seed", 3) != 0  # native and OpenAI lines mixed
    lines = src.read_text().splitlines()
    src.write_text(lines[0] + "\n")
    assert run_cli("generate", "preset:tiny", "-i", src, "-o", out, "--quiet",
                   "--device", "cpu", "--seed", 3) == 0
    [row] = read_jsonl(out)
    assert row["context"] == "User: Hi\n\nAssistant:"
    assert row["finish_reason"] == "stop" and row["text"] in ("yes", "no")
    src.write_text(lines[1] + "\n")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}>")
    assert run_cli("generate", "preset:tiny", "-i", src, "-o", out, "--quiet",
                   "--device", "cpu", "--chat-template", template) == 0
    [row] = read_jsonl(out)
    assert row["context"] == "[user] Hi>" and row["custom_id"] == "j"
    if row["finish_reason"] == "stop":
        assert 1 <= json.loads(row["text"])["n"] <= 9
    template.write_text("{{ raise_exception('no chats here') }}")
    assert run_cli("generate", "preset:tiny", "-i", src, "-o", out, "--quiet",
                   "--device", "cpu", "--chat-template", template) == 2
