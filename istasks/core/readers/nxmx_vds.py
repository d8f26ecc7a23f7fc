"""NXmx masters whose ``/entry/data/data`` is an HDF5 virtual dataset (VDS).

Diamond's ``nexgen`` (and ``mx-bluesky`` through it) write ``/entry/data/data`` as a VDS
of ``[frames, rows, cols]`` mapped onto the ``data_NNNNNN`` stacks, next to (or instead
of) the DECTRIS-style ``data_NNNNNN`` external links; ``nexgen``'s ``vds_file_writer``
puts the VDS in a ``<stem>_vds.h5`` file instead, linked from the master.

h5py reads a VDS whose source file is missing as the dataset's fill value (nexgen uses
-1), which would be served as a frame of zeros (or of saturated pixels). So the VDS is
not read as such: each mapping of whole frames (``layout[a:b] = source[c:d]``) becomes a
:class:`DataLink` placed at frames ``a+1..b`` reading ``source`` from slab ``c``. A
source in a missing file then hides exactly its frames (FrameNotFound naming the file),
the Eiger fast path (raw bitshuffle/LZ4 chunks) applies to the sources, and the frame
count is the VDS's length. A VDS mapped otherwise (tiles, strides: Jungfrau modules) is
read through h5py, after checking that the source files of the frame exist.

Source names are resolved as HDF5 does for a VDS, relative to the file holding the VDS
(never the worker's cwd); ``"."`` is that file itself, where nexgen's sources are the
master's own ``data_NNNNNN`` links, followed here to their data files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
from h5py import h5s

from istasks.core.readers.eiger_meta import H5_ERRORS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VdsSource:
    """One mapping of a VDS: virtual frames ``first..last`` (1-based) from a source stack."""

    first: int
    last: int
    file_path: Path | None  # None: a dataset of the master itself
    object_path: str
    source_start: int  # slab of the source holding frame ``first``
    whole_frames: bool  # the mapping copies whole frames, contiguously


def resolve_source(
    file_name: str, dset_name: str, vds: h5py.Dataset, master: h5py.File, master_dir: Path
) -> tuple[Path | None, str]:
    """(data file or None for the master, dataset path) of one VDS source.

    A source in the master that is itself an external link (nexgen) is followed to its
    data file, relative to the master as for the ``data_NNNNNN`` links.
    """
    vds_file = Path(vds.file.filename).resolve()
    if file_name != ".":
        path = Path(file_name)
        return (path if path.is_absolute() else vds_file.parent / path), dset_name
    if vds_file != Path(master.filename).resolve():
        return vds_file, dset_name
    try:
        link = master.get(dset_name, getlink=True)
    except H5_ERRORS:
        link = None
    if isinstance(link, h5py.ExternalLink):
        target = Path(link.filename)
        if not target.is_absolute():
            target = master_dir / target
        elif not target.exists():
            target = master_dir / target.name
        return target, link.path
    return None, dset_name


def vds_sources(vds: h5py.Dataset, master: h5py.File, master_dir: Path) -> list[VdsSource]:
    """The mappings of ``vds`` in virtual-frame order (empty if h5py cannot list them)."""
    try:
        maps = vds.virtual_sources()
    except (*H5_ERRORS, ValueError) as exc:
        log.warning("nxmx: cannot list the sources of %s (%s)", vds.name, exc)
        return []
    rows, cols = vds.shape[1:]
    found: list[VdsSource] = []
    for mapping in maps:
        try:
            v_low, v_high = mapping.vspace.get_select_bounds()
            v_points = mapping.vspace.get_select_npoints()
            frames = v_high[0] - v_low[0] + 1
            if mapping.src_space.get_select_type() == h5s.SEL_ALL:
                # ``layout[a:b] = VirtualSource(...)`` (nexgen's vds_file_writer): the
                # whole source, whose extent h5py does not report back (shape ()).
                s_low, s_high = (0, 0, 0), (frames - 1, rows - 1, cols - 1)
                s_points = v_points
            else:
                s_low, s_high = mapping.src_space.get_select_bounds()
                s_points = mapping.src_space.get_select_npoints()
        except (*H5_ERRORS, ValueError) as exc:
            log.warning("nxmx: unreadable mapping in %s (%s)", vds.name, exc)
            return []
        whole = (
            tuple(v_low[1:]) == (0, 0)
            and tuple(v_high[1:]) == (rows - 1, cols - 1)
            and tuple(s_low[1:]) == (0, 0)
            and tuple(s_high[1:]) == (rows - 1, cols - 1)
            and s_high[0] - s_low[0] + 1 == frames
            and v_points == s_points == frames * rows * cols
        )
        file_path, object_path = resolve_source(
            mapping.file_name, mapping.dset_name, vds, master, master_dir
        )
        found.append(
            VdsSource(v_low[0] + 1, v_high[0] + 1, file_path, object_path, s_low[0], whole)
        )
    return sorted(found, key=lambda source: source.first)


def missing_sources(sources: list[VdsSource], frame: int) -> list[str]:
    """Names of the missing source files holding part of ``frame``."""
    return [
        source.file_path.name
        for source in sources
        if source.first <= frame <= source.last
        and source.file_path is not None
        and not source.file_path.is_file()
    ]
