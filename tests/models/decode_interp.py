"""Runs cases of the Triton decode kernel on a machine without a GPU, printing JSON.

* default: under Triton's interpreter (needs ``TRITON_INTERPRET=1``), each case's largest
  difference from the torch reference;
* ``--compile-sm90``: compiles each case's kernel variant for an H100/H200 (sm_90, with
  the ptxas that ships in triton's wheel) as a launch at the 20B's shape would, and
  reports its shared memory; the interpreter cannot catch what only the compiler checks
  (types carried around loops, layouts).

Run by tests/models/test_attention.py in a subprocess (the interpreter is chosen when
the kernel is built, so it must not share a process with code that builds the kernel
for a GPU). Input: a JSON list of cases on stdin.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from models.attention import (
    DecodeConfig,
    decode_constexprs,
    decode_kernels,
    merge_constexprs,
    paged_decode_torch,
    paged_decode_triton,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float8_e4m3fn": torch.float8_e4m3fn}


def random_case(*, head_dim: int, block_size: int, dtype: torch.dtype, num_heads: int,
                context_lens: list[int], seed: int) -> tuple[torch.Tensor, ...]:
    """(q, K, V, K scales | None, V scales | None, tables, lengths): a paged cache with
    shuffled block tables one column wider than the longest context needs. An fp8
    cache is quantized per token and head (scale = max |x| / 448), as the engine stores
    it; q is bf16 then."""
    g = torch.Generator().manual_seed(seed)
    d = len(context_lens)
    w = -(-max(context_lens) // block_size) + 1
    shape = (d * w + 1, num_heads, block_size, head_dim)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    tables = (torch.randperm(d * w, generator=g) + 1).view(d, w)
    ctx = torch.tensor(context_lens)
    if dtype != torch.float8_e4m3fn:
        q = torch.randn(d, num_heads, head_dim, generator=g).to(dtype)
        return q, k.to(dtype), v.to(dtype), None, None, tables, ctx
    q = torch.randn(d, num_heads, head_dim, generator=g).to(torch.bfloat16)
    ks = k.abs().amax(-1).clamp_min(1e-6) / 448
    vs = v.abs().amax(-1).clamp_min(1e-6) / 448
    k8 = (k / ks[..., None]).to(dtype)
    v8 = (v / vs[..., None]).to(dtype)
    return q, k8, v8, ks, vs, tables, ctx


def run_case(case: dict) -> float:
    dtype = DTYPES[case["dtype"]]
    q, kc, vc, ks, vs, tables, ctx = random_case(
        head_dim=case["head_dim"], block_size=case["block_size"], dtype=dtype,
        num_heads=case["num_heads"], context_lens=case["context_lens"], seed=case["seed"])
    ref = paged_decode_torch(q.float(), kc, vc, tables, ctx, k_scale=ks, v_scale=vs)
    cfg = case.get("config")
    got = paged_decode_triton(q, kc, vc, tables, ctx, k_scale=ks, v_scale=vs,
                              config=None if cfg is None else DecodeConfig(*cfg),
                              num_splits=case.get("splits"))
    assert got.dtype == q.dtype and got.shape == q.shape
    return (got.float() - ref).abs().max().item()


_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
                 "float8_e4m3fn": "fp8e4nv"}


def compile_sm90(case: dict) -> dict:
    """Compile the case's decode kernel (and, if it says ``merge``, the merge kernel)
    for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, merge = decode_kernels()
    cache = _TRITON_TYPES[case["dtype"]]
    fp8 = case["dtype"] == "float8_e4m3fn"
    q = "bf16" if fp8 else cache
    cfg = DecodeConfig(*case["config"])
    ptrs = {"out_ptr": q, "part_o_ptr": "fp32", "part_lse_ptr": "fp32", "q_ptr": q,
            "k_ptr": cache, "v_ptr": cache, "ks_ptr": "fp32" if fp8 else q,
            "vs_ptr": "fp32" if fp8 else q, "bt_ptr": "i64", "ctx_ptr": "i64",
            "start_ptr": "i64"}
    consts = decode_constexprs(case["num_heads"], case["head_dim"], case["block_size"], cfg,
                               fp8, case.get("start", False))
    names = kernel.arg_names
    sig = {n: ("*" + ptrs[n] if n in ptrs else "fp32" if n == "scale_log2"
               else "constexpr" if n in consts else "i32") for n in names}
    # As a launch specializes them: pointers and strides (all multiples of 16 elements
    # at the 20B's shape) divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in ptrs or n.startswith("stride")}
    target = GPUTarget("cuda", 90, 32)
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=target, options={"num_warps": cfg.num_warps})
    if not case.get("merge"):
        return {"shared": k.metadata.shared}
    m_consts = merge_constexprs(case["num_heads"], case["head_dim"], 4)
    m_sig = {n: ("constexpr" if n in m_consts else "*fp32" if n.startswith("part")
                 else "*" + q if n == "out_ptr" else "i32") for n in merge.arg_names}
    triton.compile(ASTSource(fn=merge, signature=m_sig, constexprs=m_consts), target=target,
                   options={"num_warps": 4})
    return {"shared": k.metadata.shared}


def main() -> int:
    cases = json.load(sys.stdin)
    if "--compile-sm90" in sys.argv[1:]:
        json.dump({c["name"]: compile_sm90(c) for c in cases}, sys.stdout)
        return 0
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    json.dump({c["name"]: run_case(c) for c in cases}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
