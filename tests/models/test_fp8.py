"""FP8: the e4m3 arithmetic, the FP8 KV cache and FP8 linear layers, through the engine.

References: the same tiny model in float32 (greedy tokens, dense logits, scores), the
float matmul a quantized linear approximates, and the dequantized values themselves.
GPU tests (skipped here) hold ``torch._scaled_mm`` against the CPU emulation and the
Triton decode kernel on an FP8 cache against the torch reference.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from models.attention import PagedAttention, StepMetadata, paged_decode_torch, read_fp8
from models.config import NeoXConfig, get_preset
from models.dtypes import (
    canonical_kv_cache_dtype,
    canonical_quantization,
    parse_kv_cache_dtype,
    precision_label,
)
from models.engine import Engine
from models.engine.engine import prefix_salt
from models.engine.kv_cache import KVCache, block_bytes
from models.fp8 import (
    FP8,
    Fp8Linear,
    dequantize_rows,
    fp8_matmul_emulated,
    quantization_of,
    quantize_fp8_,
    quantize_rows,
)
from models.model import NeoX, init_random_
from models.runtime import build_engine
from tests.models.test_engine import VOCAB, _greedy, _model, _no_leaks, _prompts, _run


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config() -> NeoXConfig:
    return get_preset("tiny").replace(vocab_size=VOCAB, max_position=256)


@pytest.fixture(scope="module")
def model(config: NeoXConfig) -> NeoX:
    return _model(config)


# ---------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------


def test_quantize_rows_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, 96, generator=g) * torch.logspace(-3, 3, 64)[:, None, None]
    x[3, 2] = 0.0  # a row of zeros stays zeros (no NaN from a zero scale)
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64, 8, 1)
    # Each row's largest magnitude maps onto e4m3's largest finite value.
    assert torch.allclose(scale[..., 0], x.abs().amax(-1).clamp(min=1e-12) / 448)
    back = dequantize_rows(q, scale, torch.float32)
    assert torch.isfinite(back).all() and (back[3, 2] == 0).all()
    # e4m3 keeps 3 mantissa bits: at most half a step (1/16 relative) per element, and
    # elements far below their row's max lose at most half a subnormal step.
    err = (back - x).abs()
    bound = x.abs() / 16 + scale * 2.0**-10
    assert (err <= bound * 1.0001).all()
    rel = err.norm() / x.norm()
    assert 0 < rel < 0.04


def test_fp8_linear_emulation_against_float_matmul() -> None:
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(96, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 96, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(2, 7, 96, generator=g)
    q = Fp8Linear.from_linear(lin)
    assert q.weight.dtype == FP8 and q.weight_scale.shape == (48,) and not q.use_scaled_mm
    got = q(x)
    assert got.shape == (2, 7, 48) and got.dtype == x.dtype
    # Exactly the quantize -> float product -> scale arithmetic...
    xq, xs = quantize_rows(x.reshape(-1, 96))
    wq, ws = quantize_rows(lin.weight.detach())
    manual = (xq.float() * xs) @ (wq.float() * ws).t() + lin.bias
    assert torch.allclose(got.reshape(-1, 48), manual, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fp8_matmul_emulated(xq, xs, wq, ws[:, 0], torch.float32),
                          manual - lin.bias, atol=1e-5, rtol=1e-5)
    # ...and close to the float layer it replaces.
    ref = lin(x)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


def test_scaled_mm_call_matches_emulation_where_torch_runs_it_on_cpu() -> None:
    """The GPU path's exact ``torch._scaled_mm`` call (rowwise scales (M, 1) and (1, N),
    the column-major weight view, bias, bf16 out), on torch's CPU FP8 GEMM where this
    torch has one: the same numbers as the emulation, up to bf16 rounding."""
    from models.fp8 import fp8_matmul_scaled_mm

    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(48, 64, generator=g) * 0.1
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    (xq, xs), (wq, ws) = quantize_rows(x), quantize_rows(w)
    try:
        got = fp8_matmul_scaled_mm(xq, xs, wq, ws[:, 0], torch.bfloat16, bias=bias)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU FP8 GEMM with rowwise scales: {exc}")
    emu = fp8_matmul_emulated(xq, xs, wq, ws[:, 0], torch.float32) + bias.float()
    assert got.dtype == torch.bfloat16 and got.shape == (7, 48)
    assert torch.allclose(got.float(), emu, atol=0.02, rtol=0.01)
    # Fp8Linear's GEMM path: the first call finds the bias can ride in the GEMM.
    layer = Fp8Linear(wq, ws, bias)
    layer.use_scaled_mm = True  # what a CUDA weight of this shape decides
    assert layer.fused_bias is None
    out = layer(x[None])
    assert layer.fused_bias is True and out.shape == (1, 7, 48)
    assert torch.allclose(out[0].float(), emu, atol=0.02, rtol=0.01)


def test_quantize_model_keeps_embedding_norms_and_head(config: NeoXConfig) -> None:
    m = _model(config)
    before = {n: p.clone() for n, p in m.named_parameters()}
    quantize_fp8_(m)
    assert quantization_of(m) == "fp8"
    names = dict(m.named_parameters())
    for block in ("0", "1"):
        for path in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h"):
            assert names[f"layers.{block}.{path}.weight"].dtype == FP8
            assert names[f"layers.{block}.{path}.weight_scale"].dtype == torch.float32
    for name in ("embed_in.weight", "embed_out.weight", "final_layer_norm.weight",
                 "layers.0.input_layernorm.weight", "layers.1.attention.dense.bias"):
        assert names[name].dtype == torch.float32 and torch.equal(names[name], before[name])
    assert quantize_fp8_(m) is m  # a second call changes nothing
    ids = torch.tensor([_prompts(1, 40, 40, seed=2)[0]])
    ref, got = _model(config).dense_logits(ids), m.dense_logits(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.1


# ---------------------------------------------------------------------------------------
# The FP8 KV cache
# ---------------------------------------------------------------------------------------


def test_kv_cache_sizing_and_scales(config: NeoXConfig) -> None:
    bf16 = block_bytes(config, 16, torch.bfloat16)
    fp8 = block_bytes(config, 16, FP8)
    # One byte per value plus a float32 scale per token and head.
    assert fp8 == config.num_layers * 2 * 16 * (config.hidden_size + 4 * config.num_heads)
    assert bf16 / fp8 > 1.5
    big = get_preset("gpt-neox-20b")
    assert block_bytes(big, 16, torch.bfloat16) / block_bytes(big, 16, FP8) > 1.9
    cache = KVCache.for_model(config, (0, 2), 10, 4, FP8, "cpu")
    assert cache.dtype == FP8 and cache.scales is not None
    assert cache.nbytes == 10 * block_bytes(config, 4, FP8)
    ks, vs = cache.layer_scales(1)
    assert ks.shape == vs.shape == (10, config.num_heads, 4)
    plain = KVCache.for_model(config, (0, 2), 10, 4, torch.float32, "cpu")
    assert plain.layer_scales(0) is None


def test_paged_attention_writes_fp8_and_decodes(config: NeoXConfig) -> None:
    """The write path quantizes per token and head; copy-on-write carries the scales;
    decode and the continuing-prefill gather see the dequantized values."""
    nh, hd, bs = config.num_heads, config.head_dim, 4
    cache = KVCache.for_model(config, (0, 2), 12, bs, FP8, "cpu")
    attn = PagedAttention(cache)
    g = torch.Generator().manual_seed(3)
    n = 9  # one sequence: tokens 0..8 in blocks 2, 5, 7
    table = torch.tensor([2, 5, 7])
    pos = torch.arange(n)
    k = torch.randn(n, nh, hd, generator=g) * 3
    v = torch.randn(n, nh, hd, generator=g)
    q = torch.randn(n, nh, hd, generator=g)
    attn.set_step(StepMetadata(slot_blocks=table[pos // bs], slot_offsets=pos % bs,
                               num_decode=0, fresh=((0, n),)))
    fresh_out = attn(1, q, k, v)
    # A fresh prefill attends to the step's own float keys: exact.
    causal = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    assert torch.allclose(fresh_out, causal.transpose(0, 1), atol=1e-5)
    kc, vc = cache.layer(1)
    ks, vs = cache.layer_scales(1)
    stored = read_fp8(kc, ks, table[pos // bs], pos % bs, torch.float32)
    kq, kscale = quantize_rows(k)
    assert torch.equal(stored, dequantize_rows(kq, kscale, torch.float32))
    assert cache.layer_scales(0)[0].eq(1).all()  # other layers untouched
    # Copy-on-write: block 7 -> 9 with values and scales.
    cache.copy_blocks(torch.tensor([7]), torch.tensor([9]))
    assert torch.equal(ks[9], ks[7]) and torch.equal(kc[9].view(torch.uint8),
                                                     kc[7].view(torch.uint8))
    # Decode one more token (position 9, block 7 offset 1) against the cached context.
    qd, kd, vd = (torch.randn(1, nh, hd, generator=g) for _ in range(3))
    attn.set_step(StepMetadata(slot_blocks=torch.tensor([7]), slot_offsets=torch.tensor([1]),
                               num_decode=1, block_tables=table[None],
                               context_lens=torch.tensor([n + 1])))
    got = attn(1, qd, kd, vd)
    keys = torch.cat([stored, dequantize_rows(*quantize_rows(kd), torch.float32)])
    values = torch.cat([read_fp8(vc, vs, table[pos // bs], pos % bs, torch.float32),
                        dequantize_rows(*quantize_rows(vd), torch.float32)])
    ref = torch.nn.functional.scaled_dot_product_attention(
        qd.transpose(0, 1)[:, :, None], keys.transpose(0, 1)[:, None],
        values.transpose(0, 1)[:, None])[:, :, 0]  # (nh, 1, hd)
    assert torch.allclose(got, ref.transpose(0, 1), atol=1e-5)
    full = torch.nn.functional.scaled_dot_product_attention(
        qd.transpose(0, 1)[:, :, None], torch.cat([k, kd]).transpose(0, 1)[:, None],
        torch.cat([v, vd]).transpose(0, 1)[:, None])[:, :, 0]
    assert (got - full.transpose(0, 1)).abs().max().item() < 0.1
    assert torch.allclose(got, paged_decode_torch(
        qd, kc, vc, table[None], torch.tensor([n + 1]), k_scale=ks, v_scale=vs), atol=1e-5)


def test_engine_fp8_kv_greedy_agrees_with_float(model: NeoX) -> None:
    prompts = _prompts(8, 5, 70, seed=11)
    params = _greedy(16)
    ref = Engine(model, None, num_blocks=200, block_size=4).generate(prompts, params)
    # A small step budget splits prompts into chunks: continuing chunks read the FP8
    # cache back; decode reads it every step.
    engine = Engine(model, None, num_blocks=200, block_size=4, max_batch_tokens=24,
                    kv_cache_dtype="fp8")
    assert engine.runner.cache.dtype == FP8
    got = engine.generate(prompts, params)
    _no_leaks(engine)
    same = total = 0
    for a, b in zip(ref, got, strict=True):
        x, y = a.samples[0].token_ids, b.samples[0].token_ids
        agree = next((i for i, (u, w) in enumerate(zip(x, y, strict=True)) if u != w), len(x))
        same += agree
        total += len(x)
    # Random tiny models have near-flat logits, so a rounding can flip a near tie; the
    # tokens before the first flip are what greedy agreement can mean here.
    assert same / total >= 0.75
    # Scores (log-likelihoods) through chunked prefill: close to float.
    pairs = [(p[:-4], p[-4:]) for p in prompts if len(p) > 8]
    ref_s = Engine(model, None, num_blocks=200, block_size=4).score(pairs)
    got_s = engine.score(pairs)
    for a, b in zip(ref_s, got_s, strict=True):
        assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=0.05)


def test_engine_fp8_kv_prefix_caching_and_copy_on_write(model: NeoX) -> None:
    """Prefix hits read FP8 blocks another request wrote; n=2 forks copy the shared
    partial block (values and scales): both greedy samples stay identical to n=1."""
    r = random.Random(4)
    base = [r.randrange(2, VOCAB) for _ in range(6 * 4)]
    arrivals = [(0, "first", base, _greedy(12)),
                (3, "shares4", base[:16] + [7, 8, 9], _greedy(12)),
                (5, "n2", base[:10] + [11, 12, 13], _greedy(12, n=2)),
                (8, "n1", base[:10] + [11, 12, 13], _greedy(12))]
    engine = Engine(model, None, num_blocks=60, block_size=4, kv_cache_dtype="fp8")
    got = _run(engine, arrivals)
    assert engine.stats["prefix_hit_tokens"] > 0
    _no_leaks(engine)
    a, b = (s.token_ids for s in got["n2"].samples)
    assert a == b == got["n1"].samples[0].token_ids
    off = Engine(model, None, num_blocks=60, block_size=4, kv_cache_dtype="fp8",
                 enable_prefix_caching=False)
    ref = _run(off, arrivals)
    agree = [sum(x == y for x, y in zip(got[k].samples[0].token_ids,
                                        ref[k].samples[0].token_ids, strict=True))
             for k in got]
    assert sum(agree) / (12 * len(agree)) >= 0.8


def test_prefix_salt_names_the_kv_dtype_and_quantization(config: NeoXConfig) -> None:
    base = prefix_salt(config, torch.bfloat16)
    assert prefix_salt(config, torch.bfloat16, torch.bfloat16) == base
    assert prefix_salt(config, torch.bfloat16, FP8) != base
    assert prefix_salt(config, torch.bfloat16, torch.bfloat16, "fp8") != base


# ---------------------------------------------------------------------------------------
# --quantization fp8 through the engine; flags
# ---------------------------------------------------------------------------------------


def test_quantized_engine_on_a_tiny_preset() -> None:
    params = _greedy(12)
    prompts = [[5, 6, 7, 8, 9, 10], list(range(20, 60))]
    plain = build_engine("preset:tiny", num_blocks=100)
    engine = build_engine("preset:tiny", num_blocks=100, quantization="fp8",
                          kv_cache_dtype="fp8")
    assert engine.quantization == "fp8" and engine.kv_dtype == FP8
    assert engine.model.parameter_bytes() < plain.model.parameter_bytes()
    got = engine.generate(prompts, params)
    ref = plain.generate(prompts, params)
    assert all(len(o.samples[0].token_ids) == 12 for o in got)
    first = [o.samples[0].token_ids[:3] for o in got]
    assert first == [o.samples[0].token_ids[:3] for o in ref]
    ids = torch.tensor([prompts[1]])
    a, b = engine.model.dense_logits(ids)[0], plain.model.dense_logits(ids)[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.8


@pytest.mark.parametrize(("name", "want"), [(None, "auto"), ("auto", "auto"), ("fp8", "fp8"),
                                            ("FP8", "fp8"), ("fp8_e4m3", "fp8")])
def test_kv_cache_dtype_names(name, want) -> None:
    assert canonical_kv_cache_dtype(name) == want
    expect = FP8 if want == "fp8" else torch.bfloat16
    assert parse_kv_cache_dtype(name, torch.bfloat16) == expect


def test_bad_flag_values_are_clear_errors(model: NeoX) -> None:
    with pytest.raises(ValueError, match="kv-cache-dtype: one of auto, fp8 expected, got 'int8'"):
        canonical_kv_cache_dtype("int8")
    with pytest.raises(ValueError, match="quantization: one of none, fp8 expected, got 'int4'"):
        canonical_quantization("int4")
    assert canonical_quantization("none") is None and canonical_quantization("fp8") == "fp8"
    with pytest.raises(ValueError, match="kv-cache-dtype"):
        Engine(model, None, num_blocks=10, kv_cache_dtype="fp16x")
    with pytest.raises(ValueError, match="quantization"):
        build_engine("preset:tiny", num_blocks=10, quantization="int8")
    from cli.main import build_parser

    for argv in (["generate", "preset:tiny", "--kv-cache-dtype", "int8"],
                 ["worker", "--model", "preset:tiny", "--quantization", "awq"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    args = build_parser().parse_args(["worker", "--model", "preset:tiny",
                                      "--kv-cache-dtype", "fp8", "--quantization", "fp8"])
    assert (args.kv_cache_dtype, args.quantization) == ("fp8", "fp8")


def test_precision_label_fits_the_store_column() -> None:
    assert precision_label("bfloat16") == "bfloat16"
    assert precision_label("bfloat16", "fp8", None) == "bfloat16:kv8"
    assert precision_label("bfloat16", "auto", "fp8") == "bfloat16:w8"
    assert precision_label("bfloat16", "fp8", "fp8") == "bfloat16:w8kv8"
    assert max(len(precision_label(d, "fp8", "fp8"))
               for d in ("float32", "bfloat16", "float16")) <= 16


def test_pipeline_stages_with_fp8() -> None:
    """Two CPU stages with FP8 weights and KV: the same tokens as one engine."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], list(range(30, 52))]
    params = _greedy(8)
    kw = {"num_blocks": 40, "block_size": 4, "kv_cache_dtype": "fp8", "quantization": "fp8"}
    one = build_engine("preset:tiny-sequential", **kw).generate(prompts, params)
    with build_engine("preset:tiny-sequential", pipeline_parallel=2, **kw) as pp:
        assert pp.kv_dtype == FP8 and pp.quantization == "fp8"
        got = pp.generate(prompts, params)
    assert [o.samples[0].token_ids for o in got] == [o.samples[0].token_ids for o in one]


# ---------------------------------------------------------------------------------------
# CUDA (skipped here)
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scaled_mm_matches_emulation() -> None:
    from models.fp8 import fp8_matmul_scaled_mm, scaled_mm_supported

    dev = torch.device("cuda")
    if not scaled_mm_supported(dev, 16, 16):
        pytest.skip("needs a GPU with FP8 tensor cores (sm89+)")
    g = torch.Generator(device="cuda").manual_seed(0)
    for m in (1, 7, 16, 250, 2048):  # token counts need not be multiples of 16
        x = torch.randn(m, 6144, generator=g, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(1024, 6144, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
        xq, xs = quantize_rows(x)
        wq, ws = quantize_rows(w)
        fast = fp8_matmul_scaled_mm(xq, xs, wq, ws[:, 0], torch.bfloat16).float()
        emu = fp8_matmul_emulated(xq, xs, wq, ws[:, 0], torch.float32)
        assert ((fast - emu).norm() / emu.norm()).item() < 1e-2, m
    lin = torch.nn.Linear(6144, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # a bias as large as the product, so a lost one shows
        lin.bias.copy_(torch.randn(1024, generator=g, device="cuda"))
    q = Fp8Linear.from_linear(lin)
    assert q.use_scaled_mm
    x = torch.randn(33, 6144, generator=g, device="cuda", dtype=torch.bfloat16)
    ref = lin(x).float()
    assert ((q(x).float() - ref).norm() / ref.norm()).item() < 0.05
    assert q.fused_bias is not None  # the first call found out whether the GEMM adds it
    fused = q.fused_bias
    q.fused_bias = False  # the separate bias add gives the same
    assert ((q(x).float() - ref).norm() / ref.norm()).item() < 0.05
    q.fused_bias = fused
    # Inside a CUDA graph, as decode steps run.
    static = x.clone()
    q(static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = q(static)
    static.copy_(x * 2)
    graph.replay()
    assert torch.allclose(out.float(), q(x * 2).float(), atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_decode_reads_fp8_cache() -> None:
    from models.attention import paged_decode_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    d, nh, hd, bs, w = 6, 8, 96, 16, 9
    k = torch.randn(d * w + 1, nh, bs, hd, generator=g, device="cuda")
    v = torch.randn(d * w + 1, nh, bs, hd, generator=g, device="cuda")
    (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
    ks, vs = ks[..., 0].contiguous(), vs[..., 0].contiguous()
    q = torch.randn(d, nh, hd, generator=g, device="cuda", dtype=torch.bfloat16)
    tables = (torch.randperm(d * w, generator=g, device="cuda") + 1).view(d, w)
    ctx = torch.tensor([1, bs, bs + 1, 77, w * bs - 3, w * bs], device="cuda")
    ref = paged_decode_torch(q, kq, vq, tables, ctx, k_scale=ks, v_scale=vs).float()
    deq = paged_decode_torch(q.float(), dequantize_rows(kq, ks[..., None], torch.float32),
                             dequantize_rows(vq, vs[..., None], torch.float32), tables, ctx)
    assert (ref - deq).abs().max().item() < 2e-2
    got = paged_decode_triton(q, kq, vq, tables, ctx, k_scale=ks, v_scale=vs).float()
    assert (got - ref).abs().max().item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_engine_fp8_matches_cpu_emulation(graphs: bool) -> None:
    """FP8 weights + KV on the GPU (scaled_mm, Triton decode, graphs) against the same
    weights' CPU emulation: mostly the same greedy tokens. The weights are drawn once on
    the CPU and copied (random presets drawn on each device would be different models)."""
    prompts = _prompts(6, 1, 60, seed=91)
    params = _greedy(12)
    cpu_model = init_random_(NeoX(get_preset("tiny")), seed=3).eval()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    kw = {"num_blocks": 80, "block_size": 16, "kv_cache_dtype": "fp8"}
    cpu = Engine(quantize_fp8_(cpu_model), None, **kw).generate(prompts, params)
    outs = Engine(quantize_fp8_(gpu_model), None, cuda_graphs=graphs, **kw).generate(
        prompts, params)
    same = sum(a.samples[0].token_ids[:4] == b.samples[0].token_ids[:4]
               for a, b in zip(outs, cpu, strict=True))
    assert same >= 5


def test_up_and_run_pass_the_flags_to_their_workers(tmp_path) -> None:
    from cli.main import build_parser
    from cli.up import Stack, stack_options

    for command in (["up"], ["run", "prompts.txt", "-o", "out.jsonl"]):
        args = build_parser().parse_args([*command, "--device", "cpu", "--kv-cache-dtype",
                                          "fp8", "--quantization", "fp8"])
        stack = Stack(model="preset:tiny", data_dir=tmp_path, **stack_options(args))
        argv = stack.worker_argv
        assert argv[argv.index("--kv-cache-dtype") + 1] == "fp8"
        assert argv[argv.index("--quantization") + 1] == "fp8"
    plain = build_parser().parse_args(["up", "--device", "cpu"])
    argv = Stack(model="preset:tiny", data_dir=tmp_path, **stack_options(plain)).worker_argv
    assert "--kv-cache-dtype" not in argv and "--quantization" not in argv


def test_triton_kernels_under_the_interpreter() -> None:
    """The fused quantize kernels (one launch per linear layer's activations and per K/V
    write, on CUDA) against the torch ops, run by Triton's CPU interpreter."""
    from tests.models.triton_run import run_json

    results = run_json(["-m", "tests.models.fp8_interp"], interpret=True, timeout=300)
    assert len(results) == 5
    for name, r in results.items():
        assert r["scale_rel"] == 0 and r["odd_codes"] == 0, (name, r)
        assert r.get("finite", 1) == 1 and r.get("others_untouched", 1) == 1, (name, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_quantize_kernels_on_gpu() -> None:
    from models.fp8 import (
        quantize_rows_torch,
        quantize_rows_triton,
        quantize_scatter_triton,
        triton_ok,
    )

    dev = torch.device("cuda")
    assert triton_ok(dev)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(300, 24576, generator=g, device="cuda")
         * torch.logspace(-3, 3, 300, device="cuda")[:, None]).to(torch.bfloat16)
    q, s = quantize_rows_triton(x)
    q_ref, s_ref = quantize_rows_torch(x)
    assert torch.allclose(s, s_ref, rtol=1e-6, atol=0)
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same > 0.999  # hardware round-to-nearest-even, as torch
    kv = torch.randn(250, 64, 96, generator=g, device="cuda").to(torch.bfloat16)
    cache = torch.zeros(40, 64, 16, 96, dtype=FP8, device="cuda")
    scales = torch.ones(40, 64, 16, device="cuda")
    slots = torch.randperm(40 * 16, generator=g, device="cuda")[:250]
    quantize_scatter_triton(kv, cache, scales, slots // 16, slots % 16)
    kq, ks = quantize_rows_torch(kv)
    assert torch.allclose(scales[slots // 16, :, slots % 16], ks[..., 0], rtol=1e-6, atol=0)
    got = cache.view(torch.uint8)[slots // 16, :, slots % 16]
    assert (got == kq.view(torch.uint8)).float().mean().item() > 0.999
