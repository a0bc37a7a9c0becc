"""The throughput benchmark's CPU smoke mode runs end to end and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.throughput import hf_model, main, roofline, table
from models.config import get_preset
from models.engine import Engine
from models.model import NeoX, init_random_
from models.sampling import SamplingParams


def test_smoke_run_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    main(["--model", "preset:tiny", "--device", "cpu", "--num-prompts", "16",
          "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["commit"] and data["date"]
    assert data["ceilings"]["copy_bytes_per_s"] > 0 and data["ceilings"]["gemm_flops_per_s"] > 0
    for name in ("a", "b"):
        w = data["workloads"][name]
        assert w["prompts"] == 16
        assert w["ours"]["output_tokens"] == w["output_tokens"]
        assert w["ours"]["output_tok_per_s"] > 0 and w["roofline"]["seconds"] > 0
        # Every launched step but the first is timed, by kind; the times fit in the run.
        st, stats = w["ours"]["step_times"], w["ours"]["engine_stats"]
        assert st["decode"]["steps"] + st["mixed"]["steps"] == stats["steps"]
        assert st["decode"]["steps"] == stats["decode_steps"] and st["mixed"]["steps"] > 0
        assert 0 < st["decode"]["seconds"] + st["mixed"]["seconds"] <= w["ours"]["seconds"]
        assert w["hf"]["subset"] and w["hf"]["output_tok_per_s"] > 0
        assert set(w["ratios"]) == {"ours_over_roofline", "ours_over_per_kernel_roofline",
                                    "ours_over_hf"}
    # A second run for one workload merges into the same file.
    main(["--model", "preset:tiny", "--device", "cpu", "--num-prompts", "4", "--workload", "a",
          "--skip-hf", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["workloads"]["a"]["prompts"] == 4 and data["workloads"]["b"]["prompts"] == 16
    assert "hf" not in data["workloads"]["a"]
    # HF alone, next to those engine results (a long GPU run split in two commands).
    main(["--model", "preset:tiny", "--device", "cpu", "--num-prompts", "4", "--workload", "a",
          "--skip-ours", "--hf-prompts-a", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["workloads"]["a"]["hf"]["requests"] == 2
    assert data["workloads"]["a"]["ratios"]["ours_over_hf"] > 0
    assert "| (b) 16 prompts |" in table(data)


def test_shared_prefix_workload_with_caching_on_and_off(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    main(["--model", "preset:tiny", "--device", "cpu", "--workload", "c", "--num-prompts-c",
          "24", "--skip-hf", "--out", str(out)])
    w = json.loads(out.read_text())["workloads"]["c"]
    assert w["prompts"] == 24
    on, plain, off = w["ours"], w["ours_no_cascade"], w["ours_no_prefix_caching"]
    assert on["output_tokens"] == plain["output_tokens"] == off["output_tokens"] \
        == w["output_tokens"]
    # 8 prefixes over 24 prompts: most prompts find theirs (all its full blocks), and
    # the decode steps of those sharing one attend to it once (cascade).
    assert on["engine_stats"]["prefix_cache_hit_rate"] > 0.3
    assert plain["engine_stats"]["prefix_cache_hit_rate"] > 0.3
    assert on["engine_stats"]["cascade_steps"] > 0 == plain["engine_stats"]["cascade_steps"]
    assert off["engine_stats"]["prefix_hit_tokens"] == 0
    for key in ("prefix_caching_speedup", "cascade_speedup",
                "prefix_caching_no_cascade_speedup"):
        assert w["ratios"][key] > 0
    text = table(json.loads(out.read_text()))
    assert "prefix caching off" in text and "no cascade" in text


def test_hf_baseline_shares_our_weights() -> None:
    """The HF model built around our tensors (zero copy) generates what the engine does."""
    model = init_random_(NeoX(get_preset("tiny").replace(vocab_size=512)), seed=3).eval()
    hf = hf_model(model)
    assert hf.gpt_neox.embed_in.weight.data_ptr() == model.embed_in.weight.data_ptr()
    prompt = [5, 9, 100, 7, 300]
    ours = Engine(model, None, num_blocks=20).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, pad_token_id=1)
    assert ours[0].samples[0].token_ids == theirs[0, len(prompt):].tolist()


def test_roofline_matches_design_figures() -> None:
    """docs/ARCHITECTURE.md, "The engine": on an H200 (4.3 TB/s, 795 TFLOP/s, ~84 GB of
    KV) the 20B's roofline is about 7,200 output tok/s for workload (a)."""
    cfg = get_preset("gpt-neox-20b")
    n = 1024
    roof = roofline(cfg, [128] * n, [128] * n, capacity_tokens=int(84e9 / cfg.kv_bytes_per_token),
                    bandwidth=4.3e12, gemm=795e12, weight_bytes=2 * cfg.num_params(),
                    kv_bytes_per_token=cfg.kv_bytes_per_token)
    assert 6000 < roof["output_tok_per_s"] < 8500, roof
    # Bounding GEMMs (compute-bound at ~256 sequences) and attention (KV bytes) each on
    # its own can only be slower than letting them hide behind each other.
    kernels = roof["per_kernel"]
    assert kernels["seconds"] > roof["seconds"]
    assert 0.8 * roof["output_tok_per_s"] < kernels["output_tok_per_s"] < roof["output_tok_per_s"]


def _tiny_a(out: Path, *args: str) -> dict:
    """bench.throughput on the tiny model, CPU, workload (a) without HF; its JSON."""
    main(["--model", "preset:tiny", "--device", "cpu", "--workload", "a", "--skip-hf",
          *args, "--out", str(out)])
    return json.loads(out.read_text())


def test_overlap_on_and_off_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "overlap.json"
    data = _tiny_a(out, "--num-prompts", "8", "--compare-overlap")
    w = data["workloads"]["a"]
    assert data["engine"]["overlap"] is True
    on, off = w["ours"], w["ours_no_overlap"]
    assert on["output_tokens"] == off["output_tokens"] == w["output_tokens"]
    assert on["engine_stats"]["overlapped_steps"] > 0
    assert off["engine_stats"]["overlapped_steps"] == 0
    assert w["ratios"]["overlap_speedup"] > 0
    # --no-overlap: the main run is the one without, the comparison the one with.
    data = _tiny_a(out, "--num-prompts", "4", "--no-overlap", "--compare-overlap")
    w = data["workloads"]["a"]
    assert data["engine"]["overlap"] is False
    assert w["ours"]["engine_stats"]["overlapped_steps"] == 0
    assert w["ours_overlap"]["engine_stats"]["overlapped_steps"] > 0


def test_even_and_greedy_waves_in_one_run(tmp_path: Path) -> None:
    """--compare-waves writes both runs and their ratio (a CPU engine has no decode-graph
    timings, so both admit greedily here; the GPU runs are the measurement)."""
    data = _tiny_a(tmp_path / "waves.json", "--num-prompts", "6", "--compare-waves")
    w = data["workloads"]["a"]
    assert data["engine"]["balance_waves"] is True
    assert w["ours"]["output_tokens"] == w["ours_greedy_waves"]["output_tokens"] \
        == w["output_tokens"]
    assert w["ratios"]["even_waves_speedup"] > 0


def test_branch_plans_in_one_run(tmp_path: Path) -> None:
    """Each plan gets its own engine on the same weights; the first plan's rows are the
    run's, the others are divided by them, and HF's ratio reaches every plan."""
    out = tmp_path / "plans.json"
    main(["--model", "preset:tiny", "--device", "cpu", "--workload", "a", "--num-prompts",
          "4", "--hf-prompts-a", "2", "--branch-plans", "input, qkv/8/mlp-first",
          "--out", str(out)])
    data = json.loads(out.read_text())
    assert list(data["branch_plans"]) == ["input/0", "qkv/8/mlp-first"]
    assert data["plan_ratios"]["input/0"]["a"] == 1.0
    assert data["plan_ratios"]["qkv/8/mlp-first"]["a"] > 0
    first = data["branch_plans"]["input/0"]["workloads"]["a"]
    assert data["workloads"]["a"]["ours"] == first["ours"]
    for entry in data["branch_plans"].values():
        assert entry["workloads"]["a"]["ratios"]["ours_over_hf"] > 0
    with pytest.raises(ValueError, match="branch plan"):
        main(["--model", "preset:tiny", "--device", "cpu", "--workload", "a",
              "--num-prompts", "2", "--skip-hf", "--branch-plans", "qkv/many"])


def test_variants_run_on_the_same_engine(tmp_path: Path) -> None:
    """--variants: each workload again per setting, on the same engine (on a CPU the
    kernels differ in nothing; the GPU runs are the measurement), settings restored."""
    data = _tiny_a(tmp_path / "v.json", "--num-prompts", "6", "--max-batch-tokens", "64",
                   "--variants", "base;batch_tokens=16;gelu_rows=4096,kv_store=apart;"
                   "branch=attn/0/attn-first")
    w = data["workloads"]["a"]
    assert list(w["variants"]) == ["base", "batch_tokens=16", "gelu_rows=4096,kv_store=apart",
                                   "branch=attn/0/attn-first"]
    for label, run in w["variants"].items():
        assert run["output_tokens"] == w["output_tokens"]
        assert w["ratios"]["variant_speedup"][label] > 0
    # 6 prompts of 16 tokens: 16-token steps prefill one prompt a step.
    assert w["variants"]["batch_tokens=16"]["step_times"]["mixed"]["steps"] \
        > w["ours"]["step_times"]["mixed"]["steps"]
    for bad in ("batch_tokens=0", "nope=1", "kv_store=maybe", "gelu_rows", "branch=attn/x"):
        with pytest.raises(SystemExit, match="--variants"):
            _tiny_a(tmp_path / "bad.json", "--variants", bad)
