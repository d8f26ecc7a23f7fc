"""Hostile files and paths for the fuzz tests: what a user may point ``fn`` at.

:func:`build_tree` writes, into a world-readable directory (as root the workers run as
an unprivileged account), a few good images and every kind of bad one: empty and
truncated HDF5/TIFF/CBF/MarCCD files, garbage behind valid magic numbers, files whose
headers claim absurd sizes ("bombs"), FIFOs (a blocking open would hang a worker),
directories, symlinks out of the tree and Eiger masters whose data links point at
FIFOs, devices and ``/proc``. :data:`SYSTEM_PATHS` adds device, ``/proc`` and path
tricks outside the tree. Everything is generated with fixed seeds.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tifffile

from ops.testdata.cbf import write_cbf
from ops.testdata.eiger import write_eiger
from ops.testdata.eiger_master import MasterSpec, write_master
from ops.testdata.marccd import frame_header, marccd_header_values, write_marccd

#: Paths outside the tree: devices that never end or block, /proc files that would leak
#: the worker's environment or memory, unreadable files and path tricks.
SYSTEM_PATHS: tuple[str, ...] = (
    "/dev/zero",
    "/dev/urandom",
    "/dev/null",
    "/dev/stdin",
    "/dev/tty",
    "/dev/full",
    "/proc/self/environ",
    "/proc/self/mem",
    "/proc/self/fd/0",
    "/proc/self/cmdline",
    "/proc/self/cwd",
    "/proc/kcore",
    "/proc/1/environ",
    "/sys/kernel/notes",
    "/etc/shadow",
    "/etc/passwd",
    "/root/.bashrc",
    "/",
    "",
    " ",
    ".",
    "..",
    "~",
    "../../../../../../etc/shadow",
    "../../../../../../proc/self/environ",
    "relative_master.h5",
    "x" * 5000,
    "/tmp/" + "y/" * 3000,
    "file:///etc/passwd",
    "a\x00b.h5",
    "/etc/passwd\x00.h5",
    "\n",
    "\\\\server\\share\\x.h5",
    "ü/☃/データ.h5",
    "/dev/../etc/shadow",
    "//etc//shadow",
    "/proc/self/root/etc/shadow",
)

#: Side of the frames that the bombs claim: 60000^2 16-bit pixels are 7.2 GB.
BOMB_SIDE = 60_000
#: Side of the HDF5 bomb: a never-written 30000^2 uint32 stack (3.6 GB once read).
H5_BOMB_SIDE = 30_000


@dataclass(frozen=True)
class HostileTree:
    """The generated tree: good images (for the checks after the storm) and bad ``fn``s."""

    root: Path
    good_eiger: Path
    good_marccd: Path
    good_cbf: Path
    good_tiff: Path
    hostile: tuple[str, ...]
    aliases: tuple[str, ...]  # good images reached through path tricks

    @property
    def good(self) -> tuple[Path, ...]:
        """Every good image."""
        return (self.good_eiger, self.good_marccd, self.good_cbf, self.good_tiff)

    @property
    def paths(self) -> tuple[str, ...]:
        """Every ``fn`` worth trying: good, aliases and hostile."""
        return (*map(str, self.good), *self.aliases, *self.hostile)


def build_tree(root: Path) -> HostileTree:
    """Write every file into ``root`` (created world-traversable) and list the bad paths."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    good = _good_images(root)
    hostile: list[Path] = []
    hostile += _empty_files(root)
    hostile += _truncated_files(root, good)
    hostile += _garbage_files(root)
    hostile += _bombs(root)
    hostile += _special_files(root)
    hostile += _hostile_masters(root)
    _world_readable(root)
    tricks = [
        f"{root}/sub/../../../../../../etc/shadow",
        f"{root}/nonexistent_master.h5",
        f"{root}/good_master.h5/",
        f"{root}/good_master.h5/../good_master.h5",
    ]
    return HostileTree(
        root=root,
        good_eiger=good[0],
        good_marccd=good[1],
        good_cbf=good[2],
        good_tiff=good[3],
        hostile=(*map(str, hostile), *tricks, *SYSTEM_PATHS),
        aliases=(f"{root}/../{root.name}/good_master.h5", f"{root}//./good.cbf"),
    )


def _good_images(root: Path) -> tuple[Path, Path, Path, Path]:
    master = write_eiger(root, "good", nimages=2, frames_per_file=1, shape=(256, 260), seed=11)
    marccd = write_marccd(root / "good.mccd", size=256, seed=12)
    cbf = write_cbf(root / "good.cbf", shape=(195, 487), seed=13)
    tiff = root / "good.tif"
    tifffile.imwrite(tiff, np.random.default_rng(14).integers(0, 999, (128, 96), np.uint16))
    return master, marccd, cbf, tiff


def _empty_files(root: Path) -> list[Path]:
    names = ("empty.h5", "empty_master.h5", "empty.tif", "empty.cbf", "empty.mccd", "empty.img")
    for name in names:
        (root / name).write_bytes(b"")
    return [root / name for name in names]


def _truncated_files(root: Path, good: tuple[Path, Path, Path, Path]) -> list[Path]:
    """Real files cut short: inside the header, and inside the pixel data."""
    master, marccd, cbf, tiff = good
    out: list[Path] = []
    for source, stem in (
        (master, "cut_head_master.h5"),
        (marccd, "cut.mccd"),
        (cbf, "cut.cbf"),
        (tiff, "cut.tif"),
    ):
        data = source.read_bytes()
        for fraction, tag in ((0.02, "a"), (0.5, "b"), (0.97, "c")):
            target = root / f"{tag}_{stem}"
            target.write_bytes(data[: max(1, int(len(data) * fraction))])
            out.append(target)
    # A complete master whose data file is cut: the frame table opens, the frame does not.
    sub = root / "cutdata"
    write_eiger(sub, "cd", nimages=1, frames_per_file=1, shape=(256, 260), seed=15)
    data_file = sub / "cd_data_000001.h5"
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    out.append(sub / "cd_master.h5")
    return out


def _garbage_files(root: Path) -> list[Path]:
    """Valid magic numbers followed by noise, and structures that point at themselves."""
    rng = np.random.default_rng(16)
    noise = rng.bytes(64 * 1024)
    files = {
        "noise.h5": noise,
        "sig_noise.h5": b"\x89HDF\r\n\x1a\n" + noise,
        "tiff_noise.tif": b"II*\0" + noise,
        "tiff_noise_be.mccd": b"MM\0*" + noise,
        "bigtiff_noise.tif": b"II+\0" + noise,
        "cbf_noise.cbf": b"###CBF: VERSION 1.5\r\n" + noise,
        "ifd_loop.tif": b"II*\0" + struct.pack("<I", 4) + b"\0" * 64,
        "ifd_beyond.tif": b"II*\0" + struct.pack("<I", 0xFFFFFFF0),
        "text.cbf": b"hello\n" * 100,
        "nul.tif": b"\0" * 5000,
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    return [root / name for name in files]


def tiff_bytes(width: int, height: int, strip: bytes, *, compression: int = 8) -> bytes:
    """A classic little-endian 16-bit greyscale TIFF with one strip of ``strip`` bytes."""
    entries = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 16),
        (259, 3, compression),
        (262, 3, 1),
        (273, 4, 0),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, len(strip)),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    out = bytearray(b"II*\0" + struct.pack("<IH", 8, len(entries)))
    for tag, kind, given in entries:
        value = data_offset if tag == 273 else given
        code = "<HHIHH" if kind == 3 else "<HHII"
        out += struct.pack(code, tag, kind, 1, value, *((0,) if kind == 3 else ()))
    out += struct.pack("<I", 0)
    return bytes(out) + strip


def _bombs(root: Path) -> list[Path]:
    """Small files whose headers claim frames of many gigabytes."""
    side = BOMB_SIDE
    tiny = zlib.compress(b"\0" * 4096)
    (root / "bomb.tif").write_bytes(tiff_bytes(side, side, tiny))
    (root / "bomb_raw.tif").write_bytes(tiff_bytes(side, side, b"\0" * 4096, compression=1))
    # MarCCD: the TIFF tags and the frame header at 1024 agree on the absurd size.
    head = tiff_bytes(side, side, b"", compression=1)
    header = frame_header(marccd_header_values(side, "bomb"), "<")
    body = head.ljust(1024, b"\0") + header + b"\0" * 4096
    (root / "bomb.mccd").write_bytes(_point_strip(body, 4096, min(side * side * 2, 0xFFFFFFFF)))
    # CBF whose binary section claims more than the file holds, and a sparse file that
    # really is that large (st_size says so, the disk holds almost nothing).
    cbf = write_cbf(root / "bomb_cbf_src.cbf", shape=(8, 8), seed=17).read_bytes()
    (root / "bomb_cbf_src.cbf").unlink()
    (root / "bomb.cbf").write_bytes(_cbf_claiming(cbf, side))
    _sparse_cbf(root / "bomb_sparse.cbf", cbf, side)
    _h5_bomb(root)
    return [
        root / n
        for n in (
            "bomb.tif",
            "bomb_raw.tif",
            "bomb.mccd",
            "bomb.cbf",
            "bomb_sparse.cbf",
            "bomb_master.h5",
        )
    ]


def _point_strip(content: bytes, offset: int, byte_count: int) -> bytes:
    """Rewrite the StripOffsets / StripByteCounts entries of a :func:`tiff_bytes` header."""
    out = bytearray(content)
    n_entries = struct.unpack_from("<H", out, 8)[0]
    for index in range(n_entries):
        at = 10 + 12 * index
        tag = struct.unpack_from("<H", out, at)[0]
        if tag == 273:
            struct.pack_into("<I", out, at + 8, offset)
        elif tag == 279:
            struct.pack_into("<I", out, at + 8, byte_count)
    return bytes(out)


def _cbf_claiming(cbf: bytes, side: int) -> bytes:
    """An 8 x 8 mini-CBF whose binary header says ``side`` x ``side``."""
    for axis in (b"Fastest", b"Second"):
        key = b"X-Binary-Size-" + axis + b"-Dimension: "
        cbf = cbf.replace(key + b"8", key + str(side).encode())
    return cbf


def _sparse_cbf(path: Path, cbf: bytes, side: int) -> None:
    """A CBF claiming ``side``^2 pixels in a binary section as large as the (sparse) file."""
    size = side * side
    text = _cbf_claiming(cbf, side)
    start = text.index(b"X-Binary-Size: ")
    end = text.index(b"\r\n", start)
    text = text[:start] + f"X-Binary-Size: {size}".encode() + text[end:]
    with open(path, "wb") as out:
        out.write(text)
        out.truncate(len(text) + size)


def _h5_bomb(root: Path) -> None:
    """An Eiger master linking a never-written 30000^2 uint32 stack (small chunks)."""
    side = H5_BOMB_SIDE
    with h5py.File(root / "bomb_data_000001.h5", "w") as file:
        stack = file.create_dataset(
            "entry/data/data", shape=(1, side, side), dtype=np.uint32, chunks=(1, 1000, 1000)
        )
        stack.attrs["image_nr_low"] = np.int32(1)
        stack.attrs["image_nr_high"] = np.int32(1)
    spec = MasterSpec((side, side), 32, 1, 1, "1.8", (side / 2, side / 2))
    write_master(root / "bomb_master.h5", spec, [("data_000001", "bomb_data_000001.h5")], None)


def _special_files(root: Path) -> list[Path]:
    """FIFOs, a directory, symlinks out of the tree, a loop and an unreadable file."""
    fifo = root / "fifo.h5"
    os.mkfifo(fifo, 0o666)
    for name in ("fifo.cbf", "fifo.mccd", "fifo.tif"):
        os.mkfifo(root / name, 0o666)
    directory = root / "dir.h5"
    directory.mkdir()
    links = {
        "shadow.h5": "/etc/shadow",
        "environ.h5": "/proc/self/environ",
        "zero.cbf": "/dev/zero",
        "random.h5": "/dev/urandom",
        "root.h5": "/",
        "dangling.h5": str(root / "nothing_here"),
        "loop_a.h5": str(root / "loop_b.h5"),
        "loop_b.h5": str(root / "loop_a.h5"),
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    fifos = [fifo, root / "fifo.cbf", root / "fifo.mccd", root / "fifo.tif"]
    return [*fifos, directory, *(root / name for name in links), *_unreadable(root)]


def _unreadable(root: Path) -> list[Path]:
    """A good image only root may read (as root, workers run as other accounts; a worker
    running as the invoking user could read its own file, so then there is none)."""
    if os.geteuid() != 0:
        return []
    secret = root / "secret_master.h5"
    shutil.copyfile(root / "good_master.h5", secret)
    return [secret]


def _hostile_masters(root: Path) -> list[Path]:
    """Valid Eiger masters whose data links lead somewhere hostile."""
    targets = {
        "fifo_link": "fifo_link_data_000001.h5",  # a FIFO next to the master
        "zero_link": "/dev/zero",
        "environ_link": "/proc/self/environ",
        "shadow_link": "/etc/shadow",
        "up_link": "../../../../../../etc/passwd",
        "self_link": "self_link_master.h5",
        "dir_link": "dir.h5",
    }
    os.mkfifo(root / "fifo_link_data_000001.h5", 0o666)
    spec = MasterSpec((256, 260), 32, 1, 1, "1.8", (130.0, 128.0))
    out = []
    for prefix, target in targets.items():
        master = root / f"{prefix}_master.h5"
        write_master(master, spec, [("data_000001", target)], None)
        out.append(master)
    return out


def _world_readable(root: Path) -> None:
    """Directories 0755, files 0644 (not through symlinks), the secret file 0600."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(0o755)
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(0o666 if path.is_fifo() else 0o644)
    secret = root / "secret_master.h5"
    if secret.exists():
        secret.chmod(0o600)
