"""A detector writing one dataset while a test watches (``python -m tests.live_writer``).

Runs in its own process, as the detector's file writer is another host: writes
``DIR/PREFIX_master.h5`` and then its data files frame by frame
(:func:`ops.testdata.eiger.write_eiger_live`), printing one JSON line with the wall
clock time each data file was closed, so a test can tell which frames were complete
when they were sent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ops.testdata.eiger import write_eiger_live


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.live_writer")
    parser.add_argument("directory", type=Path)
    parser.add_argument("prefix")
    parser.add_argument("--nimages", type=int, default=6)
    parser.add_argument("--frames-per-file", type=int, default=2)
    parser.add_argument("--frame-delay", type=float, default=0.3)
    args = parser.parse_args()
    os.umask(0o022)  # the identity's worker must read what the detector writes

    def done(path: Path) -> None:
        print(json.dumps({"closed": path.name, "at": time.time()}), flush=True)

    write_eiger_live(
        args.directory,
        args.prefix,
        nimages=args.nimages,
        frames_per_file=args.frames_per_file,
        frame_delay_s=args.frame_delay,
        on_file_done=done,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
