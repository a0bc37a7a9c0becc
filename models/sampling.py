"""Sampling: validated per-request parameters, one vectorized draw per engine step, stop strings.

Three pieces, each usable on its own:

- :class:`SamplingParams` — what a request asks for, validated with errors that name the
  field (``"temperature: must be >= 0, got -1"``).
- :class:`SamplingBatch` + :func:`sample` — one step for a batch of rows that belong to
  different requests. Everything runs on the logits' device with no per-row Python in
  the hot path; the per-row tensors travel in one host→device copy.
- :class:`StopChecker` — per sample: counts tokens, spots EOS / stop token ids and stop
  strings (across token boundaries, through an incremental detokenizer) and yields the
  final text.

Randomness is *counter-based*: the uniform that decides token ``v`` for a row is
``hash(seed, sample_index, output_position, v)`` computed with int64 tensor ops, and the
draw is an exponential race (``argmax(logit - log(-log u))``, i.e. Gumbel-max). So a
request's tokens depend only on its own seed and logits, never on its batch neighbours,
on the step it was scheduled in, or on any ``torch.Generator`` state. The integers are
identical on every device; the floats derived from them (``log``) may differ in the last
bits between CPU and CUDA builds, so cross-device equality of sampled text is likely but
not guaranteed. Batch invariance of the filters (top-p's cumulative sum, softmax) is
exact on CPU and best-effort on GPU, where reduction order may depend on the batch shape.

One engine step::

    rows = [SampleRow(seq.params, seq.seed, seq.sample_index, position=len(seq.output),
                      output_ids=seq.output, prompt_ids=seq.prompt) for seq in running]
    batch = SamplingBatch.build(rows, device=logits.device, vocab_size=logits.shape[1],
                                valid_vocab=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
    result = sample(logits, batch)  # tokens, logprobs, top_ids, top_logprobs on the device
    for seq, tok in zip(running, result.tokens.tolist()):
        reason = seq.stop_checker.append(tok)  # "stop" / "length" / None
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.params import (  # noqa: F401 - re-exported: one import for the whole sampler
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    Decoder,
    IncrementalDetokenizer,
    SamplingParams,
    StopChecker,
    decode_output,
)

# ---------------------------------------------------------------------------------------
# Counter-based noise
# ---------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """Fold a Python int into int64 two's complement (torch has no uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)  # splitmix64's increment
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _srl(z: Tensor, s: int) -> Tensor:
    # torch's >> on int64 is arithmetic; masking off the sign-extended bits makes it logical.
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64's finalizer on int64 tensors; multiplications wrap mod 2**64 like uint64."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def row_keys(seed: Tensor, sample_index: Tensor, position: Tensor) -> Tensor:
    """(B,) int64 key per row from its seed, sample index and output position."""
    k = _mix64(seed + _GOLDEN)
    k = _mix64(k + sample_index * _GOLDEN)
    return _mix64(k + position * _GOLDEN)


def _mix64_(z: Tensor) -> Tensor:
    """In-place :func:`_mix64` for the big (B, V) tensor: one scratch buffer, no temporaries
    per operation (the noise is the largest elementwise cost of a sampled step)."""
    t = torch.empty_like(z)
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(t)
        if mult is not None:
            z.mul_(mult)
    return z


_VOCAB_STEPS: dict[tuple[torch.device, int], Tensor] = {}


def _vocab_steps(device: torch.device, vocab: int) -> Tensor:
    """(V,) int64 ``(v + 1) * golden``, cached per device and size (it never changes)."""
    key = (device, vocab)
    if key not in _VOCAB_STEPS:
        v = torch.arange(1, vocab + 1, device=device, dtype=torch.int64)
        _VOCAB_STEPS[key] = v * _GOLDEN
    return _VOCAB_STEPS[key]


def uniform_noise(keys: Tensor, vocab: int) -> Tensor:
    """(B, V) float32 uniforms in (0, 1), a pure function of (key, vocab id).

    23 bits per draw: u = (k + 0.5) / 2**23 is never 0 or 1 in float32 (its largest,
    1 - 2**-24, is the float just below 1; with 24 bits the largest would round up to
    exactly 1, whose Gumbel noise is +inf, and +inf plus a filtered token's -inf is NaN,
    which argmax picks: about one draw in 16 million, so a few steps in every thousand
    at this vocabulary would sample a masked or filtered token). The smallest u cuts
    off the chance that a token 16.6 nats below the best one wins, which no practical
    sampling notices.
    """
    h = _mix64_(keys[:, None] + _vocab_steps(keys.device, vocab)[None, :])  # (B, V)
    h.bitwise_right_shift_(41)  # the top 23 bits...
    h.bitwise_and_((1 << 23) - 1)  # ...without the sign extension of an arithmetic shift
    return h.to(torch.float32).add_(0.5).mul_(1.0 / (1 << 23))


def exponential_race_scores(keys: Tensor, vocab: int) -> Tensor:
    """(B, V) ``-log(-log u)``: standard Gumbel noise; argmax(logits + it) samples
    softmax(logits)."""
    u = uniform_noise(keys, vocab)
    return u.log_().neg_().log_().neg_()


# ---------------------------------------------------------------------------------------
# One step for a batch
# ---------------------------------------------------------------------------------------


@dataclass
class SampleRow:
    """One sequence's state for this step, as the engine knows it."""

    params: SamplingParams
    seed: int
    """The request's seed (params.seed, or the engine's pick at arrival)."""
    sample_index: int = 0
    """Which of the request's n samples this row is."""
    position: int = 0
    """Output tokens generated so far (the index of the token being drawn)."""
    output_ids: Sequence[int] = ()
    """Output tokens so far; read only when the params have penalties."""
    prompt_ids: Sequence[int] = ()
    """Prompt tokens; read only when ``repetition_penalty != 1``."""


# Float columns packed per row (as float64 bit patterns inside the int64 buffer).
_F_TEMP, _F_TOP_P, _F_MIN_P, _F_REP, _F_PRES, _F_FREQ = range(6)
_N_FLOAT = 6


@dataclass
class SamplingBatch:
    """Device tensors for one :func:`sample` call; build with :meth:`build`.

    Flags (``all_greedy``, ``any_*``, ``max_top_k``) are host values, so branching on
    them costs no device sync.
    """

    size: int
    vocab_size: int
    valid_vocab: int
    keys: Tensor  # (B,) int64 noise key per row
    greedy: Tensor  # (B,) bool
    floats: Tensor  # (B, 6) float32: temperature, top_p, min_p, rep, presence, frequency
    top_k: Tensor  # (B,) int64, 0 = off
    ban_rows: Tensor  # (nb,) int64 — (row, token) pairs set to -inf (min_tokens)
    ban_ids: Tensor
    out_rows: Tensor  # (no,) — output tokens of rows with penalties (with repeats)
    out_ids: Tensor
    seen_rows: Tensor  # (ns,) — prompt tokens of rows with a repetition penalty
    seen_ids: Tensor
    all_greedy: bool
    any_greedy: bool
    any_temperature: bool
    """Some row has a temperature other than 0 or 1 (else the division is skipped)."""
    any_penalty: bool
    any_rep_penalty: bool
    any_top_k: bool
    max_top_k: int
    any_top_p: bool
    any_min_p: bool
    num_logprobs: list[int | None]
    """Per row: how many top alternatives it asked for (None = no logprobs)."""
    max_logprobs: int | None
    mask_rows: Tensor | None = None
    """(nc,) int64: the rows under a grammar constraint (None when there are none)."""
    mask_bytes: Tensor | None = None
    """(nc, ceil(vocab_size / 8)) uint8, packed: bit ``v % 8`` of byte ``v // 8`` set
    when token ``v`` is allowed in that row (unpacked where it is applied)."""
    mask_all_rows: bool = False
    """The constrained rows are every row, in order (no row gather needed)."""

    @classmethod
    def build(
        cls,
        rows: Sequence[SampleRow],
        *,
        device: torch.device | str,
        vocab_size: int,
        valid_vocab: int | None = None,
        eos_id: int | None = None,
        masks: tuple[Sequence[int], np.ndarray] | None = None,
    ) -> SamplingBatch:
        """Pack the rows' parameters into one CPU buffer and copy it to ``device`` once.

        ``masks``: grammar-constrained rows and their allowed tokens, as ``(rows,
        bitmask)`` with one int32 row of ``ceil(vocab_size / 32)`` words per constrained
        row (bit ``v % 32`` of word ``v // 32`` = token ``v`` allowed; models/grammar.py
        fills them). They travel in the same copy, packed (1/32 of a bool mask).

        ``vocab_size`` is the logits' width (the padded embedding, 50432 for the 20B);
        ``valid_vocab`` the tokenizer's size (50277) — ids at or above it are never
        drawn. ``eos_id`` is banned (with ``stop_token_ids``) while a row is below its
        ``min_tokens``, unless the row ignores EOS.
        """
        device = torch.device(device)
        b = len(rows)
        valid = vocab_size if valid_vocab is None else min(valid_vocab, vocab_size)
        ints = np.zeros((5, b), dtype=np.int64)  # seed, sample index, position, top_k, greedy
        flts = np.zeros((_N_FLOAT, b), dtype=np.float64)
        ban_r: list[int] = []
        ban_i: list[int] = []
        out_r: list[np.ndarray] = []
        out_i: list[np.ndarray] = []
        seen_r: list[np.ndarray] = []
        seen_i: list[np.ndarray] = []
        num_logprobs: list[int | None] = []
        any_rep = any_pen = False
        for r, row in enumerate(rows):
            p = row.params
            ints[0, r] = _i64(row.seed)
            ints[1, r] = row.sample_index
            ints[2, r] = row.position
            ints[3, r] = p.top_k if p.top_k > 0 else 0
            ints[4, r] = p.temperature == 0
            # Greedy rows divide by 1 so that the (discarded) sampled branch stays finite.
            flts[:, r] = (p.temperature if p.temperature > 0 else 1.0, p.top_p, p.min_p,
                          p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
            num_logprobs.append(p.logprobs)
            if row.position < p.min_tokens:
                banned = list(p.stop_token_ids)
                if eos_id is not None and not p.ignore_eos:
                    banned.append(eos_id)
                banned = [t for t in banned if t < valid]
                ban_r.extend([r] * len(banned))
                ban_i.extend(banned)
            if p.presence_penalty != 0 or p.frequency_penalty != 0 or (
                p.repetition_penalty != 1
            ):
                any_pen = True
                ids = np.asarray(row.output_ids, dtype=np.int64)
                out_r.append(np.full(len(ids), r, dtype=np.int64))
                out_i.append(ids)
            if p.repetition_penalty != 1:
                any_rep = True
                ids = np.asarray(row.prompt_ids, dtype=np.int64)
                seen_r.append(np.full(len(ids), r, dtype=np.int64))
                seen_i.append(ids)

        def cat(rows_: list[np.ndarray], ids_: list[np.ndarray]) -> list[np.ndarray]:
            if not rows_:
                return [np.zeros(0, dtype=np.int64)] * 2
            r_, i_ = np.concatenate(rows_), np.concatenate(ids_)
            ok = (i_ >= 0) & (i_ < valid)  # a padded id cannot index the (B, valid) logits
            return [r_[ok], i_[ok]]

        pieces = [
            ints.reshape(-1),
            flts.reshape(-1).view(np.int64),  # bit-exact through the int64 buffer
            np.asarray(ban_r, dtype=np.int64),
            np.asarray(ban_i, dtype=np.int64),
            *cat(out_r, out_i), *cat(seen_r, seen_i),
        ]
        words = 0
        if masks is not None and len(masks[0]):
            bits = np.ascontiguousarray(masks[1], dtype=np.int32)
            if bits.shape[1] % 2:  # int32 words travel as int64 pairs
                bits = np.pad(bits, ((0, 0), (0, 1)))
            words = bits.shape[1]
            pieces += [np.asarray(masks[0], dtype=np.int64), bits.reshape(-1).view(np.int64)]
        sizes = [len(x) for x in pieces]
        host = torch.from_numpy(np.concatenate(pieces))
        if device.type == "cuda":
            host = host.pin_memory()  # lets the copy run asynchronously
        dev = host.to(device, non_blocking=True)
        parts = list(torch.split(dev, sizes))
        ints_d = parts[0].view(5, b)
        floats = parts[1].view(torch.float64).view(_N_FLOAT, b).t().to(torch.float32)
        mask_rows = mask_bytes = None
        mask_all = False
        if words:
            mask_rows = parts[8]
            # Little-endian int32 words as bytes: bit j of byte k is token 8 k + j.
            mask_bytes = parts[9].view(torch.uint8).view(len(masks[0]), -1)
            mask_all = list(masks[0]) == list(range(b))
        temps = [r.params.temperature for r in rows]
        top_ks = [r.params.top_k for r in rows]
        lps = [x for x in num_logprobs if x is not None]
        return cls(
            size=b,
            vocab_size=vocab_size,
            valid_vocab=valid,
            keys=row_keys(ints_d[0], ints_d[1], ints_d[2]),
            greedy=ints_d[4].bool(),
            floats=floats,
            top_k=ints_d[3],
            ban_rows=parts[2], ban_ids=parts[3],
            out_rows=parts[4], out_ids=parts[5],
            seen_rows=parts[6], seen_ids=parts[7],
            all_greedy=all(t == 0 for t in temps),
            any_greedy=any(t == 0 for t in temps),
            any_temperature=any(t not in (0, 1) for t in temps),
            any_penalty=any_pen,
            any_rep_penalty=any_rep,
            any_top_k=any(k > 0 and t > 0 for k, t in zip(top_ks, temps, strict=True)),
            max_top_k=max([k for k in top_ks if k > 0], default=0),
            any_top_p=any(r.params.top_p < 1 and r.params.temperature > 0 for r in rows),
            any_min_p=any(r.params.min_p > 0 and r.params.temperature > 0 for r in rows),
            num_logprobs=num_logprobs,
            max_logprobs=max(lps) if lps else None,
            mask_rows=mask_rows, mask_bytes=mask_bytes, mask_all_rows=mask_all,
        )


@dataclass
class SampleResult:
    """What one step drew, all on the logits' device."""

    tokens: Tensor  # (B,) int64
    logprobs: Tensor  # (B,) float32: chosen token under log_softmax(raw logits)
    top_ids: Tensor | None  # (B, k) int64, k = the largest `logprobs` asked in the batch
    top_logprobs: Tensor | None  # (B, k) float32


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (prompt+output), then presence and frequency (output) penalties.

    Rows without penalties are untouched bit for bit: x / 1.0 and x - 0.0 are exact.
    """
    b, v = logits.shape
    if batch.any_rep_penalty:
        seen = torch.zeros(b, v, dtype=torch.bool, device=logits.device)
        seen[batch.seen_rows, batch.seen_ids] = True
        seen[batch.out_rows, batch.out_ids] = True
        rep = batch.floats[:, _F_REP : _F_REP + 1]  # (B, 1)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if batch.out_ids.numel():
        counts = torch.zeros(b, v, dtype=logits.dtype, device=logits.device)
        counts.index_put_((batch.out_rows, batch.out_ids),
                          torch.ones_like(batch.out_ids, dtype=logits.dtype), accumulate=True)
        freq = batch.floats[:, _F_FREQ : _F_FREQ + 1]
        pres = batch.floats[:, _F_PRES : _F_PRES + 1]
        logits = logits - freq * counts - pres * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor | None,
                      max_top_k: int) -> Tensor:
    """Mask to -inf what top-k (k > 0) and top-p (p < 1) drop; ties at a cut are kept.

    Without top-p only ``topk(max_k)`` runs, not a full sort. With top-p the
    vocabulary is sorted once (stable, so ties order by id) and both cuts are read off
    it; the top-p rule is Hugging Face's (drop the ascending prefix whose mass is
    <= 1 - p, always keep the top token).
    """
    b, v = logits.shape
    # A fill, not a copy of a host scalar (which would wait for the device).
    neg_inf = logits.new_full((), float("-inf"))
    k = top_k.clamp(max=v)
    if top_p is None:
        kmax = min(max_top_k, v)
        kth = logits.topk(kmax, dim=-1).values  # (B, kmax), descending
        thr = kth.gather(1, (k - 1).clamp(min=0)[:, None])  # (B, 1) k-th largest value
        thr = torch.where(k[:, None] > 0, thr, neg_inf)
        return logits.masked_fill(logits < thr, float("-inf"))
    asc, _ = logits.sort(dim=-1, stable=True)  # (B, V) ascending
    thr_k = asc.gather(1, (v - k).clamp(max=v - 1)[:, None])  # k-th largest; k=0 → inf
    thr_k = torch.where(k[:, None] > 0, thr_k, neg_inf)
    asc = asc.masked_fill(asc < thr_k, float("-inf"))  # still ascending
    cum = asc.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p)[:, None]
    drop[:, -1] = False
    # `drop` is a prefix (cum is non-decreasing): its length indexes the smallest kept value.
    first_kept = drop.sum(dim=-1, keepdim=True)
    thr_p = asc.gather(1, first_kept)
    thr_p = torch.where((top_p < 1)[:, None], thr_p, neg_inf)
    thr = torch.maximum(thr_k, thr_p)
    return logits.masked_fill(logits < thr, float("-inf"))


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` × the top probability (HF rule)."""
    probs = logits.softmax(dim=-1)
    thr = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < thr, float("-inf"))


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """(B, valid_vocab) float32 scores that the draw samples from: penalties, bans,
    temperature, top-k, top-p, min-p (filtered tokens are -inf). For greedy rows the
    argmax of this equals the argmax before temperature and filters."""
    x = _penalized(_valid_logits(logits, batch), batch)
    f = batch.floats
    if batch.any_temperature:
        x = x / f[:, _F_TEMP : _F_TEMP + 1]
    if batch.any_top_k or batch.any_top_p:
        x = apply_top_k_top_p(
            x, batch.top_k, f[:, _F_TOP_P] if batch.any_top_p else None, batch.max_top_k)
    if batch.any_min_p:
        x = apply_min_p(x, f[:, _F_MIN_P])
    return x


def sample(logits: Tensor, batch: SamplingBatch) -> SampleResult:
    """Draw one token per row of ``logits`` (B, V).

    Order: penalties → bans (min_tokens; ids >= valid_vocab are never considered) →
    grammar masks →
    greedy rows take the argmax → temperature → top-k → top-p → min-p → counter-based
    exponential race. ``logprobs`` are always under the model's own distribution
    (log_softmax of the raw logits over the valid vocabulary), as OpenAI reports them.
    """
    raw = _valid_logits(logits, batch)
    if batch.all_greedy:
        tokens = _penalized(raw, batch).argmax(dim=-1)  # fast path: no sort, no noise
    else:
        x = process_logits(raw, batch)
        # Exponential race: argmax_v p_v / E_v with E_v = -log u_v draws v with prob p_v;
        # in log space that is Gumbel-max.
        tokens = (exponential_race_scores(batch.keys, x.shape[1]).add_(x)).argmax(dim=-1)
        if batch.any_greedy:
            # Temperature and the filters are monotone or keep the top token, so the
            # argmax of the processed scores is the greedy token.
            tokens = torch.where(batch.greedy, x.argmax(dim=-1), tokens)
    return _with_logprobs(raw, tokens, batch)


def _valid_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    if logits.dim() != 2 or logits.shape[0] != batch.size:
        raise ValueError(f"logits: expected ({batch.size}, V), got {tuple(logits.shape)}")
    raw = logits.float()
    if batch.valid_vocab < raw.shape[1]:
        # Padded embedding rows are not tokens: cut them off instead of masking.
        raw = raw[:, : batch.valid_vocab]
    return raw


def _penalized(x: Tensor, batch: SamplingBatch) -> Tensor:
    if batch.any_penalty:
        x = apply_penalties(x, batch)
    if batch.ban_ids.numel():
        x = x.index_put((batch.ban_rows, batch.ban_ids), x.new_full((), float("-inf")))
    if batch.mask_rows is not None and batch.mask_bytes is not None:
        banned = disallowed(batch.mask_bytes, x.shape[1])
        # Out of place: ``x`` may still be the raw logits the logprobs are read from.
        if batch.mask_all_rows:
            x = x.masked_fill(banned, float("-inf"))
        else:
            rows = x.index_select(0, batch.mask_rows).masked_fill_(banned, float("-inf"))
            x = x.index_copy(0, batch.mask_rows, rows)
    return x


_BIT_SHIFTS: dict[torch.device, Tensor] = {}


def disallowed(mask_bytes: Tensor, vocab: int) -> Tensor:
    """(nc, vocab) bool: the tokens a packed mask (see ``SamplingBatch.mask_bytes``) does
    not allow. Three byte-wide passes on the device, no gather."""
    shifts = _BIT_SHIFTS.get(mask_bytes.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[mask_bytes.device] = torch.arange(
            8, device=mask_bytes.device, dtype=torch.uint8)
    bits = torch.bitwise_right_shift(mask_bytes[:, :, None], shifts)  # (nc, bytes, 8)
    bits.bitwise_and_(1).bitwise_xor_(1)  # 1 where the bit is clear
    # 0/1 bytes are valid bools: a view, not a copy.
    return bits.view(torch.bool).view(len(mask_bytes), -1)[:, :vocab]


def _with_logprobs(raw: Tensor, tokens: Tensor, batch: SamplingBatch) -> SampleResult:
    lse = raw.logsumexp(dim=-1, keepdim=True)  # (B, 1)
    chosen = raw.gather(1, tokens[:, None]) - lse
    top_ids = top_lp = None
    if batch.max_logprobs is not None:
        k = min(batch.max_logprobs, raw.shape[1])
        vals, top_ids = raw.topk(k, dim=-1)
        top_lp = vals - lse
    return SampleResult(tokens=tokens, logprobs=chosen[:, 0], top_ids=top_ids,
                        top_logprobs=top_lp)
