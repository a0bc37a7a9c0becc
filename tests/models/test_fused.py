"""The fused attention-input kernels (models.fused): the torch path is the model's own
(HF parity tests cover it); the Triton kernels against it under Triton's CPU interpreter
and, on a GPU, bit for bit."""

from __future__ import annotations

import pytest
import torch

from models.fused import (
    split_rotate,
    split_rotate_torch,
    write_kv,
    write_kv_torch,
)
from tests.models.fused_interp import SHAPES
from tests.models.triton_run import run_json


def test_cpu_and_autograd_take_the_torch_ops() -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 4, 3, 16, generator=g, requires_grad=True)
    half = torch.rand(3, 1, 4, generator=g) * 6
    ang = torch.cat((half, half), dim=-1)  # rotary's tables repeat each angle
    q, k, v = split_rotate(qkv, ang.cos(), ang.sin(), 8)
    (q.sum() + k.sum() + v.sum()).backward()  # the torch path keeps gradients
    assert qkv.grad is not None
    ref = split_rotate_torch(qkv.detach(), ang.cos(), ang.sin(), 8)
    assert all(torch.equal(a.detach(), b) for a, b in zip((q, k, v), ref, strict=True))
    # The rotation is a rotation: norms of rotated pairs are kept.
    assert torch.allclose(q[..., :8].norm(dim=-1), qkv[:, :, 0, :8].norm(dim=-1), atol=1e-5)
    caches = [torch.zeros(2, 4, 2, 16) for _ in range(4)]
    b, o = torch.tensor([1, 0, 1]), torch.tensor([1, 0, 0])
    write_kv(k.detach(), v.detach(), caches[0], caches[1], b, o)
    write_kv_torch(k.detach(), v.detach(), caches[2], caches[3], b, o)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1][1, :, 1], v[0].detach())


def test_split_and_store_off_cuda_is_split_then_write() -> None:
    """Where the one-kernel store does not run (CPU here; an FP8 or other-dtype cache),
    split_rotate_store is the split and the write one after the other; without kv_out
    it hands back q alone."""
    from models.fused import split_rotate_store, store_fuses

    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 4, 3, 16, generator=g)
    half = torch.rand(5, 1, 4, generator=g) * 6
    ang = torch.cat((half, half), dim=-1)
    b, o = torch.tensor([2, 0, 1, 2, 3]), torch.tensor([1, 0, 1, 0, 1])
    ref = split_rotate_torch(qkv, ang.cos(), ang.sin(), 8)
    want = [torch.zeros(4, 4, 2, 16) for _ in range(2)]
    write_kv_torch(ref[1], ref[2], *want, b, o)
    for kv_out in (True, False):
        caches = [torch.zeros(4, 4, 2, 16) for _ in range(2)]
        assert not store_fuses(qkv, *caches)
        q, k, v = split_rotate_store(qkv, ang.cos(), ang.sin(), 8, *caches, b, o,
                                     kv_out=kv_out)
        assert torch.equal(q, ref[0])
        assert all(torch.equal(c, w) for c, w in zip(caches, want, strict=True))
        if kv_out:
            assert k is not None and v is not None
            assert torch.equal(k, ref[1]) and torch.equal(v, ref[2])
        else:
            assert k is None and v is None


def test_triton_kernels_under_the_interpreter() -> None:
    results = run_json(["-m", "tests.models.fused_interp"], interpret=True, timeout=300)
    assert len(results) == 2 * 3 * len(SHAPES) + len(SHAPES) + 8
    for name, r in results.items():
        if name.startswith("norms"):
            # float32: the sum exact, the norms to float32 rounding; bfloat16 within a
            # rounding (the interpreter truncates float32 to bfloat16, CUDA rounds).
            bf16 = "bfloat16" in name
            assert r["sum_rel"] <= (2.0 ** -7 if bf16 else 0), (name, r)
            assert r["norms_rel"] <= (2.0 ** -6 if bf16 else 1e-5), (name, r)
            continue
        if name.startswith(("write", "store")):
            assert r["exact"] == 1, name
            continue
        assert r["contiguous"] == 1 and r["v_exact"] == 1, name
        # float32 / float16 round as torch does; bfloat16 within a few of its roundings.
        assert r["max_rel"] <= (2.0 ** -6 if name.endswith("bfloat16") else 0), (name, r)


def test_split_rotate_rounds_as_torch_for_the_h200() -> None:
    """Compiled for sm_90 (ptxas from triton's wheel): each product and the sum round
    separately, as torch's ops do; a fused multiply-add would round once and differ."""
    code = """
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from models.fused import split_rotate_constexprs
from models.fused_kernels import split_rotate_kernel as fn
consts = {**split_rotate_constexprs(64, 96, 24), "KV_OUT": True, "STORE": True}
sig = {n: "constexpr" if n in consts else "*i64" if n in ("blocks_ptr", "offsets_ptr")
       else "*bf16" if n.endswith("_ptr")
       else "i64" if n.startswith("stride") else "i32" for n in fn.arg_names}
k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "enable_fp_fusion": False})
print(json.dumps(re.findall(r"\\b(fma\\.[a-z0-9.]+|add\\.rn\\.[a-z0-9]+)", k.asm["ptx"])))
"""
    ops = run_json(["-c", code], interpret=False, timeout=300)
    assert ops and not any(op.startswith("fma") for op in ops), ops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_are_bit_exact_on_gpu() -> None:
    from models.fused import (
        fused_ok,
        split_rotate_store,
        split_rotate_triton,
        store_fuses,
        write_kv_triton,
    )

    dev = torch.device("cuda")
    assert fused_ok(dev)
    g = torch.Generator(device=dev).manual_seed(1)
    for nh, hd, dim in SHAPES:
        n = 300
        qkv = torch.randn(n, nh, 3, hd, generator=g, device=dev).to(torch.bfloat16)
        ang = torch.rand(n, 1, max(dim, 1), generator=g, device=dev)[..., :dim] * 50
        cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        got = split_rotate_triton(qkv, cos, sin, dim)
        ref = split_rotate_torch(qkv, cos, sin, dim)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), (nh, hd, dim)
        caches = [torch.zeros(40, nh, 16, hd, dtype=torch.bfloat16, device=dev)
                  for _ in range(4)]
        slots = torch.randperm(40 * 16, generator=g, device=dev)[:n]
        write_kv_triton(got[1], got[2], caches[0], caches[1], slots // 16, slots % 16)
        write_kv_torch(ref[1], ref[2], caches[2], caches[3], slots // 16, slots % 16)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
        for kv_out in (True, False):  # split and store in one kernel
            stored = [torch.zeros_like(caches[0]) for _ in range(2)]
            assert store_fuses(qkv, *stored)
            q, k, v = split_rotate_store(qkv, cos, sin, dim, *stored, slots // 16,
                                         slots % 16, kv_out=kv_out)
            assert torch.equal(q, ref[0]) and torch.equal(stored[0], caches[2]) \
                and torch.equal(stored[1], caches[3])
            assert (k is None) if not kv_out else torch.equal(k, ref[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gelu_epilogue_on_gpu() -> None:
    """Where the GPU's GEMM epilogue computes the tanh GELU, a bf16 MLP takes it and
    agrees with the unfused ops to bf16 rounding of the intermediate."""
    from models.config import get_preset
    from models.model import MLP, gelu_epilogue_ok

    dev = torch.device("cuda")
    cfg = get_preset("tiny").replace(hidden_act="gelu_fast")
    mlp = MLP(cfg).to(dev, torch.bfloat16)
    x = torch.randn(37, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        fused = mlp(x).float()
        assert mlp.fuses_up(x) == gelu_epilogue_ok(dev)
        mlp.fused_gelu = False
        plain = mlp(x).float()
    assert (fused - plain).abs().max().item() <= 3e-2 * plain.abs().max().item()
    print(f"GELU epilogue on {torch.cuda.get_device_name(dev)}: {gelu_epilogue_ok(dev)}")


def test_fused_layers_equal_plain_on_cpu() -> None:
    """The fused-norms layer loop (what run_layers takes for inference on CUDA), run
    where add_norms falls back to torch ops: the same numbers as the plain loop."""
    from models.config import get_preset
    from models.model import DenseAttention, NeoX, init_random_

    model = init_random_(NeoX(get_preset("tiny")), seed=4).eval()
    assert model.config.parallel_residual
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(7).expand(2, 7).reshape(-1)
    with torch.no_grad():
        x = model.embed(ids.reshape(-1))
        plain = model.run_layers(x, positions, DenseAttention(2, 7))
        fused = model.run_layers_fused(x, positions, DenseAttention(2, 7))
    assert torch.equal(plain, fused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_add_norms_on_gpu() -> None:
    """On the GPU the fused sum is bit-exact and the norms within a bf16 rounding, at
    the 20B's width and decode/prefill row counts; a whole tiny model's layers agree."""
    from models.config import get_preset
    from models.fused import add_norms, add_norms_torch, norms_ok
    from models.model import DenseAttention, NeoX, init_random_

    dev = torch.device("cuda")
    assert norms_ok(dev)
    g = torch.Generator(device=dev).manual_seed(3)
    for n in (1, 336, 4096):
        lns = [torch.nn.LayerNorm(6144, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        x, a, m = (torch.randn(n, 6144, generator=g, device=dev).to(torch.bfloat16)
                   for _ in range(3))
        with torch.no_grad():
            got = add_norms(x, a, m, *lns)
            ref = add_norms_torch(x, a, m, *lns)
        assert torch.equal(got[0], ref[0])
        for p, q in zip(got[1:], ref[1:], strict=True):
            err = (p.float() - q.float()).abs().max().item()
            assert err <= 2 ** -7 * q.float().abs().max().item()
    model = init_random_(NeoX(get_preset("tiny")), seed=4).eval().to(dev, torch.bfloat16)
    ids = torch.randint(0, 500, (2, 7), device=dev)
    positions = torch.arange(7, device=dev).expand(2, 7).reshape(-1)
    with torch.no_grad():
        x = model.embed(ids.reshape(-1))
        fused = model.run_layers(x, positions, DenseAttention(2, 7)).float()
        model.fused_norms = False
        plain = model.run_layers(x, positions, DenseAttention(2, 7)).float()
    assert (fused - plain).abs().max().item() <= 3e-2 * plain.abs().max().item()
