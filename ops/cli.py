"""``isctl``: the operators' command line.

Every subcommand imports what it needs when it runs, so ``isctl get`` stays light and
``isctl render`` runs exactly the core the workers run.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from istasks.errors import DataUnavailable, IsError

if TYPE_CHECKING:  # imported when ``up`` runs; the other subcommands stay light
    from istasks.core.readers.base import Frame
    from ops.stack import Stack

Handler = Callable[[argparse.Namespace], int]


def _cmd_render(args: argparse.Namespace) -> int:
    """Render one view of a file like a ``jpeg`` request and print its meta JSON.

    Where the service would answer its grey blank (spec 2.2), nothing is written, the
    reason goes to stderr and the exit status is 1 (see :func:`main`). A view that
    renders but shows nothing (every pixel zero, masked or at the saturation value) is
    written, and its reason is printed with exit status 2.
    """
    from istasks import jobs
    from istasks.core.readers import open_reader
    from istasks.core.view import reduce_frame, render_jpeg
    from istasks.settings import get_settings

    settings = get_settings()
    job = _render_job(args)
    try:
        reader = open_reader(str(args.file))
        try:
            frame = reader.read_frame(jobs.view_params(job).frame)
        finally:
            reader.close()
    except DataUnavailable as exc:
        print(f"isctl: nothing written, the service would answer blank: {exc}", file=sys.stderr)
        return 1
    blank = blank_reason(frame)
    reduced = reduce_frame(
        frame,
        jobs.view_params(job),
        spot_sensitivity=settings.spot_sensitivity,
        max_xsize=settings.max_xsize,
        fold=settings.fold_edges,
    )
    rendered = render_jpeg(
        reduced,
        jobs.contrast_params(job),
        jobs.label_params(job),
        quality=args.quality or settings.jpeg_quality,
    )
    Path(args.output).write_bytes(rendered.jpeg.data)
    print(jobs.dumps(reduced.meta))
    print(
        f"wrote {args.output}: {len(rendered.jpeg.data)} bytes, "
        f"wval_used={rendered.wval_used} bval_used={rendered.bval_used}",
        file=sys.stderr,
    )
    if blank is None and not reduced.meta.get("max") and not reduced.meta.get("nSaturated"):
        blank = "every pixel in the view window is zero or masked (try another zoom/segment)"
    return _say_blank(args.file, frame.meta.get("frame", args.frame), blank)


def blank_reason(frame: Frame) -> str | None:
    """Why ``frame`` would render as a featureless view, or None when it has content.

    Checked before the reduction (which zeroes masked pixels in place). A frame made
    only of the saturation value is typically a fill value or gap flag read as counts.
    """
    import numpy as np

    pixels = frame.pixels
    usable = np.ones(pixels.shape, bool) if frame.mask is None else ~frame.mask.bad
    if not usable.any():
        return "every pixel is masked"
    values = pixels[usable]
    if not values.any():
        return "every unmasked pixel is zero"
    if bool((values == frame.saturation).all()):
        return (
            f"every unmasked pixel holds the saturation value {frame.saturation} "
            "(a fill value or gap flag read as counts?)"
        )
    return None


def _say_blank(file: object, frame: object, reason: str | None) -> int:
    """Exit status 0, or 2 after telling stderr why the view of ``frame`` is blank."""
    if reason is None:
        return 0
    print(f"isctl: {file} frame {frame} renders blank: {reason}", file=sys.stderr)
    return 2


def _render_job(args: argparse.Namespace) -> dict[str, Any]:
    """The is.js job equivalent of the command-line options."""
    job: dict[str, Any] = {"type": "jpeg", "fn": str(args.file), "frame": args.frame}
    job.update(xsize=args.xsize, zoom=args.zoom, segcol=args.segcol, segrow=args.segrow)
    job.update(wval=args.wval, contrast=args.contrast, label=args.label)
    job.update(labelHeight=args.label_height, keepAspect=args.keep_aspect)
    return job


def _cmd_meta(args: argparse.Namespace) -> int:
    """Print a file's metadata (with ``frame``) as compact sorted JSON.

    The frame itself is read too, so that a dataset whose metadata are fine but whose
    frame would be served blank (data file missing, unreadable, empty) says why on
    stderr and exits non-zero: 1 when the service would answer its grey blank, 2 when
    the frame reads but holds nothing to see. ``--no-frame`` skips that check.
    """
    from istasks import jobs
    from istasks.core.readers import open_reader

    reader = open_reader(str(args.file))
    problem: IsError | None = None
    blank: str | None = None
    try:
        meta = dict(reader.meta())
        meta.update(frame=args.frame, frame_count=reader.frame_count)
        if args.check_frame:
            try:
                blank = blank_reason(reader.read_frame(args.frame))
            except IsError as exc:
                problem = exc
    finally:
        reader.close()
    print(jobs.dumps(meta))
    if problem is not None:
        print(f"isctl: frame {args.frame} would be served blank: {problem}", file=sys.stderr)
        return 1
    return _say_blank(args.file, args.frame, blank)


def _cmd_demo(args: argparse.Namespace) -> int:
    """Write the demo dataset (Eiger master+data files, a MarCCD frame)."""
    out = Path(args.directory)
    out.mkdir(parents=True, exist_ok=True)
    print(_write_demo(out))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    """Run the whole local service in the foreground until Ctrl-C."""
    import logging
    import shutil
    import signal
    import tempfile
    import time

    from istasks.settings import get_settings
    from ops.stack import Stack, StackConfigError

    logging.basicConfig(level="INFO", format="isctl up: %(message)s")
    settings = get_settings()
    run_dir = Path(args.run_dir or settings.run_dir or "run")
    if os.geteuid() != 0:
        print("isctl up: not root: workers run as the invoking user for every identity")
    try:
        stack = Stack.start(run_dir, settings, flower_port=args.flower, gateway=True)
    except StackConfigError as exc:
        print(f"isctl up: {exc}", file=sys.stderr)
        return 2
    stopping: list[int] = []
    # Ctrl-C and SIGTERM both end the loop below (installed explicitly: a shell that
    # starts us in the background leaves SIGINT ignored, and Python then never raises).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda got, _frame: stopping.append(got))
    demo = Path(tempfile.mkdtemp(prefix="is-demo-"))
    try:
        demo.chmod(0o755)  # the dev identity (nobody when root) must be able to read it
        master = _write_demo(demo)
        _print_up(stack, args, master, run_dir)
        print("isctl up: Ctrl-C stops everything", flush=True)
        while not stopping and not stack.dead():
            time.sleep(0.2)
        if stack.dead():
            print(f"isctl up: component(s) exited: {', '.join(stack.dead())}", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C must not abandon the children half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
        shutil.rmtree(demo, ignore_errors=True)


def _print_up(stack: Stack, args: argparse.Namespace, master: Path, run_dir: Path) -> None:
    """Where things are, and the one command that fetches a view, when one can work: it
    needs a session the bridge trusts and an endpoint we know."""
    from ops.stack import dev_user

    where = f"bridge {stack.endpoint}"
    if not stack.endpoint:
        where = f"bridge connected to the is_proxy at {stack.proxy_endpoint} (IS_PROXY_ENDPOINT)"
    print(f"isctl up: redis {stack.redis_url}, {where}, logs in {run_dir}/")
    if args.flower:
        print(f"isctl up: flower on http://127.0.0.1:{args.flower}/")
    if stack.signing_key is None:
        print(
            f"isctl up: the bridge verifies sessions with IS_SESSION_PUBLIC_KEY="
            f"{stack.settings.session_public_key}, and {run_dir}/ holds no private key "
            "for it: isctl up cannot sign a dev session, so it prints no fetch command. "
            "Sessions must come from the login service that owns that key."
        )
        print(f"isctl up: demo dataset: {master} (frames 1-4)")
        return
    pid = stack.add_session([args.esaf], user=dev_user())
    if stack.gateway_url:
        # The pid rides in the fragment, which browsers never send: the page trades it
        # for an HttpOnly cookie and removes it from the address bar.
        fragment = urllib.parse.urlencode({"pid": pid, "esaf": args.esaf, "fn": str(master)})
        print(f"isctl up: viewer (dev session) on {stack.gateway_url}/#{fragment}")
    if not stack.endpoint:
        print(
            f"isctl up: dev session {pid} (esaf {args.esaf}), demo dataset {master}. "
            "Clients reach this bridge through the is_proxy's client-side (ROUTER) "
            "endpoint, which isctl up does not know: give it to `isctl get --endpoint`."
        )
        return
    print("isctl up: fetch a view the way is.js does with:")
    print(
        f"  {Path(sys.executable).parent / 'isctl'} get --endpoint {stack.endpoint} "
        f"--pid {pid} --esaf {args.esaf} {master} --frame 2 --xsize 1024 -o view.jpg"
    )


def _write_demo(directory: Path) -> Path:
    """A small world-readable Eiger dataset and MarCCD frame; the master file's path."""
    from ops.testdata.eiger import write_eiger
    from ops.testdata.marccd import write_marccd

    master = write_eiger(directory, "demo", nimages=4, frames_per_file=2, shape=(1062, 1028))
    write_marccd(directory / "demo_0001.mccd", size=1024)
    for path in directory.iterdir():
        path.chmod(0o644)
    return master


def _cmd_get(args: argparse.Namespace) -> int:
    """Send one request like is.js; save the JPEG, print the job and meta frames."""
    import json

    from istasks.settings import get_settings
    from ops.client import request

    endpoint = args.endpoint or get_settings().bind_endpoint
    if not endpoint:
        print("isctl get: give --endpoint (or set IS_BIND_ENDPOINT)", file=sys.stderr)
        return 2
    job: dict[str, Any] = {"type": args.type, "pid": args.pid, "esaf": args.esaf}
    if args.type == "index":
        job.update(fn1=str(args.file), frame1=0, frame2=0)
    else:
        job.update(fn=str(args.file), frame=args.frame, xsize=args.xsize)
        job.update(label=args.label, labelHeight=args.label_height)
    if args.tag:
        job["tag"] = args.tag
    job.update(json.loads(args.extra) if args.extra else {})
    frames = request(endpoint, job, timeout_s=args.timeout)
    if frames and frames[0]:
        print(f"error: {frames[0].decode(errors='replace')}", file=sys.stderr)
        return 1
    for name, frame in zip(("job", "meta", "result"), frames[1:3], strict=False):
        print(f"{name}: {frame.decode(errors='replace')}")
    if args.type == "jpeg" and len(frames) >= 4:
        Path(args.output).write_bytes(frames[3])
        print(f"wrote {args.output} ({len(frames[3])} bytes)")
    return 0


def _cmd_session_add(args: argparse.Namespace) -> int:
    """Create a signed dev session in the session Redis; print its pid."""
    import redis

    from istasks.settings import get_settings
    from ops.devsession import ensure_keypair, isauth_for, sign_isauth, write_session

    settings = get_settings()
    url = args.redis or settings.sessions
    if not url:
        print("isctl session add: give --redis or set IS_SESSION_REDIS_URL", file=sys.stderr)
        return 2
    private, _ = ensure_keypair(Path(args.key_dir))
    pid = args.pid or f"dev-{os.urandom(6).hex()}"
    text, sig = sign_isauth(private.read_bytes(), isauth_for(pid, args.user, args.esaf))
    client = redis.Redis.from_url(url)
    try:
        write_session(client, pid, text, sig, ttl_s=args.ttl)
    finally:
        client.close()
    print(pid)
    return 0


def _cmd_prefetch(args: argparse.Namespace) -> int:
    """Warm an ESAF's image cache for a dataset or directory (or watch a directory)."""
    from istasks.settings import get_settings
    from ops import prefetch, prefetch_watch

    if (args.target is None) == (args.watch is None):
        print("isctl prefetch: give MASTER_OR_DIR or --watch DIR (one of them)", file=sys.stderr)
        return 2
    settings = get_settings()
    options = prefetch.Options(
        sizes=prefetch.parse_sizes(args.sizes, settings.max_xsize),
        frames=prefetch.parse_frames(args.frames) if args.frames else None,
        window=args.window or settings.prefetch_window,
        timeout_s=args.timeout,
    )
    identity = prefetch.resolve_identity(settings, args.esaf, args.user)
    if args.watch is not None:
        return prefetch_watch.command(
            settings,
            identity,
            options,
            Path(args.watch),
            interval_s=args.interval,
            give_up_s=args.give_up,
            depth=args.depth,
        )
    target = Path(args.target)
    return prefetch.command(settings, identity, options, target, wait=not args.no_wait)


def _add_render(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("render", help="render a view of FILE to a JPEG, print meta JSON")
    p.add_argument("file", type=Path)
    p.add_argument("--frame", type=int, default=1)
    p.add_argument("--xsize", type=int, default=1024)
    p.add_argument("--zoom", type=float, default=1.0)
    p.add_argument("--segcol", type=float, default=0.0)
    p.add_argument("--segrow", type=float, default=0.0)
    p.add_argument("--wval", type=int, default=-1, help="white value (<0: automatic)")
    p.add_argument("--contrast", type=int, default=-1, help="black value (<=0: automatic)")
    p.add_argument("--label", default="")
    p.add_argument("--label-height", type=int, default=0)
    p.add_argument("--keep-aspect", action="store_true", help="keep the detector aspect ratio")
    p.add_argument("--quality", type=int, default=0, help="JPEG quality (default: setting)")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(handler=_cmd_render)


def _add_meta(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("meta", help="print the metadata of FILE as JSON")
    p.add_argument("file", type=Path)
    p.add_argument("--frame", type=int, default=1)
    p.add_argument(
        "--no-frame",
        dest="check_frame",
        action="store_false",
        help="do not read the frame (by default its problems are reported and exit non-zero)",
    )
    p.set_defaults(handler=_cmd_meta)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="write a demo dataset into DIRECTORY")
    p.add_argument("directory")
    p.set_defaults(handler=_cmd_demo)


def _add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="run Redis, supervisor, bridge (and Flower) until Ctrl-C")
    p.add_argument("--run-dir", default=None, help="state and logs (default: ./run)")
    p.add_argument("--esaf", type=int, default=0, help="ESAF of the dev session")
    p.add_argument("--flower", type=int, default=None, metavar="PORT", help="also run Flower")
    p.set_defaults(handler=_cmd_up)


def _add_get(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("get", help="send one request like is.js and save the JPEG")
    p.add_argument("file")
    p.add_argument("--endpoint", default=None)
    p.add_argument("--pid", required=True)
    p.add_argument("--esaf", type=int, default=0)
    p.add_argument("--type", default="jpeg", choices=["jpeg", "spots", "index"])
    p.add_argument("--frame", type=int, default=1)
    p.add_argument("--xsize", type=int, default=1024)
    p.add_argument("--label", default="")
    p.add_argument("--label-height", type=int, default=0)
    p.add_argument("--tag", default=None)
    p.add_argument("--extra", default=None, help="JSON object merged into the job")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("-o", "--output", default="view.jpg")
    p.set_defaults(handler=_cmd_get)


def _add_session(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("session", help="manage dev sessions")
    ssub = p.add_subparsers(dest="session_command", required=True)
    add = ssub.add_parser("add", help="create a signed dev session, print its pid")
    add.add_argument("--user", required=True, help="Unix account name (isAuth.uid)")
    add.add_argument("--esaf", type=int, action="append", default=[], help="allowed ESAF")
    add.add_argument("--pid", default=None)
    add.add_argument("--key-dir", default="run", help="where the dev key pair lives")
    add.add_argument("--redis", default=None, help="session Redis URL")
    add.add_argument("--ttl", type=int, default=None, help="expire after this many seconds")
    add.set_defaults(handler=_cmd_session_add)


def _add_prefetch(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("prefetch", help="warm an ESAF's image cache for a dataset or directory")
    p.add_argument("target", nargs="?", metavar="MASTER_OR_DIR", help="master file or directory")
    p.add_argument("--esaf", type=int, required=True, help="run as the ESAF account e<esaf>")
    p.add_argument("--user", default=None, help="run as this account instead (esaf 0, dev)")
    p.add_argument("--sizes", default="384,1024", help="view widths, comma separated")
    p.add_argument("--frames", default=None, metavar="A-B", help="1-based range (default: all)")
    p.add_argument("--no-wait", action="store_true", help="queue the tasks and return at once")
    p.add_argument("--watch", default=None, metavar="DIR", help="prefetch new datasets in DIR")
    p.add_argument("--interval", type=float, default=2.0, help="--watch poll interval, seconds")
    p.add_argument("--give-up", type=float, default=600.0, help="--watch: give up after s idle")
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="--watch: directory levels (IS_PREFETCH_WATCH_DEPTH)",
    )
    p.add_argument("--window", type=int, default=None, help="tasks in flight (IS_PREFETCH_WINDOW)")
    p.add_argument("--timeout", type=float, default=120.0, help="longest wait for one frame, s")
    p.set_defaults(handler=_cmd_prefetch)


#: Subcommands whose own modules parse their arguments (``isctl flower --help`` works).
PASSTHROUGH = {
    "flower": ("ops.flower", "run Flower against the broker (auth from settings)"),
    "status": ("ops.status", "per-identity backlog and live workers"),
}


def _add_ops(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, (_, text) in PASSTHROUGH.items():
        sub.add_parser(name, help=text, add_help=False)


def build_parser() -> argparse.ArgumentParser:
    """The full ``isctl`` argument parser."""
    parser = argparse.ArgumentParser(prog="isctl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    adders = (_add_render, _add_meta, _add_demo, _add_up, _add_get, _add_session, _add_prefetch)
    for add in (*adders, _add_ops):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``isctl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        module_main: Callable[[list[str]], int] = importlib.import_module(
            PASSTHROUGH[argv[0]][0]
        ).main
        return module_main(argv[1:])
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except IsError as exc:
        print(f"isctl: {exc.wire_text()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
