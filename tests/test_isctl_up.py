"""``make run`` = ``isctl up``: it starts the service, prints one command that fetches a
view the way is.js does, and stops everything (its Redis too) on Ctrl-C."""

from __future__ import annotations

import io
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

ISCTL = [sys.executable, "-c", "import sys; from istasks.cli import main; sys.exit(main())"]


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_serves_the_printed_command_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    up = subprocess.Popen(
        [*ISCTL, "up", "--run-dir", str(tmp_path / "run")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert up.stdout is not None
    command = ""
    deadline = time.monotonic() + 60
    while not command and time.monotonic() < deadline:
        line = up.stdout.readline()
        assert line, "isctl up exited before printing the fetch command"
        if " get --endpoint " in line:
            command = line.strip()
    children = _children_of(up.pid)
    assert len(children) >= 3  # redis-server, supervisor, bridge
    argv = shlex.split(command)
    argv[-1] = str(tmp_path / "view.jpg")  # the -o target
    got = subprocess.run(
        [*ISCTL, *argv[1:]], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("job: {") and '"wval_used"' in got.stdout
    image = Image.open(io.BytesIO((tmp_path / "view.jpg").read_bytes()))
    assert image.size == (1024, 1024)
    up.send_signal(signal.SIGINT)
    up.send_signal(signal.SIGINT)  # impatient users press it twice
    assert up.wait(timeout=30) == 0
    up.stdout.close()
    time.sleep(0.5)
    assert [pid for pid in children if _alive(pid)] == []
