"""Replies recorded from the original C server, replayed against the real stack.

``../shared/compat`` holds replies recorded from LS-CAT's original ``is`` (the golden
set), the deterministic generator of the data they were recorded on and the replay tool.
This test does what its README says an operator does: write the data owned by an ESAF
account (dir 0750, files 0640), start the service as ``isctl up`` does (own Redis,
supervisor forking workers as the user's UID and the ESAF's GID, bridge behind an
is-proxy), sign a session for a user of that ESAF, and replay every case through the
proxy with ``compare_golden.py --strict``: every case must be MATCH (or MATCH with
warnings for the original's documented bugs), none FAIL or DIFF.

Root is needed (accounts, setuid workers); the test skips without it or without the kit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from istasks.settings import Settings
from ops.devsession import ensure_keypair
from ops.stack import Stack
from tests.compat_kit import COMPAT_DIR, replay, replay_cases, write_golden_data

if TYPE_CHECKING:
    from tests.accounts import Account, Accounts

pytest_plugins = ("tests.accounts",)
pytestmark = [pytest.mark.slow, pytest.mark.root]

REPLAY_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kit() -> Path:
    if not (COMPAT_DIR / "compare_golden.py").is_file():
        pytest.skip(f"no compatibility kit at {COMPAT_DIR}")
    if os.geteuid() != 0:
        pytest.skip("the replay needs root (ESAF accounts, workers under other UIDs)")
    return COMPAT_DIR


@pytest.fixture(scope="module")
def esaf_owner(kit: Path, accounts: Accounts) -> tuple[int, Account]:
    """(esaf, account ``e<esaf>``): the data's owner, whose group the workers get."""
    return accounts.esaf()


@pytest.fixture(scope="module")
def session_user(accounts: Accounts, esaf_owner: tuple[int, Account]) -> tuple[str, int]:
    """(user name, esaf) of the replayed session: a plain user allowed on that ESAF."""
    return accounts.shared_user().name, esaf_owner[0]


@pytest.fixture(scope="module")
def golden_data(kit: Path, esaf_owner: tuple[int, Account]) -> Iterator[Path]:
    """The golden data, written by the kit's own generator and owned by the ESAF."""
    _, owner = esaf_owner
    top = Path(tempfile.mkdtemp(prefix="is-compat-"))
    top.chmod(0o755)
    data = top / "data"
    write_golden_data(kit, data, owner.uid, owner.gid, REPLAY_TIMEOUT_S)
    yield data
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(golden_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(worker_idle_s=300, view_timeout_s=60)
    with Stack.start(tmp_path_factory.mktemp("compat-run"), settings, via_proxy=True) as running:
        yield running


def test_golden_replies_replay_without_fail_or_diff(
    kit: Path,
    stack: Stack,
    golden_data: Path,
    session_user: tuple[str, int],
    tmp_path: Path,
) -> None:
    user, esaf = session_user
    private_key, _ = ensure_keypair(stack.run_dir)
    report = tmp_path / "replay.json"
    done = replay(
        kit,
        endpoint=stack.endpoint,
        data=golden_data,
        redis=stack.redis_url,
        key=private_key,
        user=user,
        esaf=esaf,
        report=report,
        timeout_s=REPLAY_TIMEOUT_S,
    )
    summary = done.stdout.strip().splitlines()[-1:] or [done.stderr[-2000:]]
    print(done.stdout)
    cases = replay_cases(report)
    failing = [c["id"] for c in cases if c.get("status") != "MATCH"]
    assert cases, f"the replay ran no case: {summary[0]}\n{done.stderr[-2000:]}"
    assert not failing, f"cases not MATCH: {failing}\n{done.stdout}"
    assert done.returncode == 0, f"replay failed: {summary[0]}\n{done.stdout}"
