"""What ``isctl prefetch --watch`` sees of a directory tree, and when a dataset's frames
count as written (ops.prefetch_tree, ops.prefetch_eiger), on real files.

The end-to-end watch (a writer filling a nested dataset while the watcher prefetches
into a real worker) is in tests/test_prefetch.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops.prefetch_eiger import DataFiles, Stack, complete_stack, data_files
from ops.prefetch_tree import RACY_S, DatasetTree
from ops.testdata.eiger import write_eiger, write_eiger_live

ROOT = Path(__file__).resolve().parent.parent


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _age(root: Path, seconds: float = 60.0) -> None:
    """Make every directory's last change older than the racy window, as on a tree
    written long before the watcher started."""
    past = time.time() - seconds
    for directory, _, _ in os.walk(root):
        os.utime(directory, (past, past))


def test_nested_datasets_within_the_depth(tmp_path: Path) -> None:
    top = _touch(tmp_path / "a_master.h5")
    nested = _touch(tmp_path / "50001" / "user" / "sample" / "b_master.h5")
    mccd = _touch(tmp_path / "50001" / "user" / "c_001.mccd")
    _touch(tmp_path / "50001" / "user" / "sample" / "b_data_000001.h5")  # not a dataset
    _touch(tmp_path / "1" / "2" / "3" / "4" / "too_deep_master.h5")
    tree = DatasetTree(tmp_path, max_depth=3)
    assert tree.scan() == {str(top), str(nested), str(mccd)}
    assert DatasetTree(tmp_path, max_depth=0).scan() == {str(top)}
    with pytest.raises(ValueError, match="depth"):
        DatasetTree(tmp_path, max_depth=-1)


def test_symlinks_never_lead_out_of_the_tree(tmp_path: Path) -> None:
    watched, outside = tmp_path / "watched", tmp_path / "outside"
    secret = _touch(outside / "secret_master.h5")
    inner = _touch(watched / "run" / "in_master.h5")
    (watched / "escape").symlink_to(outside, target_is_directory=True)
    (watched / "loop").symlink_to(watched, target_is_directory=True)
    (watched / "stolen_master.h5").symlink_to(secret)
    (watched / "alias_master.h5").symlink_to(inner)
    (watched / "dangling_master.h5").symlink_to(watched / "nowhere_master.h5")
    tree = DatasetTree(watched, max_depth=5)
    assert tree.scan() == {str(inner), str(watched / "alias_master.h5")}
    assert tree.directories == 2  # watched and run: no symlinked directory entered


def test_a_symlinked_root_is_watched(tmp_path: Path) -> None:
    dataset = _touch(tmp_path / "real" / "x" / "d_master.h5")
    (tmp_path / "current").symlink_to(tmp_path / "real", target_is_directory=True)
    tree = DatasetTree(tmp_path / "current", max_depth=2)
    assert tree.scan() == {str(tmp_path / "current" / "x" / dataset.name)}


def test_polls_list_only_the_directories_that_changed(tmp_path: Path) -> None:
    """Thousands of existing files: one scan, then a stat per directory per poll."""
    for esaf in range(20):
        for sample in range(10):
            directory = tmp_path / f"{esaf}" / "user" / f"s{sample}"
            for name in ("p_master.h5", "p_data_000001.h5", "p_data_000002.h5"):
                _touch(directory / name)
    _age(tmp_path)
    tree = DatasetTree(tmp_path, max_depth=4)
    assert len(tree.scan()) == 200
    scanned = tree.listings
    assert scanned == 1 + 20 + 20 + 200
    assert tree.poll() == (set(), set())
    assert tree.listings == scanned  # nothing changed: nothing listed again

    new = _touch(tmp_path / "7" / "user" / "new" / "deep" / "n_master.h5")
    flat = _touch(tmp_path / "3" / "user" / "s4" / "q_master.h5")
    assert tree.poll() == ({str(new), str(flat)}, set())
    # 7/user and 3/user/s4 changed; new and new/deep are new: 4 listings, not 242.
    assert tree.listings - scanned == 4

    (tmp_path / "3" / "user" / "s4" / "p_master.h5").unlink()
    gone = {str(tmp_path / "7" / "user" / f"s{n}" / "p_master.h5") for n in (1, 2)}
    for n in (1, 2):
        for item in (tmp_path / "7" / "user" / f"s{n}").iterdir():
            item.unlink()
        (tmp_path / "7" / "user" / f"s{n}").rmdir()
    appeared, vanished = tree.poll()
    assert appeared == set()
    assert vanished == gone | {str(tmp_path / "3" / "user" / "s4" / "p_master.h5")}
    assert len(tree.datasets) == 200 + 2 - 3


def test_a_change_in_the_same_tick_as_the_listing_is_not_missed(tmp_path: Path) -> None:
    """Coarse mtimes: a directory listed right after a change is listed again."""
    _touch(tmp_path / "a_master.h5")
    tree = DatasetTree(tmp_path, max_depth=1)
    tree.scan()
    mtime = os.stat(tmp_path).st_mtime_ns
    late = _touch(tmp_path / "b_master.h5")
    os.utime(tmp_path, ns=(mtime, mtime))  # the second change kept the first's mtime
    assert tree.poll() == ({str(late)}, set())
    _age(tmp_path, seconds=RACY_S + 1)  # once the listing is older than the window...
    tree.poll()
    before = tree.listings
    tree.poll()
    assert tree.listings == before  # ...an unchanged directory costs a stat only


def test_a_removed_subtree_is_forgotten(tmp_path: Path) -> None:
    kept = _touch(tmp_path / "keep" / "k_master.h5")
    _touch(tmp_path / "run" / "a" / "x_master.h5")
    _touch(tmp_path / "run" / "a" / "b" / "y.cbf")
    tree = DatasetTree(tmp_path, max_depth=4)
    assert len(tree.scan()) == 3
    for name in ("run/a/b/y.cbf", "run/a/x_master.h5"):
        (tmp_path / name).unlink()
    for name in ("run/a/b", "run/a", "run"):
        (tmp_path / name).rmdir()
    _, vanished = tree.poll()
    assert vanished == {str(tmp_path / "run/a/x_master.h5"), str(tmp_path / "run/a/b/y.cbf")}
    assert tree.datasets == {str(kept)} and tree.directories == 2


# -- when an Eiger dataset's frames are written -------------------------------------------


def test_data_files_of_a_finished_dataset(tmp_path: Path) -> None:
    master = write_eiger(tmp_path, "d", nimages=5, frames_per_file=2, shape=(64, 64))
    paths = data_files(master)
    assert [p.name for p in paths] == [f"d_data_00000{n}.h5" for n in (1, 2, 3)]
    assert [complete_stack(p) for p in paths] == [Stack(2, 1, 2), Stack(2, 3, 4), Stack(1, 5, 5)]
    files = DataFiles(paths)
    assert not files.look() and files.ready() == set()  # seen once: not held still yet
    assert files.look() and files.ready() == {1, 2, 3, 4, 5} and files.complete
    assert data_files(tmp_path / "nope_master.h5") == []


def test_without_image_nr_frames_follow_the_files_before(tmp_path: Path) -> None:
    master = write_eiger(
        tmp_path, "n", nimages=5, frames_per_file=2, shape=(64, 64), image_nr_attrs=False
    )
    paths = data_files(master)
    paths[1].rename(tmp_path / "aside.h5")  # the second file is not there yet
    files = DataFiles(paths)
    files.look()
    files.look()
    assert files.ready() == {1, 2}  # file 3's place depends on file 2's length
    (tmp_path / "aside.h5").rename(paths[1])
    files.look()
    files.look()
    assert files.ready() == {1, 2, 3, 4, 5}


def test_a_data_file_being_written_is_not_complete(tmp_path: Path) -> None:
    """The writer is another process, filling the file frame by frame."""
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.live_writer", str(tmp_path), "w",
         "--nimages", "3", "--frames-per-file", "3", "--frame-delay", "0.4"],
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    data = tmp_path / "w_data_000001.h5"
    seen_incomplete = False
    try:
        deadline = time.monotonic() + 30
        while writer.poll() is None:
            assert time.monotonic() < deadline
            if data.exists() and complete_stack(data) is None:
                seen_incomplete = True
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0
    assert seen_incomplete  # exists for ~1.2 s before it is complete
    assert complete_stack(data) == Stack(3, 1, 3)
    # A stable file whose stack holds fewer frames than its attributes promise:
    assert _promises_more(tmp_path / "short.h5") is None


def _promises_more(path: Path) -> Stack | None:
    import h5py
    import numpy as np

    with h5py.File(path, "w") as file:
        stack = file.create_dataset("entry/data/data", data=np.zeros((2, 8, 8), np.uint32))
        stack.attrs["image_nr_low"], stack.attrs["image_nr_high"] = 1, 3
    return complete_stack(path)


def test_write_eiger_live_writes_what_write_eiger_does(tmp_path: Path) -> None:
    master = write_eiger_live(tmp_path, "l", nimages=3, frames_per_file=2, frame_delay_s=0)
    assert [complete_stack(p) for p in data_files(master)] == [Stack(2, 1, 2), Stack(1, 3, 3)]
