"""Checkpoint loading: every layout GPT-NeoX weights come in, onto any device and dtype.

A model *spec* is one of

- ``preset:NAME`` — random seeded weights of a named shape (``models.config.PRESETS``);
- a Hugging Face directory — ``config.json`` + ``model.safetensors`` (or sharded with
  ``model.safetensors.index.json``, or ``pytorch_model*.bin``) + ``tokenizer.json``;
- a GPT-NeoX YAML (a file, or a directory of YAMLs merged as NeoX merges them) whose
  ``load`` names a DeepSpeed pipeline checkpoint (``latest`` -> ``global_stepN/``
  -> ``layer_XX-model_YY-model_states.pt``), at any tensor-parallel degree;
- a neoxq directory (``neoxq convert`` writes it): ``neoxq_config.json``, one
  safetensors file per layer, ``tokenizer.json``.

Loading happens in two passes. The *plan* reads only headers and metadata: every
checkpoint tensor is translated through :data:`WEIGHT_MAP` (the one place foreign names
live) and checked against the network built on ``meta`` — unknown, extra, missing and
wrongly shaped tensors are reported, naming file and tensor, before any weight is read.
The *read* pass then goes one file (or one layer's TP shards) at a time and
materialises each tensor once, straight onto the target device and dtype. Host memory
beyond the model therefore stays near one file; on a GPU, files stream through two
pinned buffers so that disk reads overlap host-to-device copies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.config import NeoXConfig, get_preset, pad_vocab
from models.dtypes import canonical_quantization, parse_dtype
from models.fp8 import apply_quantization
from models.model import NeoX, init_random_
from models.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

NEOXQ_CONFIG = "neoxq_config.json"
NEOXQ_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the tensor."""


@dataclass
class LoadedModel:
    """What :func:`load_model` returns."""

    model: NeoX
    config: NeoXConfig
    tokenizer: Tokenizer
    # Human-readable origin, e.g. "hf:/ckpt/pythia-70m" or "preset:tiny (seed 0)".
    source: str


# --------------------------------------------------------------------------------------
# The weight map: checkpoint name -> neoxq parameter name (None: a buffer to ignore).
# "{}" stands for a block index. NeoX pipeline files hold names local to one layer; the
# reader prefixes them with "neox.embed." (layer 00), "neox.layers.{i}." (blocks),
# "neox.norm." (final norm) or "neox.head." (output layer) before looking them up here.
# --------------------------------------------------------------------------------------

_BLOCK_PARAMS = tuple(
    f"{module}.{kind}"
    for module in (
        "input_layernorm",
        "post_attention_layernorm",
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    )
    for kind in ("weight", "bias")
)

WEIGHT_MAP: dict[str, str | None] = {
    # Hugging Face GPTNeoXForCausalLM. The head is "embed_out" in transformers 4.x and
    # "lm_head" in 5.x; older 4.x versions also saved attention buffers.
    "gpt_neox.embed_in.weight": "embed_in.weight",
    "gpt_neox.final_layer_norm.weight": "final_layer_norm.weight",
    "gpt_neox.final_layer_norm.bias": "final_layer_norm.bias",
    "embed_out.weight": "embed_out.weight",
    "lm_head.weight": "embed_out.weight",
    "gpt_neox.layers.{}.attention.rotary_emb.inv_freq": None,
    "gpt_neox.layers.{}.attention.bias": None,
    "gpt_neox.layers.{}.attention.masked_bias": None,
    **{f"gpt_neox.layers.{{}}.{p}": f"layers.{{}}.{p}" for p in _BLOCK_PARAMS},
    # GPT-NeoX / DeepSpeed pipeline layer files (EmbeddingPipe, ParallelTransformerLayerPipe,
    # NormPipe, ParallelLinearPipe). A tied model's last layer repeats the embedding.
    "neox.embed.word_embeddings.weight": "embed_in.weight",
    "neox.norm.norm.weight": "final_layer_norm.weight",
    "neox.norm.norm.bias": "final_layer_norm.bias",
    "neox.head.final_linear.weight": "embed_out.weight",
    "neox.head.word_embeddings.weight": "embed_out.weight",
    "neox.layers.{}.attention.rotary_emb.inv_freq": None,
    **{f"neox.layers.{{}}.{p}": f"layers.{{}}.{p}" for p in _BLOCK_PARAMS},
    # neoxq's own names (the converted form, and HF base models without the prefix).
    "embed_in.weight": "embed_in.weight",
    "final_layer_norm.weight": "final_layer_norm.weight",
    "final_layer_norm.bias": "final_layer_norm.bias",
    **{f"layers.{{}}.{p}": f"layers.{{}}.{p}" for p in _BLOCK_PARAMS},
}

_INDEX = re.compile(r"\.(\d+)\.")
_UNKNOWN = "<unknown>"


def translate(name: str) -> str | None:
    """neoxq name for a checkpoint tensor name; None for ignored buffers;
    ``"<unknown>"`` when the name is not a GPT-NeoX tensor at all."""
    m = _INDEX.search(name)
    key = name if m is None else f"{name[: m.start()]}.{{}}.{name[m.end():]}"
    if key not in WEIGHT_MAP:
        return _UNKNOWN
    target = WEIGHT_MAP[key]
    return target.format(int(m.group(1))) if target is not None and m is not None else target


# How tensor-parallel shards of each parameter merge back into one tensor (docs/ARCHITECTURE.md):
# column-parallel weights and their biases concatenate on the output dim (0); row-parallel
# weights on the input dim (1); row-parallel biases are added after the all-reduce, each
# rank holding a part, so they sum; LayerNorms are replicated and are averaged.
TP_MERGE: dict[str, str] = {
    "embed_in.weight": "cat0",
    "embed_out.weight": "cat0",
    "attention.query_key_value.weight": "cat0",
    "attention.query_key_value.bias": "cat0",
    "mlp.dense_h_to_4h.weight": "cat0",
    "mlp.dense_h_to_4h.bias": "cat0",
    "attention.dense.weight": "cat1",
    "mlp.dense_4h_to_h.weight": "cat1",
    "attention.dense.bias": "sum",
    "mlp.dense_4h_to_h.bias": "sum",
    "layernorm.weight": "mean",
    "layernorm.bias": "mean",
    "final_layer_norm.weight": "mean",
    "final_layer_norm.bias": "mean",
}


def tp_rule(target: str) -> str:
    """The merge rule (``cat0`` | ``cat1`` | ``sum`` | ``mean``) for a neoxq parameter."""
    for suffix, rule in TP_MERGE.items():
        if target.endswith(suffix):
            return rule
    raise KeyError(f"no tensor-parallel merge rule for {target}")


def merge_tp_shards(target: str, shards: list[Tensor], rule: str | None = None) -> Tensor:
    """Merge the tensor-parallel shards of one parameter (pure; any device).

    Sums and means are taken in fp32 and returned in fp32 so that the one cast to the
    target dtype happens afterwards.
    """
    rule = rule or tp_rule(target)
    if len(shards) == 1:
        return shards[0]
    if rule == "cat0":
        return torch.cat(shards, dim=0)
    if rule == "cat1":
        return torch.cat(shards, dim=1)
    stacked = torch.stack([s.float() for s in shards])
    return stacked.sum(0) if rule == "sum" else stacked.mean(0)


def _merged_shape(rule: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    first = shapes[0]
    if rule in ("cat0", "cat1"):
        dim = int(rule[-1])
        out = list(first)
        out[dim] = sum(s[dim] for s in shapes)
        return tuple(out)
    return first


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_CHUNK = 32 << 20  # bytes per pread: large enough to stream, small enough to parallelise
_READ_THREADS = min(8, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None


def _read_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="neoxq-read")
    return _pool


def _pread_exact(fd: int, view: memoryview, offset: int, path: Path, what: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: file ends inside tensor {what!r} (truncated?)")
        done += n


def _pread_chunks(
    fd: int, buf: memoryview, offset: int, path: Path, what: str
) -> list[Future[None]]:
    """Queue reads filling ``buf`` from ``fd`` at ``offset`` in chunks on the read pool
    (pread drops the GIL, so chunks of one tensor and of several tensors run at once).
    The jobs never wait on other jobs, so the pool cannot deadlock."""
    pool = _read_pool()
    return [pool.submit(_pread_exact, fd, buf[s : s + _CHUNK], offset + s, path, what)
            for s in range(0, len(buf), _CHUNK)]


def _pread_all(fd: int, buf: memoryview, offset: int, path: Path, what: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; call from outside the read pool."""
    if len(buf) <= _CHUNK:
        _pread_exact(fd, buf, offset, path, what)
        return
    for f in _pread_chunks(fd, buf, offset, path, what):
        f.result()


def _bytes_of(t: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (works for bf16, unlike numpy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


@dataclass
class _STInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int


class _SafetensorsFile:
    """A safetensors file read with plain ``pread`` calls, not ``mmap``: only the bytes
    of the tensors asked for are read, straight into their destination (no page of a
    mapping stays resident), and a truncated file is caught from its header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if n < 2 or 8 + n > size:
                    raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path}: cannot read safetensors header ({exc})") from None
        self.size = size
        self.tensors: dict[str, _STInfo] = {}
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta}")
            begin, end = meta["data_offsets"]
            info = _STInfo(_ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), base + begin,
                           end - begin)
            numel = 1
            for d in info.shape:
                numel *= d
            if numel * info.dtype.itemsize != info.nbytes:
                raise CheckpointError(
                    f"{path}: tensor {name!r} header gives {info.nbytes} bytes for shape "
                    f"{list(info.shape)} {meta['dtype']} (corrupt header)"
                )
            if base + end > size:
                raise CheckpointError(
                    f"{path}: truncated — tensor {name!r} needs bytes up to {base + end} "
                    f"but the file has {size}"
                )
            self.tensors[name] = info


class _Staging:
    """Two host buffers used in turn: while the GPU copies out of one, the disk reads
    into the other. Pinned (page-locked) for CUDA so copies are asynchronous DMA;
    ``pin=False`` runs the same path on CPU (tests)."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self.bufs: list[Tensor | None] = [None, None]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def acquire(self, nbytes: int) -> tuple[int, Tensor]:
        i = self.turn
        self.turn ^= 1
        if self.events[i] is not None:
            self.events[i].synchronize()  # the GPU has finished copying out of this buffer
            self.events[i] = None
        buf = self.bufs[i]
        if buf is None or buf.numel() < nbytes:
            self.bufs[i] = None  # free the old one before allocating the larger
            buf = self.bufs[i] = torch.empty(max(nbytes, 1), dtype=torch.uint8,
                                             pin_memory=self.pin)
        return i, buf

    def release(self, i: int) -> None:
        if self.pin:
            ev = torch.cuda.Event()
            ev.record()  # after every copy queued on the current stream
            self.events[i] = ev


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


def _read_safetensors(
    st: _SafetensorsFile,
    names: list[tuple[str, str]],
    device: torch.device,
    dtype: torch.dtype,
    staging: _Staging | None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield (target, tensor on device in dtype) for ``names`` = [(file name, target)]."""
    fd = os.open(st.path, os.O_RDONLY)
    reads: list[list[Future[None]]] = []
    try:
        if staging is None:
            # CPU: a tensor already in the target dtype becomes a view of a private
            # (copy-on-write) memory map of the file — no copy, pages shared with the page
            # cache and read on first touch; other dtypes are read, then converted.
            mapped: Tensor | None = None
            for name, target in names:
                info = st.tensors[name]
                if info.dtype == dtype and info.start % info.dtype.itemsize == 0:
                    if mapped is None:
                        mapped = torch.from_file(str(st.path), shared=False, size=st.size,
                                                 dtype=torch.uint8)
                    view = mapped[info.start : info.start + info.nbytes]
                    yield target, view.view(info.dtype).view(info.shape)
                    continue
                out = torch.empty(info.shape, dtype=info.dtype)
                _pread_all(fd, _bytes_of(out), info.start, st.path, name)
                yield target, out.to(dtype)
            return
        layout, total = [], 0
        for name, target in names:
            info = st.tensors[name]
            layout.append((target, info, total))
            total = _align(total + info.nbytes)
        slot, buf = staging.acquire(total)
        raw = _bytes_of(buf)
        # Queue every chunk of every tensor of this file; copy each tensor out as soon
        # as its own chunks have landed.
        reads = [_pread_chunks(fd, raw[off : off + info.nbytes], info.start, st.path, target)
                 for target, info, off in layout]
        for (target, info, off), chunks in zip(layout, reads, strict=True):
            for c in chunks:
                c.result()
            host = buf[off : off + info.nbytes].view(info.dtype).view(info.shape)
            t = host.to(device, non_blocking=True)
            if t.data_ptr() == host.data_ptr():
                t = t.clone()  # a CPU target must not keep a view of the reused buffer
            yield target, t if t.dtype == dtype else t.to(dtype)
        staging.release(slot)
    finally:
        # Never close the descriptor under a read still running (after an error).
        for chunks in reads:
            for c in chunks:
                if not c.cancel():
                    c.exception()  # waits for it
        os.close(fd)


def _torch_load(path: Path) -> dict[str, Any]:
    """``torch.load`` memory-mapped and weights-only; legacy (non-zip) files without mmap."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors all mean "unreadable"
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    # DeepSpeed/NeoX full checkpoints nest the weights.
    for key in ("module", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def _to_target(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    out = t.to(device=device, dtype=dtype)
    # A memory-mapped source must not stay the parameter's storage: copy it out.
    return out.clone() if out.data_ptr() == t.data_ptr() else out


# --------------------------------------------------------------------------------------
# The plan: what to read from where, validated before reading.
# --------------------------------------------------------------------------------------


@dataclass
class _Entry:
    name: str  # as stored (for NeoX: the name inside the layer files)
    target: str  # neoxq parameter name
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Unit:
    """One file (or one NeoX layer's TP shard files), read in one go."""

    files: list[Path]
    entries: list[_Entry]
    kind: str  # "safetensors" | "torch" | "neox"
    st: _SafetensorsFile | None = None
    rules: dict[str, str] = field(default_factory=dict)  # NeoX: target -> merge rule


@dataclass
class _Plan:
    config: NeoXConfig
    units: list[_Unit]
    tokenizer: Tokenizer | None
    source: str
    config_file: str  # named in "config disagrees with weights" errors


def _check_and_select(plan: _Plan, layer_range: tuple[int, int] | None) -> None:
    """Validate every entry against the network; keep only this stage's entries.

    Raises CheckpointError for unknown, duplicate, extra (not in the config's network),
    wrongly shaped and missing tensors.
    """
    cfg = plan.config
    with torch.device("meta"):
        full = NeoX(cfg)
        stage = NeoX(cfg, layer_range) if layer_range else full
    full_shapes = {n: tuple(t.shape) for n, t in full.state_dict().items()}
    wanted = set(stage.state_dict())
    # A tied head is the embedding: a whole model reads it once, as embed_in; a last
    # stage without the embedding reads the checkpoint's head copy, or else the embedding.
    alias: dict[str, str] = {}
    if cfg.tie_embeddings:
        if stage.has_embedding:
            wanted.discard("embed_out.weight")
        elif stage.has_head:
            has_head_copy = any(e.target == "embed_out.weight" for u in plan.units
                                for e in u.entries)
            if not has_head_copy:
                alias["embed_in.weight"] = "embed_out.weight"
    found: dict[str, Path] = {}
    for unit in plan.units:
        where = unit.files[0]
        keep: list[_Entry] = []
        for e in unit.entries:
            if e.target == _UNKNOWN:
                raise CheckpointError(
                    f"{where}: unexpected tensor {e.name!r} (not a GPT-NeoX parameter)"
                )
            if e.target not in full_shapes:
                raise CheckpointError(
                    f"{where}: unexpected tensor {e.name!r} ({e.target}): the config "
                    f"({plan.config_file}, {cfg.num_layers} layers) has no such parameter — "
                    "the config disagrees with the weights"
                )
            if e.shape != full_shapes[e.target]:
                raise CheckpointError(
                    f"{where}: tensor {e.name!r} has shape {list(e.shape)} but the config "
                    f"({plan.config_file}) needs {list(full_shapes[e.target])} for "
                    f"{e.target} — the config disagrees with the weights"
                )
            if e.target in found:
                raise CheckpointError(
                    f"{where}: tensor {e.name!r} ({e.target}) is also in {found[e.target]}"
                )
            found[e.target] = where
            e.target = alias.get(e.target, e.target)
            if e.target in wanted:
                keep.append(e)
        unit.entries = keep
    loaded = {alias.get(t, t) for t in found}
    missing = sorted(wanted - loaded, key=_param_order)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        files = sorted({u.files[0].name for u in plan.units})
        shown = ", ".join(files[:4]) + (f", ... ({len(files)} files)" if len(files) > 4 else "")
        raise CheckpointError(
            f"{plan.source}: missing tensor(s) {', '.join(missing[:5])}{more}: the config "
            f"({plan.config_file}) needs them and no file has them (read: {shown or 'none'})"
        )
    plan.units = [u for u in plan.units if u.entries]


def _param_order(name: str) -> tuple[int, str]:
    m = _INDEX.search(name)
    return (int(m.group(1)) if m else -1, name)


def _stage_layers(cfg: NeoXConfig, layer_range: tuple[int, int] | None) -> tuple[int, int]:
    return layer_range or (0, cfg.num_layers)


# ---------------------------------------------------------------- Hugging Face directories


def _hf_plan(path: Path, layer_range: tuple[int, int] | None) -> _Plan:
    cfg_file = path / "config.json"
    try:
        cfg = NeoXConfig.from_hf(json.loads(cfg_file.read_text()), name=path.name)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None
    units: list[_Unit] = []
    st_index = path / "model.safetensors.index.json"
    bin_index = path / "pytorch_model.bin.index.json"
    if st_index.exists() or bin_index.exists():
        index_file = st_index if st_index.exists() else bin_index
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index_file}: not a weight index ({exc})") from None
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        start, stop = _stage_layers(cfg, layer_range)
        for fname, names in by_file.items():
            fpath = path / fname
            if not fpath.exists():
                raise CheckpointError(
                    f"{index_file}: shard {fname} (holding {names[0]!r}) does not exist"
                )
            # Skip shards that hold nothing this stage needs without opening them.
            if layer_range and not any(_wanted_by_stage(translate(n), cfg, start, stop)
                                       for n in names):
                continue
            unit = _file_unit(fpath)
            listed, stored = set(names), {e.name for e in unit.entries}
            if listed - stored:
                raise CheckpointError(
                    f"{fpath}: tensor {sorted(listed - stored)[0]!r} is listed in "
                    f"{index_file.name} but not stored in the file"
                )
            units.append(unit)
    else:
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        fpath = next((c for c in candidates if c.exists()), None)
        if fpath is None:
            raise CheckpointError(
                f"{path}: no weights (looked for model.safetensors, "
                "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)"
            )
        units.append(_file_unit(fpath))
    tok_file = path / "tokenizer.json"
    tok = _open_tokenizer(tok_file, f"{path}") if tok_file.exists() else None
    return _Plan(cfg, units, tok, f"hf:{path}", str(cfg_file))


def _wanted_by_stage(target: str | None, cfg: NeoXConfig, start: int, stop: int) -> bool:
    if target is None:
        return False
    if target == _UNKNOWN:
        return True  # let the check report it
    m = _INDEX.search(target)
    if m:
        return start <= int(m.group(1)) < stop
    if target == "embed_in.weight":
        return start == 0 or (cfg.tie_embeddings and stop == cfg.num_layers)
    return stop == cfg.num_layers


def _file_unit(fpath: Path) -> _Unit:
    """Plan one HF/neoxq weight file from its header (safetensors) or pickle (torch)."""
    st: _SafetensorsFile | None = None
    if fpath.suffix == ".safetensors":
        st = _SafetensorsFile(fpath)
        shapes = {n: (i.shape, i.dtype) for n, i in st.tensors.items()}
    else:
        sd = _torch_load(fpath)
        shapes = {n: (tuple(t.shape), t.dtype) for n, t in sd.items() if isinstance(t, Tensor)}
    entries = []
    for n, (shape, dt) in shapes.items():
        target = translate(n)
        if target is not None:
            entries.append(_Entry(n, target, shape, dt))
    return _Unit([fpath], entries, "safetensors" if st else "torch", st=st)


# ------------------------------------------------------------------ GPT-NeoX YAML + pipeline


def _read_neox_yaml(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """Merge one YAML or a directory of them; keys normalised to underscores."""
    import yaml

    files = (sorted(p for p in path.iterdir() if p.suffix in (".yml", ".yaml"))
             if path.is_dir() else [path])
    if not files:
        raise CheckpointError(f"{path}: no .yml/.yaml files")
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            data = yaml.safe_load(f.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CheckpointError(f"{f}: cannot parse YAML ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{f}: expected a mapping of NeoX settings")
        for k, v in data.items():
            key = str(k).replace("-", "_")
            if key in merged and merged[key] != v:
                raise CheckpointError(
                    f"{f}: {k} = {v!r} conflicts with {merged[key]!r} in {origin[key]}"
                )
            merged[key], origin[key] = v, f
    return merged, files


def _resolve(value: str, yaml_files: list[Path]) -> Path:
    """NeoX resolves relative paths against the working directory (users run from the
    gpt-neox checkout); fall back to the YAML's own directory."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    beside = yaml_files[0].parent / p
    return beside if beside.exists() else p


_NEOX_ACT = {"relu": "relu", "silu": "silu", "swish": "silu"}


def neox_config(args: dict[str, Any], vocab_tokens: int, name: str = "neox") -> NeoXConfig:
    """NeoXConfig from merged (underscore-keyed) GPT-NeoX arguments.

    ``vocab_tokens`` is the tokenizer's size; NeoX pads the embedding to a multiple of
    ``make_vocab_size_divisible_by`` x ``model_parallel_size``. Defaults are NeoX's own.
    """
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if key not in args:
            raise ValueError(f"missing {key.replace('_', '-')}")
    if args.get("pos_emb", "learned") != "rotary":
        raise ValueError(f"pos-emb {args.get('pos_emb', 'learned')!r} is not supported "
                         "(only 'rotary')")
    if args.get("norm", "layernorm") != "layernorm":
        raise ValueError(f"norm {args['norm']!r} is not supported (only 'layernorm')")
    kinds = {k for group in args.get("attention_config", []) for k in group[0]}
    if kinds - {"global", "flash"}:
        raise ValueError(f"attention-config {sorted(kinds)} is not supported (only global)")
    act = args.get("activation", "gelu")
    if act == "gelu":
        # NeoX's fused bias-GeLU and its openai-gelu are the tanh approximation (the 20B's).
        fused = args.get("bias_gelu_fusion") or args.get("openai_gelu")
        hidden_act = "gelu_fast" if fused else "gelu"
    elif act in _NEOX_ACT:
        hidden_act = _NEOX_ACT[act]
    else:
        raise ValueError(f"activation {act!r} is not supported")
    hidden = int(args["hidden_size"])
    multiple = int(args.get("make_vocab_size_divisible_by", 128)) * int(
        args.get("model_parallel_size", 1)
    )
    return NeoXConfig(
        name=name,
        vocab_size=pad_vocab(vocab_tokens, multiple),
        hidden_size=hidden,
        num_layers=int(args["num_layers"]),
        num_heads=int(args["num_attention_heads"]),
        intermediate_size=int(args.get("intermediate_size") or 4 * hidden),
        rotary_pct=float(args.get("rotary_pct", 1.0)),
        rotary_base=float(args.get("rotary_emb_base", 10000)),
        max_position=int(args.get("max_position_embeddings") or args.get("seq_length") or 2048),
        layer_norm_eps=float(args.get("layernorm_epsilon", 1e-5)),
        parallel_residual=bool(args.get("gpt_j_residual", False)),
        hidden_act=hidden_act,
        tie_embeddings=not args.get("no_weight_tying", False),
        attention_bias=bool(args.get("use_bias_in_attn_linear", True)),
    )


_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


def _neox_plan(
    path: Path, layer_range: tuple[int, int] | None, tokenizer: Tokenizer | None
) -> _Plan:
    args, yaml_files = _read_neox_yaml(path)
    if tokenizer is None:
        if not args.get("vocab_file"):
            raise CheckpointError(f"{path}: no vocab-file set; pass a tokenizer (--tokenizer)")
        tokenizer = _open_tokenizer(_resolve(str(args["vocab_file"]), yaml_files),
                                    f"{path} (vocab-file)")
    try:
        cfg = neox_config(args, tokenizer.vocab_size, name=path.stem)
        cfg = cfg.replace(eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if not args.get("load"):
        raise CheckpointError(f"{path}: no 'load' directory set (where the checkpoint is)")
    step_dir = _neox_step_dir(_resolve(str(args["load"]), yaml_files))
    shards: dict[int, dict[int, Path]] = {}
    for f in step_dir.iterdir():
        m = _LAYER_FILE.search(f.name)
        if m:
            shards.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    if not shards:
        raise CheckpointError(f"{step_dir}: no layer_XX-model_YY-model_states.pt files")
    tp = max(len(v) for v in shards.values())
    L = cfg.num_layers
    # DeepSpeed numbers pipeline layers: 0 embedding, 1 a reshape, 2..L+1 blocks,
    # L+2 a reshape, L+3 final norm, L+4 output layer (or the tied embedding again).
    roles = {0: "embed", L + 3: "norm", L + 4: "head", **{i + 2: f"layers.{i}" for i in range(L)}}
    for idx in sorted(shards):
        if idx not in roles:
            raise CheckpointError(
                f"{shards[idx][0] if 0 in shards[idx] else step_dir}: layer file {idx:02d} is "
                f"not expected for a {L}-layer model ({path} disagrees with the checkpoint)"
            )
        ranks = shards[idx]
        for r in range(tp):
            if r not in ranks:
                raise CheckpointError(
                    f"{step_dir}: missing layer_{idx:02d}-model_{r:02d}-model_states.pt "
                    f"(tensor-parallel degree {tp})"
                )
    start, stop = _stage_layers(cfg, layer_range)
    head_rule = "cat1" if args.get("output_layer_parallelism") == "row" else "cat0"
    units = []
    for idx in sorted(shards):
        role = roles[idx]
        if role.startswith("layers."):
            if not start <= int(role.split(".")[1]) < stop:
                continue  # another pipeline stage's layer: never opened
        elif role == "embed" and start != 0 and not (cfg.tie_embeddings and stop == L):
            continue
        elif role in ("norm", "head") and stop != L:
            continue
        files = [shards[idx][r] for r in range(tp)]
        units.append(_neox_unit(files, role, head_rule))
    return _Plan(cfg, units, tokenizer, f"neox:{path}", str(path))


def _neox_step_dir(load: Path) -> Path:
    if not load.is_dir():
        raise CheckpointError(f"checkpoint directory {load} (the YAML's 'load') does not exist")
    if any(_LAYER_FILE.search(f.name) for f in load.iterdir()):
        return load
    latest = load / "latest"
    if not latest.exists():
        raise CheckpointError(f"{load}: no 'latest' file naming the global_stepN directory")
    step = load / latest.read_text().strip()
    if not step.is_dir():
        raise CheckpointError(f"{latest}: names {step.name}, which does not exist")
    return step


def _neox_unit(files: list[Path], role: str, head_rule: str) -> _Unit:
    """Plan one NeoX layer: read each TP shard's names and shapes, compute merged shapes."""
    prefix = f"neox.{role}."
    per_rank = [_torch_load(f) for f in files]
    names = [n for n, t in per_rank[0].items() if isinstance(t, Tensor)]
    entries, rules = [], {}
    for r, sd in enumerate(per_rank[1:], start=1):
        if set(sd) != set(per_rank[0]):
            diff = sorted(set(sd) ^ set(per_rank[0]))[0]
            raise CheckpointError(
                f"{files[r]}: tensor {diff!r} is in one tensor-parallel shard but not another "
                f"({files[0].name})"
            )
    for n in names:
        target = translate(prefix + n)
        if target is None:
            continue
        if target == _UNKNOWN:
            entries.append(_Entry(n, _UNKNOWN, (), per_rank[0][n].dtype))
            continue
        rule = head_rule if target == "embed_out.weight" else tp_rule(target)
        shapes = [tuple(sd[n].shape) for sd in per_rank]
        cat_dim = int(rule[-1]) if rule.startswith("cat") else None
        for r, s in enumerate(shapes):
            same = all(a == b for d, (a, b) in enumerate(zip(s, shapes[0], strict=False))
                       if d != cat_dim)
            if len(s) != len(shapes[0]) or not same:
                raise CheckpointError(
                    f"{files[r]}: tensor {n!r} has shape {list(s)}, which does not merge with "
                    f"{list(shapes[0])} in {files[0].name} (rule {rule})"
                )
        rules[target] = rule
        entries.append(_Entry(n, target, _merged_shape(rule, shapes), per_rank[0][n].dtype))
    return _Unit(files, entries, "neox", rules=rules)


# ------------------------------------------------------------------------- neoxq directories


def _neoxq_plan(path: Path) -> _Plan:
    meta_file = path / NEOXQ_CONFIG
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != "neoxq" or meta.get("version") != NEOXQ_FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
        cfg = NeoXConfig.from_dict(meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_file}: not a neoxq checkpoint config ({exc})") from None
    units: list[_Unit] = [_LazyUnit(path / fname) for fname in meta["files"]]
    tok: Tokenizer | None = None
    if meta.get("tokenizer") == "byte-level":
        tok = ByteTokenizer(cfg.eos_token_id)
    elif (path / "tokenizer.json").exists():
        tok = _open_tokenizer(path / "tokenizer.json", str(path))
    return _Plan(cfg, units, tok, f"neoxq:{path}", str(meta_file))


class _LazyUnit(_Unit):
    """A neoxq per-layer file whose header is read only if its layer is wanted."""

    def __init__(self, fpath: Path) -> None:
        super().__init__([fpath], [], "safetensors")
        self._loaded = False

    def load(self) -> None:
        if not self._loaded:
            if not self.files[0].exists():
                raise CheckpointError(f"{self.files[0]}: listed in {NEOXQ_CONFIG} but missing")
            u = _file_unit(self.files[0])
            self.entries, self.st, self._loaded = u.entries, u.st, True


def _neoxq_layer_of(fname: str) -> str:
    return fname.split(".")[0]


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def _open_tokenizer(path: Path, what: str) -> Tokenizer:
    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{what}: tokenizer {path} cannot be loaded ({exc})") from None


def _spec_kind(spec: str | Path) -> tuple[str, Path | str]:
    s = str(spec)
    if s.startswith("preset:"):
        return "preset", s.removeprefix("preset:")
    p = Path(s).expanduser()
    if p.is_file() and p.suffix in (".yml", ".yaml"):
        return "neox", p
    if p.is_dir():
        if (p / NEOXQ_CONFIG).exists():
            return "neoxq", p
        if (p / "config.json").exists():
            return "hf", p
        if any(f.suffix in (".yml", ".yaml") for f in p.iterdir()):
            return "neox", p
        raise CheckpointError(
            f"{p}: not a checkpoint (expected config.json, {NEOXQ_CONFIG} or NeoX YAML files)"
        )
    hint = f"; did you mean preset:{s}?" if not p.exists() and "/" not in s else ""
    raise CheckpointError(f"{s}: no such checkpoint file or directory{hint}")


def _plan(
    spec: str | Path, tokenizer: Tokenizer | None, layer_range: tuple[int, int] | None
) -> _Plan:
    kind, where = _spec_kind(spec)
    if kind == "hf":
        return _hf_plan(Path(where), layer_range)
    if kind == "neox":
        return _neox_plan(Path(where), layer_range, tokenizer)
    if kind == "neoxq":
        return _neoxq_plan(Path(where))
    raise AssertionError(kind)


def _as_tokenizer(tokenizer: Tokenizer | str | Path | None) -> Tokenizer | None:
    if tokenizer is None or isinstance(tokenizer, Tokenizer):
        return tokenizer
    return _open_tokenizer(Path(tokenizer), "--tokenizer")


def load_config(spec: str | Path, *, tokenizer: Tokenizer | str | Path | None = None) -> NeoXConfig:
    """The :class:`NeoXConfig` of a model spec, reading no weights.

    For a NeoX YAML the tokenizer (``vocab-file`` or ``tokenizer``) sets the vocabulary.
    """
    kind, where = _spec_kind(spec)
    if kind == "preset":
        return get_preset(str(where))
    if kind == "hf":
        f = Path(where) / "config.json"
        try:
            return NeoXConfig.from_hf(json.loads(f.read_text()), name=Path(where).name)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{f}: {exc}") from None
    if kind == "neoxq":
        return _neoxq_plan(Path(where)).config
    tok = _as_tokenizer(tokenizer)
    args, yaml_files = _read_neox_yaml(Path(where))
    if tok is None:
        if not args.get("vocab_file"):
            raise CheckpointError(f"{where}: no vocab-file set; pass a tokenizer")
        tok = _open_tokenizer(_resolve(str(args["vocab_file"]), yaml_files), f"{where}")
    try:
        cfg = neox_config(args, tok.vocab_size, name=Path(where).stem)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return cfg.replace(eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)


def load_spec_tokenizer(
    spec: str | Path, *, tokenizer: Tokenizer | str | Path | None = None
) -> Tokenizer:
    """The tokenizer ``load_model(spec, tokenizer=tokenizer)`` would use, reading no
    weights (so that input files can be checked before a large model loads)."""
    tok = _as_tokenizer(tokenizer)
    if tok is not None:
        return tok
    kind, where = _spec_kind(spec)
    if kind == "preset":
        return ByteTokenizer(get_preset(str(where)).eos_token_id)
    path = Path(where)
    found: Tokenizer | None = None
    if kind == "neoxq":
        found = _neoxq_plan(path).tokenizer
    elif kind == "hf":
        if (path / "tokenizer.json").exists():
            found = _open_tokenizer(path / "tokenizer.json", str(path))
    else:
        args, yaml_files = _read_neox_yaml(path)
        if args.get("vocab_file"):
            found = _open_tokenizer(_resolve(str(args["vocab_file"]), yaml_files),
                                    f"{path} (vocab-file)")
    if found is None:
        raise CheckpointError(f"{where}: no tokenizer beside the weights; pass one "
                              "(--tokenizer PATH)")
    return found


def _assign(model: nn.Module, target: str, tensor: Tensor) -> None:
    module_name, _, leaf = target.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


class _ParamView:
    """Just enough of a NeoX for ``init_random_`` to fill one named parameter."""

    def __init__(self, config: NeoXConfig, name: str, p: nn.Parameter) -> None:
        self.config, self._item = config, (name, p)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [self._item]


def _seed_for(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_model(
    config: NeoXConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    layer_range: tuple[int, int] | None = None,
    seed: int = 0,
) -> NeoX:
    """A network with seeded random weights, built on ``meta`` and filled on ``device``.

    Each parameter draws from its own generator seeded by (seed, parameter name), so a
    pipeline stage holds exactly the weights the same layers have in the whole model.
    """
    with torch.device("meta"):
        model = NeoX(config, layer_range)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    for name, p in model.named_parameters():
        # init_random_ keeps its std and scaling rules; the per-name seed is ours.
        init_random_(_ParamView(config, name, p), seed=_seed_for(seed, name))  # type: ignore[arg-type]
    return model.eval()


def load_model(
    spec: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer: Tokenizer | str | Path | None = None,
    layer_range: tuple[int, int] | None = None,
    seed: int = 0,
    quantization: str | None = None,
) -> LoadedModel:
    """Load a model spec (``preset:NAME``, HF dir, NeoX YAML, neoxq dir) onto ``device``.

    ``layer_range=(start, stop)`` builds and reads only that pipeline stage's tensors.
    ``quantization="fp8"`` quantizes the blocks' linear layers once loaded, one at a time
    (see :func:`models.fp8.quantize_fp8_`).
    ``tokenizer`` (a path or a Tokenizer) overrides the checkpoint's own. Any problem
    with the checkpoint raises :class:`CheckpointError` naming the file and tensor;
    nothing is returned half-loaded.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = parse_dtype(dtype)
    quantization = canonical_quantization(quantization)  # a bad name fails before loading
    tok = _as_tokenizer(tokenizer)
    kind, where = _spec_kind(spec)
    if kind == "preset":
        cfg = get_preset(str(where))
        tok = tok or ByteTokenizer(cfg.eos_token_id)
        _check_vocab(tok, cfg, str(spec))
        model = random_model(cfg, device=device, dtype=dtype, layer_range=layer_range, seed=seed)
        apply_quantization(model, quantization)
        return LoadedModel(model, cfg, tok, f"{spec} (seed {seed})")

    plan = _plan(spec, tok, layer_range)
    for u in plan.units:
        if isinstance(u, _LazyUnit):
            _load_lazy(u, plan.config, layer_range)
    if tok is None:
        if plan.tokenizer is None:
            raise CheckpointError(
                f"{where}: no tokenizer.json beside the weights; pass one (--tokenizer PATH)"
            )
        tok = plan.tokenizer
    _check_vocab(tok, plan.config, plan.source)
    _check_and_select(plan, layer_range)

    with torch.device("meta"):
        model = NeoX(plan.config, layer_range)
    staging = _Staging(pin=True) if device.type == "cuda" else None
    with torch.no_grad():
        for unit in plan.units:
            for target, t in _read_unit(unit, device, dtype, staging):
                _assign(model, target, t)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # _check_and_select guarantees this cannot happen; never return a partial model
        raise CheckpointError(f"{plan.source}: parameters not loaded: {left[:5]}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    apply_quantization(model, quantization)
    return LoadedModel(model.eval(), plan.config, tok, plan.source)


def _load_lazy(u: _LazyUnit, cfg: NeoXConfig, layer_range: tuple[int, int] | None) -> None:
    start, stop = _stage_layers(cfg, layer_range)
    stem = _neoxq_layer_of(u.files[0].name)
    if stem.startswith("layer_"):
        wanted = start <= int(stem.removeprefix("layer_")) < stop
    elif stem == "embed":
        wanted = start == 0  # a tied last stage finds the head's copy in head.safetensors
    else:
        wanted = stop == cfg.num_layers
    if wanted:
        u.load()


def _check_vocab(tok: Tokenizer, cfg: NeoXConfig, source: str) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{source}: tokenizer {tok.name} has {tok.vocab_size} ids but the model's "
            f"embedding has only {cfg.vocab_size} rows"
        )


def _read_unit(
    unit: _Unit, device: torch.device, dtype: torch.dtype, staging: _Staging | None
) -> Iterator[tuple[str, Tensor]]:
    if unit.kind == "safetensors":
        assert unit.st is not None
        yield from _read_safetensors(unit.st, [(e.name, e.target) for e in unit.entries],
                                     device, dtype, staging)
    elif unit.kind == "torch":
        sd = _torch_load(unit.files[0])
        for e in unit.entries:
            yield e.target, _to_target(sd[e.name], device, dtype)
    else:  # NeoX: merge this layer's TP shards on the target device, then cast once
        per_rank = [_torch_load(f) for f in unit.files]
        for e in unit.entries:
            shards = [sd[e.name].to(device) for sd in per_rank]
            merged = merge_tp_shards(e.target, shards, unit.rules.get(e.target))
            yield e.target, _to_target(merged, device, dtype)


# --------------------------------------------------------------------------------------
# neoxq's own form
# --------------------------------------------------------------------------------------


def _layer_groups(model: NeoX) -> Iterable[tuple[str, dict[str, Tensor]]]:
    sd = model.state_dict()
    yield "embed.safetensors", {"embed_in.weight": sd["embed_in.weight"]}
    for i in range(model.config.num_layers):
        prefix = f"layers.{i}."
        yield f"layer_{i:03d}.safetensors", {n: t for n, t in sd.items() if n.startswith(prefix)}
    # The head file always holds embed_out, even when tied, so that a last pipeline
    # stage reads only its own file.
    yield "head.safetensors", {n: sd[n] for n in
                               ("final_layer_norm.weight", "final_layer_norm.bias",
                                "embed_out.weight")}


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: str | Path, tensors: dict[str, Tensor]) -> int:
    """Write a standard safetensors file straight from the tensors' memory (no serialised
    copy of the whole file, unlike ``safetensors.torch.save_file``); returns bytes written.
    CUDA tensors are copied to host one at a time."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(_bytes_of(t.detach().to("cpu").contiguous()))
    return 8 + len(raw) + offset


def save_neoxq(
    model: NeoX, tokenizer: Tokenizer, dst: str | Path,
    progress: Callable[[str], None] | None = None, threads: int = 1,
) -> Path:
    """Write a whole model in neoxq's form: one safetensors file per layer,
    ``neoxq_config.json`` (written last, so an interrupted write never loads) and the
    tokenizer. Tensors are written in the model's dtype; ``threads`` files at a time."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / NEOXQ_CONFIG).unlink(missing_ok=True)
    groups = list(_layer_groups(model))
    files = [fname for fname, _ in groups]

    def write(group: tuple[str, dict[str, Tensor]]) -> None:
        write_safetensors(dst / group[0], group[1])
        if progress:
            progress(group[0])

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(write, groups))
    meta: dict[str, Any] = {
        "format": "neoxq",
        "version": NEOXQ_FORMAT_VERSION,
        "config": model.config.to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "files": files,
    }
    if tokenizer.path is not None:
        shutil.copyfile(tokenizer.path, dst / "tokenizer.json")
    else:
        meta["tokenizer"] = "byte-level"
    (dst / NEOXQ_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: torch.dtype | str | None = None,
    *,
    tokenizer: Tokenizer | str | Path | None = None,
    seed: int = 0,
) -> Path:
    """Convert any spec to neoxq's form (fastest to load). ``dtype`` None keeps the
    checkpoint's stored dtype (float32 for presets). Holds one copy of the model in
    host memory while writing."""
    target = parse_dtype(dtype) if dtype is not None else _stored_dtype(src, tokenizer)
    loaded = load_model(src, device="cpu", dtype=target, tokenizer=tokenizer, seed=seed)
    return save_neoxq(loaded.model, loaded.tokenizer, dst)


def _stored_dtype(spec: str | Path, tokenizer: Tokenizer | str | Path | None) -> torch.dtype:
    if _spec_kind(spec)[0] == "preset":
        return torch.float32
    plan = _plan(spec, _as_tokenizer(tokenizer), None)
    for u in plan.units:
        if isinstance(u, _LazyUnit):
            u.load()
    counts: dict[torch.dtype, int] = {}
    for u in plan.units:
        for e in u.entries:
            if e.dtype.is_floating_point:
                counts[e.dtype] = counts.get(e.dtype, 0) + 1
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32
