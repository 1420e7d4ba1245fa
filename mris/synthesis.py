"""Synthesis (paper eq. 4): the similarity-weighted average of the k neighbours' maps.

    y_hat = sum_i w_i y_i,   w_i = s_i / sum_j s_j

with s_i the cosine similarity of neighbour i, plus a per-pixel weighted standard deviation
(how much the neighbours disagree there). Everything is vectorised over a batch of queries.

Rules (the paper is silent on both; these are ours):

- **Non-positive similarities.** Eq. 4 assumes s_i > 0. A neighbour with s_i <= 0 (or NaN, or
  a FAISS "no result" slot) gets weight 0, i.e. similarities are clipped at 0 before
  normalising. If every neighbour of a query has s_i <= 0, all valid neighbours weigh the same
  (1/k): the answer is still the neighbours' plain average rather than NaN. With trained
  encoders and k = 20 this never happens in practice; it only keeps the arithmetic defined.
- **NaN (outside cartilage).** Two named rules (``NAN_RULES``), chosen per call:

  - ``all`` (``PAPER_NAN_RULE``): the reference's. It sums the k NaN-propagating maps, so a
    pixel is cartilage only where EVERY neighbour has cartilage; its value is then plain eq. 4.
    Every neighbour counts, including one whose weight is 0 (similarity <= 0): the reference
    sums all k maps and NaN * 0 is NaN. Only FAISS "no result" slots (non-finite similarity, see
    ``similarity_weights``) are not neighbours and do not count. Every comparison with the paper
    uses this rule (``mris evaluate --nan-rule``, default ``all``).
  - ``majority``: a pixel is cartilage when the neighbours that have cartilage there carry at
    least ``min_cartilage_share`` (default 0.5) of the total weight; a weighted majority vote on
    the cartilage mask. Its value is the weighted average renormalised over those neighbours
    only (their weights divided by their share), so a thin rim where few neighbours have
    cartilage is not pulled towards 0.

  Elsewhere the answer is NaN, and so is the standard deviation. With every neighbour valid
  everywhere both rules are exactly eq. 4. ``DEFAULT_NAN_RULE`` (``majority``) is what the
  pipeline and the service use when the caller names none. Measured reason (demo bundle, test
  split, k = 20, ``benchmarks/bench_nan_rule.py``): ``majority`` covers 97.7 % / 96.2 % of the
  true femoral / tibial cartilage against 94.1 % / 87.1 % for ``all``, with the same error
  where both cover (MAE 0.333 / 0.289 mm against 0.334 / 0.293 mm).
- **Standard deviation.** sqrt(sum_i w_i m_i (y_i - y_hat)^2 / sum_i w_i m_i) with m_i the
  cartilage mask of neighbour i: the weighted population standard deviation (no bias
  correction), in mm.

Shapes: similarities ``[N, k]``; neighbour maps ``[N, k, H, W]`` (float16 or float32, mm, NaN
outside cartilage); outputs float32 ``[N, H, W]``.

Two entry points, one computation:

- ``synthesize(neighbour_maps, similarities)``: the maps already gathered, ``[N, k, H, W]``.
- ``synthesize_rows(maps, row_ids, similarities)``: the k rows picked by id from a whole maps
  array ``[rows, H, W]`` (a bundle's resident maps) and read in place, without a gathered copy;
  row -1 is a neighbour without a map (NaN everywhere). ``MapStore.synthesize`` and
  ``IndexBundle.synthesize_neighbours`` serve the pipeline with it.

Both run one compiled kernel (numba, ``nogil``, one thread). Per block of 128 pixels it reads
each neighbour's row once from memory and accumulates the cartilage weight share, the weighted
sum (and for ``all`` the count of neighbours with cartilage), then takes the deviations from
the block's mean in a second pass over the same block, now in the L1 cache: the two-pass
spread of the reference semantics, without float32 cancellation, at one read of the maps.
float16 maps are read as such and widened to float32 in registers; sums are float32, so the
results equal a float32 numpy formulation to float32 rounding (``tests/test_synthesis.py``
keeps one as the oracle). At k = 20 and 310 x 310 this is about 0.6-0.8 ms per cartilage on
one core of our shared 2-core machines, close to the time it takes to read the 7.7 MB of
float32 rows at all (``benchmarks/bench_vs_reference.py``).

Compilation: importing this module imports numba (about 0.2 s); the kernel is compiled on its
first call for each maps dtype (2-4 s here) and cached on disk (``cache=True``: numba's
``NUMBA_CACHE_DIR``, else ``__pycache__`` beside this file, else ``~/.cache/numba``), so later
processes load it instead (about 0.4 s for the first, milliseconds for the next). Where none of
those is writable the kernel is compiled without a cache, once per process. ``warm_up(dtype)``
compiles or loads it ahead of use: ``MapStore`` calls it when it loads resident maps, so a
service's first request does not pay it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

NanRule = Literal["majority", "all"]
NAN_RULES: tuple[str, ...] = get_args(NanRule)
PAPER_NAN_RULE: NanRule = "all"
DEFAULT_NAN_RULE: NanRule = "majority"
DEFAULT_MIN_CARTILAGE_SHARE = 0.5
# Pixels per block of the kernel: k = 20 rows of a block (10 KB float32) stay in L1 for the
# second pass. Measured at 310 x 310, k = 20: 128 best, 64 and 512 about 1.2x slower.
BLOCK_PX = 128


@dataclass
class Synthesis:
    """The answer for N queries.

    - ``thickness_mm``: float32 [N, H, W], NaN outside cartilage.
    - ``std_mm``: float32 [N, H, W], the neighbours' weighted standard deviation, NaN outside.
    - ``weights``: float32 [N, k], the w_i of eq. 4 (sum to 1 per query).
    - ``cartilage_share``: float32 [N, H, W], weight share of neighbours with cartilage per pixel.
    - ``nan_rule``: the NaN rule that made the maps (``NAN_RULES``).
    """

    thickness_mm: np.ndarray
    std_mm: np.ndarray
    weights: np.ndarray
    cartilage_share: np.ndarray
    nan_rule: str = DEFAULT_NAN_RULE


def similarity_weights(similarities: np.ndarray) -> np.ndarray:
    """w_i = s_i / sum_j s_j over [N, k] similarities, with the rules in the module docstring.

    Non-finite similarities (FAISS pads missing results with -inf / -3.4e38) weigh 0 and do not
    count in the equal-weights fallback.
    """
    return _weights_and_slots(similarities)[0]


def _weights_and_slots(similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``similarity_weights`` and ``_neighbour_slots`` of [N, k] similarities, in one go."""
    similarities = np.atleast_2d(np.asarray(similarities, dtype=np.float64))
    finite = _neighbour_slots(similarities)
    clipped = np.where(finite, np.clip(similarities, 0.0, None), 0.0)
    total = clipped.sum(axis=1, keepdims=True)
    equal = finite / np.maximum(finite.sum(axis=1, keepdims=True), 1)
    weights = np.where(total > 0, clipped / np.where(total > 0, total, 1.0), equal)
    return weights.astype(np.float32), finite


def _neighbour_slots(similarities: np.ndarray) -> np.ndarray:
    """bool [N, k]: slots holding a neighbour (FAISS "no result" slots are non-finite or
    -3.4e38)."""
    similarities = np.atleast_2d(np.asarray(similarities, dtype=np.float64))
    return np.isfinite(similarities) & (similarities > -1e30)


def synthesize(
    neighbour_maps: np.ndarray,
    similarities: np.ndarray,
    min_cartilage_share: float = DEFAULT_MIN_CARTILAGE_SHARE,
    nan_rule: NanRule = DEFAULT_NAN_RULE,
) -> Synthesis:
    """Eq. 4 for a batch: neighbour_maps [N, k, H, W] (or [k, H, W] for one query), similarities
    [N, k] (or [k]) -> ``Synthesis`` with [N, H, W] maps (N = 1 for the unbatched form).

    ``nan_rule`` is ``majority`` or ``all`` (module docstring); ``min_cartilage_share`` is the
    majority rule's threshold and is not used by ``all``. The maps as rows of one array, each
    query's own k rows: ``synthesize_rows`` on them."""
    maps = np.asarray(neighbour_maps)
    if maps.ndim == 3:
        maps = maps[None]
    if maps.ndim != 4:
        raise ValueError(f"neighbour maps must be [N, k, H, W], got shape {maps.shape}")
    n, k, h, w = maps.shape
    similarities = np.atleast_2d(np.asarray(similarities))
    if similarities.shape != (n, k):
        raise ValueError(
            f"similarities {similarities.shape} do not match neighbour maps {maps.shape[:2]}"
        )
    row_ids = np.arange(n * k, dtype=np.int64).reshape(n, k)
    return synthesize_rows(
        maps.reshape(n * k, h, w), row_ids, similarities, min_cartilage_share, nan_rule
    )


def synthesize_rows(
    maps: np.ndarray,
    row_ids: np.ndarray,
    similarities: np.ndarray,
    min_cartilage_share: float = DEFAULT_MIN_CARTILAGE_SHARE,
    nan_rule: NanRule = DEFAULT_NAN_RULE,
) -> Synthesis:
    """Eq. 4 over rows of a maps array, read in place: maps [rows, H, W] (float16 or float32 mm,
    NaN outside cartilage; other dtypes are converted to float32, a copy), row_ids int [N, k]
    (or [k]) with -1 for a neighbour without a map, similarities [N, k] (or [k]) ->
    ``Synthesis`` with [N, H, W] maps. The same answer as ``synthesize(maps[row_ids], ...)``
    (a row -1 as an all-NaN map), without the gathered copy. ``IndexError`` for a row id past
    the array."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [rows, H, W], got shape {maps.shape}")
    # A fresh writable C-ordered copy (tiny): one compiled variant serves every caller's ids.
    row_ids = np.array(row_ids, dtype=np.int64, ndmin=2)
    weights, slots = _weights_and_slots(similarities)
    if weights.shape != row_ids.shape:
        raise ValueError(f"similarities {weights.shape} do not match row ids {row_ids.shape}")
    if nan_rule not in NAN_RULES:
        raise ValueError(f"nan_rule must be one of {', '.join(NAN_RULES)}, got {nan_rule!r}")
    if not 0.0 < min_cartilage_share <= 1.0:
        raise ValueError(f"min_cartilage_share must be in (0, 1], got {min_cartilage_share}")
    rows, h, w = maps.shape
    if row_ids.size and row_ids.max() >= rows:
        raise IndexError(f"row {row_ids.max()} out of range ({rows} rows)")
    n = row_ids.shape[0]
    # One allocation for the three outputs: glibc then keeps reusing the same heap memory across
    # calls, where three fresh 384 KB arrays came back page-faulted (+0.3-0.5 ms at 310 x 310).
    thickness, std, share = np.empty((3, n, h * w), np.float32)
    # The kernel's threshold, in float32 as the comparison is made.
    min_share = np.float32(min_cartilage_share) - np.float32(1e-6)
    _kernel(
        _kernel_rows(maps),
        row_ids,
        weights,
        slots.astype(np.float32),
        nan_rule == "all",
        min_share,
        thickness,
        std,
        share,
    )
    return Synthesis(
        thickness_mm=thickness.reshape(n, h, w),
        std_mm=std.reshape(n, h, w),
        weights=weights,
        cartilage_share=share.reshape(n, h, w),
        nan_rule=nan_rule,
    )


def warm_up(dtype: str | np.dtype = "float32") -> None:
    """Compile the kernel for maps of ``dtype`` now, or load it from numba's on-disk cache, so
    that the first ``synthesize_rows`` on such maps does not pay it (1-2 s uncached)."""
    synthesize_rows(np.zeros((1, 1, 1), dtype), np.zeros((1, 1), np.int64), np.ones((1, 1)))


def _kernel_rows(maps: np.ndarray) -> np.ndarray:
    """maps [rows, H, W] -> the kernel's C-ordered [rows, H * W] view: float32, or float16 as
    its uint16 bits (numba has no float16 type on the CPU; the kernel widens them)."""
    maps = np.ascontiguousarray(maps)
    if maps.dtype == np.float16:
        maps = maps.view(np.uint16)
    elif maps.dtype != np.float32:
        maps = maps.astype(np.float32)
    return maps.reshape(maps.shape[0], maps.shape[1] * maps.shape[2])


@intrinsic
def _as_float32(typingctx, value):
    """float32 -> itself; uint16 holding float16 bits -> the float32 value (LLVM's ``fpext``
    of a half: one ``vcvtph2ps`` per vector on x86 with F16C)."""
    if isinstance(value, types.Float) and value.bitwidth == 32:

        def codegen(context, builder, signature, args):
            return args[0]

    elif isinstance(value, types.Integer) and value.bitwidth == 16 and not value.signed:

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    else:
        return None
    return types.float32(value), codegen


def _jit(function):
    """numba's ``njit`` with an on-disk cache, or without one where numba finds no writable
    cache directory (it raises RuntimeError then: a read-only ``NUMBA_CACHE_DIR`` with a
    read-only install and home)."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:
        return numba.njit(nogil=True)(function)


@_jit
def _kernel(maps, row_ids, weights, slots, every, min_share, thickness, std, share):
    """The module docstring's computation for N queries.

    maps float32 or uint16 (float16 bits) [rows, P]; row_ids int64 [N, k] (< 0: no map);
    weights float32 [N, k] (``similarity_weights``); slots float32 [N, k] (1 for a neighbour, 0
    for a "no result" slot); every: the ``all`` rule, else ``majority`` with float32 threshold
    min_share; thickness, std, share: float32 [N, P] outputs.

    Rows are taken four at a time (the last group padded with the first row at weight 0, which
    adds exact zeros), so each accumulator is loaded and stored once per four rows; written out
    by hand, as numba's vectorizer does not unroll an inner loop over them (1.2x faster than
    pairs, 8x than a loop). Indices are unsigned: numba then emits no negative-index
    wrap-around and the pixel loops vectorize.
    """
    n, k = row_ids.shape
    pixels = maps.shape[1]
    flat = maps.reshape(maps.size)
    thickness_flat = thickness.reshape(thickness.size)
    std_flat = std.reshape(std.size)
    share_flat = share.reshape(share.size)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    half = np.float32(0.5)
    nan = np.float32(np.nan)
    acc_share = np.empty(BLOCK_PX, np.float32)
    acc_sum = np.empty(BLOCK_PX, np.float32)
    acc_count = np.empty(BLOCK_PX, np.float32)
    acc_var = np.empty(BLOCK_PX, np.float32)
    mean = np.empty(BLOCK_PX, np.float32)
    # per group of four rows: where each row starts in `flat`, its weight, its neighbour count
    group_start = np.empty((k // 4 + 1, 4), np.uint64)
    group_weight = np.zeros((k // 4 + 1, 4), np.float32)
    group_count = np.zeros((k // 4 + 1, 4), np.float32)
    for q in range(n):
        needed = zero  # neighbours (not "no result" slots), for `all`
        present = 0  # neighbours with a map row
        for i in range(k):
            needed += slots[q, i]
            if row_ids[q, i] >= 0:
                group_start[present // 4, present % 4] = np.uint64(row_ids[q, i] * pixels)
                group_weight[present // 4, present % 4] = weights[q, i]
                group_count[present // 4, present % 4] = slots[q, i]
                present += 1
        groups = (present + 3) // 4
        for j in range(present, 4 * groups):
            group_start[j // 4, j % 4] = group_start[0, 0]
            group_weight[j // 4, j % 4] = zero
            group_count[j // 4, j % 4] = zero
        out = np.uint64(q * pixels)
        for block in range(0, pixels, BLOCK_PX):
            start = np.uint64(block)
            width = np.uint64(min(BLOCK_PX, pixels - block))
            for p in range(width):
                acc_share[p] = zero
                acc_sum[p] = zero
                acc_count[p] = zero
                acc_var[p] = zero
            # pass 1: weight share, weighted sum (NaN = no cartilage = no contribution), count
            for t in range(groups):
                a = group_start[t, 0] + start
                b = group_start[t, 1] + start
                c = group_start[t, 2] + start
                d = group_start[t, 3] + start
                wa = group_weight[t, 0]
                wb = group_weight[t, 1]
                wc = group_weight[t, 2]
                wd = group_weight[t, 3]
                ca = group_count[t, 0]
                cb = group_count[t, 1]
                cc = group_count[t, 2]
                cd = group_count[t, 3]
                for p in range(width):
                    va = _as_float32(flat[a + p])
                    vb = _as_float32(flat[b + p])
                    vc = _as_float32(flat[c + p])
                    vd = _as_float32(flat[d + p])
                    ha = va == va
                    hb = vb == vb
                    hc = vc == vc
                    hd = vd == vd
                    acc_share[p] += ((wa if ha else zero) + (wb if hb else zero)) + (
                        (wc if hc else zero) + (wd if hd else zero)
                    )
                    acc_sum[p] += ((wa * va if ha else zero) + (wb * vb if hb else zero)) + (
                        (wc * vc if hc else zero) + (wd * vd if hd else zero)
                    )
                    if every:  # loop-invariant: hoisted out of the vector loop
                        acc_count[p] += ((ca if ha else zero) + (cb if hb else zero)) + (
                            (cc if hc else zero) + (cd if hd else zero)
                        )
            for p in range(width):
                weight_share = acc_share[p]
                mean[p] = acc_sum[p] / (weight_share if weight_share > zero else one)
            # pass 2 (the block's rows are now cached): weighted squared deviations
            for t in range(groups):
                a = group_start[t, 0] + start
                b = group_start[t, 1] + start
                c = group_start[t, 2] + start
                d = group_start[t, 3] + start
                wa = group_weight[t, 0]
                wb = group_weight[t, 1]
                wc = group_weight[t, 2]
                wd = group_weight[t, 3]
                for p in range(width):
                    m = mean[p]
                    va = _as_float32(flat[a + p])
                    vb = _as_float32(flat[b + p])
                    vc = _as_float32(flat[c + p])
                    vd = _as_float32(flat[d + p])
                    da = va - m if va == va else zero
                    db = vb - m if vb == vb else zero
                    dc = vc - m if vc == vc else zero
                    dd = vd - m if vd == vd else zero
                    acc_var[p] += (wa * (da * da) + wb * (db * db)) + (
                        wc * (dc * dc) + wd * (dd * dd)
                    )
            at = out + start
            for p in range(width):
                weight_share = acc_share[p]
                if every:
                    inside = acc_count[p] >= needed - half and needed > zero
                else:
                    inside = weight_share >= min_share
                safe_share = weight_share if weight_share > zero else one
                thickness_flat[at + p] = mean[p] if inside else nan
                std_flat[at + p] = np.sqrt(acc_var[p] / safe_share) if inside else nan
                share_flat[at + p] = weight_share
