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
from libc.math cimport ceil, sqrt
from libc.stdlib cimport calloc, free, malloc
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


cdef inline int _bin_of(
    double row, double across, double low, double scale, double ceiling
) noexcept nogil:
    """The bin of a pixel, as :func:`ring_bins` computes it (same doubles, same order)."""
    cdef double x = row + across
    x = x - low
    x = x * scale
    x = x if x > 0.0 else 0.0
    x = x if x < ceiling else ceiling
    return <int> x


cdef struct _Side:
    # One side of a row's beam column: columns origin + step * j for j in [0, n), along
    # which the squared distance (so the bin) never decreases.
    const double* dx2
    Py_ssize_t origin
    Py_ssize_t step
    Py_ssize_t n
    double row
    double low
    double scale
    double ceiling
    double offset  # step * (bx - origin): j of the beam column, for the estimates


cdef inline int _side_bin(const _Side* side, Py_ssize_t j) noexcept nogil:
    return _bin_of(side.row, side.dx2[side.origin + side.step * j], side.low, side.scale,
                   side.ceiling)


cdef Py_ssize_t _run_end(const _Side* side, Py_ssize_t j, int b) noexcept nogil:
    """The end of the run of bin ``b`` that starts at ``j``: the smallest ``k`` in
    ``(j, n]`` with ``k == n`` or a bin above ``b``.

    The bin never decreases along a side, so the end is searched for: from an estimate
    (where the distance reaches the next bin's edge), galloping then halving, every probe
    computing the bin exactly. The estimate only saves probes; any estimate is correct.
    """
    if b >= <int> side.ceiling:
        return side.n
    cdef double edge = (b + 1) / side.scale + side.low - side.row
    cdef double guess = side.offset + sqrt(edge) if edge > 0.0 else -1.0
    cdef Py_ssize_t hint, probe, gap = 1
    cdef Py_ssize_t below = j, above = side.n  # bin(below) <= b; above == n or above b
    if not guess > j + 1:  # NaN too
        hint = j + 1
    elif guess >= side.n:
        hint = side.n
    else:
        hint = <Py_ssize_t> ceil(guess)
    if hint < side.n and _side_bin(side, hint) <= b:
        below = hint
        while below + gap < side.n:
            probe = below + gap
            if _side_bin(side, probe) > b:
                above = probe
                break
            below = probe
            gap *= 2
    else:
        above = hint
        while above - gap > below:
            probe = above - gap
            if _side_bin(side, probe) <= b:
                below = probe
                break
            above = probe
            gap *= 2
    while above - below > 1:
        probe = below + (above - below) // 2
        if _side_bin(side, probe) > b:
            above = probe
        else:
            below = probe
    return above


cdef struct _Runs:
    # One row's runs of equal bin: columns [starts[i], stops[i]) are all in bins[i].
    Py_ssize_t count
    Py_ssize_t starts[2 * MAX_BINS]
    Py_ssize_t stops[2 * MAX_BINS]
    uint8_t bins[2 * MAX_BINS]


cdef void _side_runs(_Side* side, _Runs* runs) noexcept nogil:
    """Append the runs of one side (at most one per bin: the bins only grow)."""
    cdef Py_ssize_t j = 0, end, i
    cdef int b
    while j < side.n:
        b = _side_bin(side, j)
        end = _run_end(side, j, b)
        i = runs.count
        if side.step > 0:
            runs.starts[i] = side.origin + j
            runs.stops[i] = side.origin + end
        else:
            runs.starts[i] = side.origin - end + 1
            runs.stops[i] = side.origin - j + 1
        runs.bins[i] = <uint8_t> b
        runs.count = i + 1
        j = end


cdef class RingLayout:
    """The ring geometry of a view as the run kernels take it: squared row and column
    distances from the beam (``dy2``, ``dx2``), the beam's column ``bx``, ``split`` (the
    first column at or right of it), and the bin formula's ``low``, ``scale`` and top bin
    (:func:`ring_bins` on the same values gives each pixel the same bin)."""

    cdef const double[::1] dy2
    cdef const double[::1] dx2
    cdef readonly double bx, low, scale
    cdef readonly Py_ssize_t split
    cdef readonly int top_bin

    def __init__(
        self,
        const double[::1] dy2,
        const double[::1] dx2,
        double bx,
        Py_ssize_t split,
        double low,
        double scale,
        int top_bin,
    ):
        if not 0 <= split <= dx2.shape[0] or not 0 <= top_bin < MAX_BINS:
            raise ValueError(f"split {split} or top bin {top_bin} out of range")
        self.dy2, self.dx2, self.bx, self.split = dy2, dx2, bx, split
        self.low, self.scale, self.top_bin = low, scale, top_bin

    @property
    def shape(self):
        """(rows, columns) of the view."""
        return self.dy2.shape[0], self.dx2.shape[0]

    cdef int check_rows(self, Py_ssize_t first_row, Py_ssize_t rows, Py_ssize_t columns) except -1:
        """ValueError unless ``rows`` x ``columns`` from row ``first_row`` lie in the view
        (every kernel taking a layout checks its image with this before reading it)."""
        if first_row < 0 or first_row + rows > self.dy2.shape[0] or columns != self.dx2.shape[0]:
            raise ValueError(f"{rows} x {columns} pixels from row {first_row} do not fit the"
                             f" layout {self.shape}")
        return 0

    cdef void row_runs(self, Py_ssize_t row, _Runs* runs) noexcept nogil:
        """The runs of one row: left of ``split`` the squared column distances fall
        towards the beam, from it on they rise, so each side is at most one run per
        bin."""
        cdef _Side side
        cdef Py_ssize_t width = self.dx2.shape[0]
        runs.count = 0
        if width == 0:
            return
        side.dx2 = &self.dx2[0]
        side.row = self.dy2[row]
        side.low = self.low
        side.scale = self.scale
        side.ceiling = self.top_bin
        side.origin, side.step, side.n = self.split, 1, width - self.split
        side.offset = self.bx - self.split
        _side_runs(&side, runs)
        side.origin, side.step, side.n = self.split - 1, -1, self.split
        side.offset = (self.split - 1) - self.bx
        _side_runs(&side, runs)


cdef _Runs* _new_runs() except NULL:
    """A runs buffer for :meth:`RingLayout.row_runs` (the caller frees it)."""
    cdef _Runs* runs = <_Runs*> malloc(sizeof(_Runs))
    if runs == NULL:
        raise MemoryError()
    return runs


def ring_bins(RingLayout layout not None, Py_ssize_t first_row, uint8_t[:, ::1] out):
    """``out[r, c]`` = the bin of pixel (``first_row + r``, ``c``): trunc(clip((dy2[r] +
    dx2[c] - low) * scale, 0, top_bin)), the numpy ``add.outer``, ``-=``, ``*=``,
    ``clip`` and truncating cast, in that order (the bin image the run kernels avoid)."""
    layout.check_rows(first_row, out.shape[0], out.shape[1])
    cdef Py_ssize_t r, c, height = out.shape[0], width = out.shape[1]
    cdef double row, ceiling = layout.top_bin
    with nogil:
        for r in range(height):
            row = layout.dy2[first_row + r]
            for c in range(width):
                out[r, c] = <uint8_t> _bin_of(row, layout.dx2[c], layout.low, layout.scale,
                                              ceiling)


cdef struct _Sums:
    uint64_t n[MAX_BINS]
    uint64_t total[MAX_BINS]
    uint64_t sq_lo[MAX_BINS]
    uint64_t sq_hi[MAX_BINS]
    uint64_t low
    uint64_t high


cdef inline void _add_squares(_Sums* sums, int b, uint64_t lo, uint64_t hi) noexcept nogil:
    sums.sq_lo[b] += lo
    sums.sq_hi[b] += hi + (sums.sq_lo[b] < lo)


cdef void _run_sums(
    const pixel_t* p, Py_ssize_t length, int b, bint skip, uint64_t left_out, _Sums* sums
) noexcept nogil:
    """Add one run (``length`` >= 1 pixels of bin ``b``) to the sums.

    The usual run holds no sentinel and small enough values for its squares to sum in
    64 bits: then count, sum and squares are plain loops the compiler vectorises; else
    pixel by pixel, squares carried into a second word.
    """
    cdef Py_ssize_t k
    cdef pixel_t lo = p[0], hi = p[0], v
    cdef uint64_t total = 0, square = 0, carry = 0, s
    cdef uint32_t w
    for k in range(length):
        v = p[k]
        lo = v if v < lo else lo
        hi = v if v > hi else hi
        total += v
    if not skip or left_out < lo or left_out > hi:
        if hi <= 0xFFFF:  # squares below 2**32: summed in 64 bits without carry
            for k in range(length):
                w = p[k]
                square += <uint32_t> (w * w)
        else:
            for k in range(length):
                s = <uint64_t> p[k] * p[k]
                square += s
                carry += square < s
        sums.n[b] += length
        sums.low = lo if lo < sums.low else sums.low
        sums.high = hi if hi > sums.high else sums.high
    else:
        total = 0
        for k in range(length):
            v = p[k]
            if v == left_out:
                continue
            sums.n[b] += 1
            total += v
            s = <uint64_t> v * v
            square += s
            carry += square < s
            sums.low = v if v < sums.low else sums.low
            sums.high = v if v > sums.high else sums.high
    sums.total[b] += total
    _add_squares(sums, b, square, carry)


def ring_sums(
    const pixel_t[:, ::1] pixels,
    RingLayout layout not None,
    Py_ssize_t first_row,
    int count,
    int64_t sentinel,
):
    """Per-bin pixel count, sum and sum of squares, and the min/max, of the pixels not
    equal to ``sentinel`` (-1: none is left out), each pixel in its bin of ``layout``
    (``pixels`` are the layout's rows from ``first_row`` on). Exact: sums in 64 bits,
    squares in 128 (two 64-bit words), returned as Python ints.

    Returns ``(counts, totals, squares, low, high)``; low/high are None when no pixel is
    counted. No bin image is made: each row is cut into its runs of one bin (at most two
    per bin, found by search), and each run is summed in a tight loop.
    """
    if not 1 <= count <= MAX_BINS - 1 or not layout.top_bin < count:
        raise ValueError(f"bins {count} (top {layout.top_bin}) outside 1..{MAX_BINS - 1}")
    layout.check_rows(first_row, pixels.shape[0], pixels.shape[1])
    cdef _Runs* runs = _new_runs()
    cdef _Sums* sums = <_Sums*> calloc(1, sizeof(_Sums))
    if sums == NULL:
        free(runs)
        raise MemoryError()
    sums.low = <uint64_t> -1
    cdef Py_ssize_t r, i, height = pixels.shape[0]
    cdef bint skip = sentinel >= 0
    cdef uint64_t left_out = <uint64_t> sentinel if skip else 0
    try:
        with nogil:
            for r in range(height):
                layout.row_runs(first_row + r, runs)
                for i in range(runs.count):
                    _run_sums(&pixels[r, runs.starts[i]], runs.stops[i] - runs.starts[i],
                              runs.bins[i], skip, left_out, sums)
        counts = [sums.n[b] for b in range(count)]
        totals = [sums.total[b] for b in range(count)]
        squares = [(int(sums.sq_hi[b]) << 64) | sums.sq_lo[b] for b in range(count)]
        if not any(counts):
            return counts, totals, squares, None, None
        return counts, totals, squares, int(sums.low), int(sums.high)
    finally:
        free(sums)
        free(runs)


cdef inline Py_ssize_t _count_above(
    const pixel_t* p, Py_ssize_t length, int64_t cut
) noexcept nogil:
    """How many of ``length`` pixels exceed ``cut``, compared in the pixels' own type."""
    cdef Py_ssize_t k, found = 0
    cdef pixel_t limit
    if cut < 0:
        return length
    if cut >= <int64_t> (<pixel_t> -1):
        return 0
    limit = <pixel_t> cut
    for k in range(length):
        found += p[k] > limit
    return found


def count_above(
    const pixel_t[:, ::1] pixels,
    RingLayout layout not None,
    Py_ssize_t first_row,
    const int64_t[::1] cuts,
):
    """Per bin (the bins of :func:`ring_sums`), how many pixels exceed the bin's cut
    (``v > cuts[bin]``); a list of ``len(cuts)`` counts (an entry for every uint8 bin)."""
    if cuts.shape[0] < MAX_BINS:
        raise ValueError(f"cuts needs {MAX_BINS} entries, got {cuts.shape[0]}")
    cdef int64_t found[MAX_BINS]
    layout.check_rows(first_row, pixels.shape[0], pixels.shape[1])
    cdef _Runs* runs = _new_runs()
    cdef Py_ssize_t r, i, height = pixels.shape[0]
    cdef int b
    for b in range(MAX_BINS):
        found[b] = 0
    try:
        with nogil:
            for r in range(height):
                layout.row_runs(first_row + r, runs)
                for i in range(runs.count):
                    b = runs.bins[i]
                    found[b] += _count_above(&pixels[r, runs.starts[i]],
                                             runs.stops[i] - runs.starts[i], cuts[b])
        return [found[b] for b in range(MAX_BINS)]
    finally:
        free(runs)


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
