"""Admission on a replay of ``bench.structured``'s batch: the engine's own scheduler on
plain data (no model), with each line generating as many tokens as it did on the GPU
run, and a simple device-time model per step. Shows what the projection of a new
constrained kind costs at a batch's start. Runs anywhere in seconds:

    python -m bench.admission_replay --out bench/results/admission_replay.json

``--waves RESULT`` instead replays (a), (b), (c) and the structured lines greedily and
with even waves (the scheduler's "Even waves"), decode steps timed by RESULT's decode
graphs (a bench.throughput result: what the engine's rule sees on that GPU):

    python -m bench.admission_replay --waves bench/results/engine_record_h200.json \
        --out bench/results/waves_replay.json

Rows: A, unconstrained lines asking for exactly their length (``ignore_eos``); B, the same
lines constrained with ``max_tokens`` 160 (the kind not learnt yet: projected at
``OutputLengths.PRIOR_CONSTRAINED`` of the limit, and at all of it for comparison); and B
with every line running to its limit (the prior's worst case: preemptions). Device time
per step: the larger of the weights' bytes at the copy bandwidth and the step's rows at
a GEMM rate, plus the decode rows' KV bytes, plus 1 ms (the 20B's figures on an H200).
The model charges rows, so fewer, fuller steps look barely faster; on the GPU a step's
time is far from proportional to its rows (``bench.structured`` measured B's 140 steps
at 94 ms each against A's 107 at 103 ms with ~1.5x the rows), so the step count is the
figure that carries over.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ROOT, git_commit
from models.engine.block_manager import BlockManager
from models.engine.scheduler import OutputLengths, Scheduler, StepResult
from models.params import SamplingParams
from models.tokenizer import load_tokenizer

WEIGHT_BYTES, BANDWIDTH, FLOPS_PER_ROW, GEMM_RATE = 41.1e9, 4.28e12, 39.8e9, 650e12
KV_BYTES_PER_TOKEN = 1.081e6
EOS = 0


def graph_seconds(engine: dict[str, Any]) -> Callable[[int], float]:
    """A decode step's seconds by rows from a bench.throughput result's ``engine``
    (``decode_graph_ms`` and ``decode_runs_as``): what the engine's own decode graphs
    timed at capture, as the engine's even-waves rule sees them."""
    ms = {int(b): t for b, t in engine["decode_graph_ms"].items()}
    runs_as = {int(b): r for b, r in engine.get("decode_runs_as", {}).items()}
    buckets = sorted(ms)

    def cost(rows: int) -> float:
        if rows <= 0:
            return 0.0
        b = next((x for x in buckets if x >= rows), buckets[-1])
        return ms[runs_as.get(b, b)] / 1e3

    return cost


def replay(prompts: list[list[int]], lengths: list[int], *, max_tokens: int | None,
           constrained: bool, capacity_tokens: int, max_num_seqs: int,
           max_batch_tokens: int,
           decode_seconds: Callable[[int], float] | None = None,
           step_seconds: Callable[[int], float] | None = None) -> dict[str, Any]:
    """Run the lines through a fresh scheduler; each stops (EOS) after its length.
    ``decode_seconds`` (a decode step's seconds by rows, the decode graphs' timings):
    the scheduler sizes even waves by it. ``step_seconds``: decode-only steps are
    modelled as it plus their KV reads (default: the weights / GEMM model)."""
    bm = BlockManager(capacity_tokens // 16, 16)
    sched = Scheduler(bm, max_position=2048, max_num_seqs=max_num_seqs,
                      max_batch_tokens=max_batch_tokens, eos_id=EOS)
    sched.decode_seconds = decode_seconds
    want = {}
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        params = SamplingParams(
            temperature=1.0, max_tokens=n if max_tokens is None else max_tokens,
            ignore_eos=max_tokens is None, regex="[a-z ]+" if constrained else None)
        sched.add_generate(str(i), p, params, i, 0.0)
        want[str(i)] = n
    seconds, steps, running = 0.0, 0, 0
    waves: list[list[int]] = []  # [rows, steps] of consecutive decode-only steps
    while sched.has_unfinished():
        plan = sched.schedule()
        if plan.decode_only:
            if waves and waves[-1][0] == plan.num_decode:
                waves[-1][1] += 1
            else:
                waves.append([plan.num_decode, 1])
        tokens = [EOS if len(seq.tokens) - seq.num_prompt + 1 >= want[seq.req.request_id]
                  else 5 for seq, _ in plan.samples]
        kv = sum(pos + 1 for pos in plan.decode_positions)
        if step_seconds is not None and plan.decode_only:
            seconds += step_seconds(plan.num_decode)
        else:
            seconds += max(WEIGHT_BYTES / BANDWIDTH,
                           plan.num_tokens * FLOPS_PER_ROW / GEMM_RATE) + 1e-3
        seconds += kv * KV_BYTES_PER_TOKEN / BANDWIDTH
        sched.update(plan, StepResult(tokens=tokens))
        sched.take_outputs()
        steps += 1
        running = max(running, len(sched.running))
    return {"steps": steps, "preemptions": sched.stats["preemptions"],
            "peak_running": running, "model_seconds": round(seconds, 3),
            "decode_waves": [w for w in waves if w[1] >= 8],
            "output_tok_per_model_s": round(sum(lengths) / seconds, 1)}


def waves_table(timings: Path, num_prompts: int, shape: dict[str, int],
                structured: tuple[list[list[int]], list[int], int]) -> dict[str, Any]:
    """Greedy against even waves on (a), (b), (c) (``num_prompts`` each, exact lengths)
    and the structured lines (constrained, the prior): decode-only steps modelled by
    ``timings``' decode graphs in both, which the scheduler sizes waves by in the even
    one."""
    from bench.throughput import workload

    cost = graph_seconds(json.loads(timings.read_text())["engine"])
    loads: dict[str, tuple[list[list[int]], list[int], int | None]] = {
        n: (*workload(n, num_prompts, 2048, 50277), None) for n in ("a", "b", "c")}
    loads["structured"] = structured
    rows: dict[str, Any] = {}
    for name, (prompts, lengths, max_tokens) in loads.items():
        kw: dict[str, Any] = dict(max_tokens=max_tokens, constrained=max_tokens is not None,
                                  step_seconds=cost, **shape)
        greedy = replay(prompts, lengths, **kw)
        even = replay(prompts, lengths, decode_seconds=cost, **kw)
        rows[name] = {"greedy": greedy, "even": even,
                      "even_speedup": round(greedy["model_seconds"] / even["model_seconds"], 4)}
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.structured import prompts as structured_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--structured", type=Path, default=ROOT / "bench/results/structured_h200.json",
                    help="a bench.structured result (its lines' mean length is used)")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--capacity-tokens", type=int, default=85232, help="the H200's KV tokens")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--spread", type=float, default=0.1,
                    help="standard deviation of the lines' lengths as a share of their mean "
                         "(0.1: the replay then takes the steps the GPU run took, A 111 vs "
                         "107 and B at a prior of 0.5 127 vs 127)")
    ap.add_argument("--waves", type=Path, default=None, metavar="RESULT",
                    help="instead: greedy against even waves on (a), (b), (c) and the "
                         "structured lines, with the decode graphs' timings of this "
                         "bench.throughput result")
    ap.add_argument("--waves-prompts", type=int, default=512,
                    help="prompts of each of (a), (b), (c) in --waves")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    prompts = structured_prompts(load_tokenizer(ROOT / "assets/20B_tokenizer.json"),
                                 args.num_prompts, 256)
    ran = json.loads(args.structured.read_text())
    mean = ran["json_schema"]["output_tokens"] / ran["num_prompts"]
    rng = random.Random(0)
    lengths = [max(1, min(args.max_tokens, round(rng.gauss(mean, mean * args.spread))))
               for _ in prompts]
    shape = {"capacity_tokens": args.capacity_tokens, "max_num_seqs": args.max_num_seqs,
             "max_batch_tokens": args.max_batch_tokens}
    if args.waves is not None:
        engine = json.loads(args.waves.read_text())["engine"]
        shape["capacity_tokens"] = engine.get("cache_tokens", args.capacity_tokens)
        table = waves_table(args.waves, args.waves_prompts, shape,
                            (prompts, lengths, args.max_tokens))
        result = {"bench": "admission_replay --waves", "commit": git_commit(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "device": "none (plain-data scheduler, modelled device time)",
                  "timings_from": str(args.waves.relative_to(ROOT))
                  if args.waves.is_relative_to(ROOT) else str(args.waves),
                  "timings_commit": json.loads(args.waves.read_text()).get("commit"),
                  "num_prompts": args.waves_prompts, **shape, "rows": table}
        for name, row in table.items():
            g, e = row["greedy"], row["even"]
            print(f"{name:11s} greedy {g['steps']} steps {g['model_seconds']:.2f}s waves "
                  f"{g['decode_waves'][:4]} | even {e['steps']} steps "
                  f"{e['model_seconds']:.2f}s waves {e['decode_waves'][:4]} | "
                  f"{row['even_speedup']:.3f}x")
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        return result
    rows: dict[str, Any] = {}
    rows["A_exact_unconstrained"] = replay(prompts, lengths, max_tokens=None,
                                           constrained=False, **shape)
    prior = OutputLengths.PRIOR_CONSTRAINED
    for label, share in (("B_prior_none", 1.0), ("B_prior_0.5", 0.5),
                         (f"B_prior_{prior}", prior)):
        OutputLengths.PRIOR_CONSTRAINED = share
        try:
            rows[label] = replay(prompts, lengths, max_tokens=args.max_tokens,
                                 constrained=True, **shape)
            rows[label.replace("B_", "B_all_to_limit_")] = replay(
                prompts, [args.max_tokens] * len(prompts), max_tokens=args.max_tokens,
                constrained=True, **shape)
        finally:
            OutputLengths.PRIOR_CONSTRAINED = prior
    base = rows["A_exact_unconstrained"]["model_seconds"]
    for row in rows.values():
        row["A_seconds_over_this"] = round(base / row["model_seconds"], 4)
    result = {"bench": "admission_replay", "commit": git_commit(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": "none (plain-data scheduler, modelled device time)",
              "num_prompts": len(prompts), "max_tokens": args.max_tokens,
              "mean_output_tokens": round(sum(lengths) / len(lengths), 1),
              "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
              "prior_constrained": prior, "spread": args.spread, **shape, "rows": rows}
    for label, row in rows.items():
        print(f"{label:34s} {row}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
