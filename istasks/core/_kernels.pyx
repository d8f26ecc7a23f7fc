# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled inner loops of the image core (reduce.py, stats.py, contrast.py).

Why compiled: a zoom tile is a new reduction of a frame already decoded, and its
budget end to end is 15 ms (issue 13). In numpy each step below is several full passes
over temporaries (a reduce per output row, ``np.take`` per box column, ``reduceat`` per
ring run, a float64 copy per grey block); here each is one pass in cache, without the
GIL (the worker's other threads go on meanwhile).

Every function computes exactly what the numpy code it replaced computed, in the same
integer or double arithmetic in the same order (built with ``-ffp-contract=off``: no
fused multiply-add may change a rounding), so the spec comparisons in the tests
(tests/spec_view.py, the recorded replies) hold bit for bit. Callers check shapes and
dtypes; these functions trust them.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

ctypedef fused pixel_t:
    uint16_t
    uint32_t

cdef enum:
    # One more than the most ring bins a kernel takes (uint8 bins; stats uses 16).
    MAX_BINS = 256


def reduce_boxes(
    const pixel_t[:, ::1] pixels,
    const Py_ssize_t[::1] row_starts,
    const Py_ssize_t[::1] row_ends,
    const Py_ssize_t[::1] col_starts,
    const Py_ssize_t[::1] col_ends,
    pixel_t[:, :] out,
):
    """``out[i, j]`` = max of ``pixels[row_starts[i]:row_ends[i], col_starts[j]:col_ends[j]]``.

    Every box is non-empty and inside ``pixels``; ``out`` is len(row_starts) x
    len(col_starts). Separable: the rows of box row ``i`` are folded into one row buffer
    (contiguous reads), then each column box is the max of its slice of that buffer.
    """
    cdef Py_ssize_t n_rows = row_starts.shape[0], n_cols = col_starts.shape[0]
    if n_rows == 0 or n_cols == 0:
        return
    cdef Py_ssize_t col_lo = col_starts[0], col_hi = col_ends[n_cols - 1]
    cdef Py_ssize_t j
    for j in range(n_cols):  # boxes increase, but a folded edge box may reach further
        if col_starts[j] < col_lo:
            col_lo = col_starts[j]
        if col_ends[j] > col_hi:
            col_hi = col_ends[j]
    cdef Py_ssize_t width = col_hi - col_lo
    cdef pixel_t* row = <pixel_t*> malloc(width * sizeof(pixel_t))
    if row == NULL:
        raise MemoryError()
    cdef Py_ssize_t i, r, c, first, end
    cdef const pixel_t* src
    cdef pixel_t best, v
    try:
        with nogil:
            for i in range(n_rows):
                memcpy(row, &pixels[row_starts[i], col_lo], width * sizeof(pixel_t))
                for r in range(row_starts[i] + 1, row_ends[i]):
                    src = &pixels[r, col_lo]
                    for c in range(width):
                        row[c] = src[c] if src[c] > row[c] else row[c]
                for j in range(n_cols):
                    first = col_starts[j] - col_lo
                    end = col_ends[j] - col_lo
                    best = row[first]
                    for c in range(first + 1, end):
                        v = row[c]
                        best = v if v > best else best
                    out[i, j] = best
    finally:
        free(row)


def gather(
    const pixel_t[:, ::1] pixels,
    const Py_ssize_t[::1] rows,
    const Py_ssize_t[::1] cols,
    pixel_t[:, ::1] out,
):
    """``out[i, j] = pixels[rows[i], cols[j]]``, or 0 where either index is negative
    (the nearest mode's samples outside the image)."""
    cdef Py_ssize_t i, j, n_rows = rows.shape[0], n_cols = cols.shape[0]
    cdef const pixel_t* src
    with nogil:
        for i in range(n_rows):
            if rows[i] < 0:
                for j in range(n_cols):
                    out[i, j] = 0
                continue
            src = &pixels[rows[i], 0]
            for j in range(n_cols):
                out[i, j] = src[cols[j]] if cols[j] >= 0 else 0


def ring_bins(
    const double[::1] dy2,
    const double[::1] dx2,
    double low,
    double scale,
    int top_bin,
    uint8_t[:, ::1] out,
):
    """``out[r, c]`` = trunc(clip((dy2[r] + dx2[c] - low) * scale, 0, top_bin)): the
    numpy ``add.outer``, ``-=``, ``*=``, ``clip`` and truncating cast, in that order."""
    cdef Py_ssize_t r, c, height = dy2.shape[0], width = dx2.shape[0]
    cdef double x, row, ceiling = top_bin
    cdef const double* across = &dx2[0] if width else NULL
    cdef uint8_t* dst
    with nogil:
        for r in range(height):
            row = dy2[r]
            dst = &out[r, 0]
            for c in range(width):
                x = row + across[c]
                x = x - low
                x = x * scale
                x = x if x > 0.0 else 0.0
                x = x if x < ceiling else ceiling
                dst[c] = <uint8_t> <int> x


def ring_sums(const pixel_t[::1] flat, const uint8_t[::1] bins, int count, int64_t sentinel):
    """Per-bin pixel count, sum and sum of squares, and the min/max, of the pixels not
    equal to ``sentinel`` (-1: none is left out). Exact: sums in 64 bits, squares in
    128 (two 64-bit words), returned as Python ints.

    Returns ``(counts, totals, squares, low, high)``; low/high are None when no pixel
    is counted. Bins run in long runs along the rows, so each run is summed in
    registers and added to its bin when the bin changes.
    """
    if not 1 <= count <= MAX_BINS - 1:
        raise ValueError(f"bin count {count} outside 1..{MAX_BINS - 1}")
    cdef uint64_t n[MAX_BINS]
    cdef uint64_t total[MAX_BINS]
    cdef uint64_t sq_lo[MAX_BINS]
    cdef uint64_t sq_hi[MAX_BINS]
    cdef Py_ssize_t k, size = flat.shape[0]
    cdef int b
    for b in range(MAX_BINS):
        n[b] = 0
        total[b] = 0
        sq_lo[b] = 0
        sq_hi[b] = 0
    cdef uint64_t run_n = 0, run_total = 0, run_lo = 0, run_hi = 0, v, square
    cdef uint64_t low = 0xFFFFFFFFFFFFFFFF, high = 0
    cdef bint skip = sentinel >= 0
    cdef uint64_t left_out = <uint64_t> sentinel if skip else 0
    cdef uint8_t current = bins[0] if size else 0, here
    with nogil:
        for k in range(size):
            here = bins[k]
            if here != current:
                _flush(n, total, sq_lo, sq_hi, current, run_n, run_total, run_lo, run_hi)
                run_n = 0
                run_total = 0
                run_lo = 0
                run_hi = 0
                current = here
            v = flat[k]
            if skip and v == left_out:
                continue
            run_n += 1
            run_total += v
            square = v * v  # v < 2**32
            run_lo += square
            run_hi += run_lo < square
            if v < low:
                low = v
            if v > high:
                high = v
        _flush(n, total, sq_lo, sq_hi, current, run_n, run_total, run_lo, run_hi)
    counts = [n[b] for b in range(count)]
    totals = [total[b] for b in range(count)]
    squares = [(int(sq_hi[b]) << 64) | sq_lo[b] for b in range(count)]
    if not any(counts):
        return counts, totals, squares, None, None
    return counts, totals, squares, int(low), int(high)


cdef inline void _flush(
    uint64_t* n, uint64_t* total, uint64_t* sq_lo, uint64_t* sq_hi, uint8_t b,
    uint64_t run_n, uint64_t run_total, uint64_t run_lo, uint64_t run_hi,
) noexcept nogil:
    n[b] += run_n
    total[b] += run_total
    sq_lo[b] += run_lo
    sq_hi[b] += run_hi + (sq_lo[b] < run_lo)


def count_above(const pixel_t[::1] flat, const uint8_t[::1] bins, const int64_t[::1] cuts):
    """Per bin, how many pixels exceed the bin's cut (``flat[k] > cuts[bins[k]]``); a
    list of ``len(cuts)`` counts (``cuts`` has an entry for every uint8 bin)."""
    if cuts.shape[0] < MAX_BINS:
        raise ValueError(f"cuts needs {MAX_BINS} entries, got {cuts.shape[0]}")
    cdef int64_t found[MAX_BINS]
    cdef Py_ssize_t k, size = flat.shape[0]
    cdef int b
    for b in range(MAX_BINS):
        found[b] = 0
    cdef uint8_t current = bins[0] if size else 0
    cdef int64_t cut = cuts[current], run = 0
    with nogil:
        for k in range(size):
            if bins[k] != current:  # runs of one bin: count in a register
                found[current] += run
                run = 0
                current = bins[k]
                cut = cuts[current]
            run += <int64_t> flat[k] > cut
        found[current] += run
    return [found[b] for b in range(MAX_BINS)]


cdef enum:
    # Widest white..black span mapped through a table (the usual automatic contrast
    # spans a few hundred counts); wider spans divide per pixel.
    GREY_TABLE_SPAN = 1 << 16


def grey(const pixel_t[:, ::1] pixels, int64_t white, int64_t black, uint8_t[:, ::1] out):
    """``out`` = 255 - ceil((clip(v, white, black) - white) * 255 / (black - white)), for
    0 <= white < black <= 2**32 + 1.

    In integers: the numerator is an exact integer and the ceiling of an exact quotient
    is what the spec's doubles give (contrast.grey_into says why), so ``(n + span - 1)
    // span`` is it, through a table of every level when the span is small.
    """
    cdef int64_t span = black - white
    cdef uint8_t* table = NULL
    cdef int64_t x
    cdef Py_ssize_t r, c, height = pixels.shape[0], width = pixels.shape[1]
    if span <= GREY_TABLE_SPAN:
        table = <uint8_t*> malloc(span + 1)
        if table == NULL:
            raise MemoryError()
    try:
        with nogil:
            if table != NULL:
                for x in range(span + 1):
                    table[x] = <uint8_t> (255 - (x * 255 + span - 1) // span)
            if table != NULL:
                for r in range(height):
                    for c in range(width):
                        x = pixels[r, c]
                        x = white if x < white else (black if x > black else x)
                        out[r, c] = table[x - white]
            else:
                for r in range(height):
                    for c in range(width):
                        x = pixels[r, c]
                        x = white if x < white else (black if x > black else x)
                        out[r, c] = <uint8_t> (255 - ((x - white) * 255 + span - 1) // span)
    finally:
        free(table)
