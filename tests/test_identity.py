"""uid/gid derivation through NSS (spec 3.5, Appendix A; bug 10)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from istasks.errors import IdentityError
from istasks.settings import Settings
from queues.identity import ESAF_ACCOUNT_MIN, IdentityResolver, IdRange
from queues.naming import Identity
from tests.wire_assert import assert_error_reply, assert_success_reply

if TYPE_CHECKING:
    from tests.accounts import Accounts
    from tests.bridge_harness import BridgeHarness

pytest_plugins = ("tests.accounts", "tests.bridge_harness")

ANY = IdRange(1, 2**32 - 2)


def _resolver(policy: str = "user", **ranges: IdRange) -> IdentityResolver:
    return IdentityResolver(policy, uids=ranges.get("uids", ANY), gids=ranges.get("gids", ANY))


def test_user_policy_small_esaf_uses_the_users_primary_group(accounts: Accounts) -> None:
    user = accounts.shared_user()
    for esaf in (0, 1, ESAF_ACCOUNT_MIN):
        assert _resolver().resolve(user.name, esaf) == Identity(user.uid, user.gid)


def test_user_policy_large_esaf_uses_the_esaf_accounts_group(accounts: Accounts) -> None:
    user = accounts.shared_user()
    esaf, owner = accounts.esaf()
    assert owner.gid != user.gid
    assert _resolver().resolve(user.name, esaf) == Identity(user.uid, owner.gid)


def test_esaf_policy_uses_the_esaf_account(accounts: Accounts) -> None:
    esaf, owner = accounts.esaf()
    assert _resolver("esaf").resolve(None, esaf) == Identity(owner.uid, owner.gid)


@pytest.mark.parametrize("esaf", [0, -5])
def test_esaf_policy_needs_an_esaf(esaf: int) -> None:
    with pytest.raises(IdentityError, match="needs an ESAF number > 0"):
        _resolver("esaf").resolve("root", esaf)


def test_unknown_accounts_are_refused(accounts: Accounts) -> None:
    with pytest.raises(IdentityError, match="no Unix account 'no_such_user_x9'"):
        _resolver().resolve("no_such_user_x9", 0)
    with pytest.raises(IdentityError, match="no Unix account 'e4000000000'"):
        _resolver().resolve(accounts.shared_user().name, 4_000_000_000)
    with pytest.raises(IdentityError, match="no Unix account"):
        _resolver().resolve("nul\0byte", 0)
    with pytest.raises(IdentityError, match="no user name"):
        _resolver().resolve(None, 0)


def test_root_uid_is_refused() -> None:
    with pytest.raises(IdentityError, match="uid 0 or gid 0"):
        _resolver().resolve("root", 0)


def test_root_gid_is_refused(accounts: Accounts) -> None:
    esaf, owner = accounts.esaf(gid=0)
    assert owner.gid == 0 and owner.uid != 0
    with pytest.raises(IdentityError, match="uid 0 or gid 0"):
        _resolver("esaf").resolve(None, esaf)
    with pytest.raises(IdentityError, match="uid 0 or gid 0"):
        _resolver().resolve(accounts.shared_user().name, esaf)


def test_ids_outside_the_configured_range_are_refused(accounts: Accounts) -> None:
    user = accounts.shared_user()
    with pytest.raises(IdentityError, match=f"uid {user.uid} outside"):
        _resolver(uids=IdRange(user.uid + 1, user.uid + 10)).resolve(user.name, 0)
    with pytest.raises(IdentityError, match=f"gid {user.gid} outside"):
        _resolver(gids=IdRange(user.gid + 1, user.gid + 10)).resolve(user.name, 0)


def test_unknown_policy_is_a_startup_error() -> None:
    with pytest.raises(ValueError, match="IS_IDENTITY_POLICY"):
        IdentityResolver.from_settings(Settings(identity_policy="badge"))


def test_wire_unknown_account_is_one_frame_not_a_hang(bridge: BridgeHarness) -> None:
    bridge.login("ghost", user="no_such_user_x9")
    reply = bridge.request({"type": "jpeg", "pid": "ghost"})
    assert_error_reply(reply, "isMain.c main: no Unix account 'no_such_user_x9'")
    bridge.login("root-session", user="root")
    assert_error_reply(bridge.request({"type": "jpeg", "pid": "root-session"}), "uid 0 or gid 0")


def test_wire_identity_reaches_the_dispatcher(bridge: BridgeHarness, accounts: Accounts) -> None:
    esaf, owner = accounts.esaf()
    bridge.login("with-esaf", esafs=[esaf])
    reply = assert_success_reply(
        bridge.request({"type": "spots", "pid": "with-esaf", "esaf": esaf})
    )
    assert reply[1] == f"{bridge.user.uid}:{owner.gid}".encode()
    identity, kind, _, _ = bridge.dispatcher.calls[-1]
    assert (identity, kind) == (Identity(bridge.user.uid, owner.gid), "spots")
