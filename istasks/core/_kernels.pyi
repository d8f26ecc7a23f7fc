"""Types of the compiled loops (istasks/core/_kernels.pyx); see that file for what each does."""

from typing import Any

import numpy as np
import numpy.typing as npt

_Pixels = npt.NDArray[np.unsignedinteger[Any]]
_Index = npt.NDArray[np.intp]
_Bytes = npt.NDArray[np.uint8]

def reduce_boxes(
    pixels: _Pixels,
    row_starts: _Index,
    row_ends: _Index,
    col_starts: _Index,
    col_ends: _Index,
    out: _Pixels,
) -> None: ...
def gather(pixels: _Pixels, rows: _Index, cols: _Index, out: _Pixels) -> None: ...

class RingLayout:
    bx: float
    low: float
    scale: float
    split: int
    top_bin: int
    def __init__(
        self,
        dy2: npt.NDArray[np.float64],
        dx2: npt.NDArray[np.float64],
        bx: float,
        split: int,
        low: float,
        scale: float,
        top_bin: int,
    ) -> None: ...
    @property
    def shape(self) -> tuple[int, int]: ...

def ring_bins(layout: RingLayout, first_row: int, out: _Bytes) -> None: ...
def ring_sums(
    pixels: _Pixels, layout: RingLayout, first_row: int, count: int, sentinel: int
) -> tuple[list[int], list[int], list[int], int | None, int | None]: ...
def count_above(
    pixels: _Pixels, layout: RingLayout, first_row: int, cuts: npt.NDArray[np.int64]
) -> list[int]: ...
def grey(pixels: _Pixels, white: int, black: int, out: _Bytes) -> None: ...
