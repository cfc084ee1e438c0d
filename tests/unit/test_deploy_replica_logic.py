"""Pure pieces of the replica-aware reads: LSN arithmetic, the replica cooldown, Redis link freshness."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from nexus.replicas.flags import link_is_fresh
from nexus.replicas.health import Cooldown
from nexus.replicas.lsn import format_lsn, parse_lsn
from nexus.replicas.objects import normalise_etag


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_lsn_round_trips(position):
    assert parse_lsn(format_lsn(position)) == position


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=0, max_value=2**64 - 1))
def test_lsn_order_is_the_order_of_positions(a, b):
    # Text comparison of LSNs is wrong ("9/0" > "10/0"); the parsed integers order correctly.
    assert (parse_lsn(format_lsn(a)) < parse_lsn(format_lsn(b))) == (a < b)


def test_lsn_parses_what_postgres_prints_and_refuses_the_rest():
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert parse_lsn("0/0") == 0
    for bad in ("", "16", "/1", "1/", "x/1", "1/2/3"):
        with pytest.raises(ValueError):
            parse_lsn(bad)


def test_cooldown_skips_a_failed_replica_for_a_while():
    now = [100.0]
    cooldown = Cooldown(10.0, clock=lambda: now[0])
    assert cooldown.available()
    cooldown.failed()
    now[0] = 109.9
    assert not cooldown.available()
    now[0] = 110.0
    assert cooldown.available()


def test_redis_link_is_fresh_only_while_up_and_recently_heard():
    up = {"role": "slave", "master_link_status": "up", "master_last_io_seconds_ago": 1}
    assert link_is_fresh(up, 5)
    assert not link_is_fresh({**up, "master_last_io_seconds_ago": 9}, 5)
    assert not link_is_fresh({**up, "master_link_status": "down"}, 5)
    assert not link_is_fresh({**up, "master_last_io_seconds_ago": -1}, 5)
    assert link_is_fresh({"role": "master"}, 5)  # a master is current by definition


def test_etags_compare_without_quotes():
    assert normalise_etag('"abc-2"') == normalise_etag("abc-2") == "abc-2"
    assert normalise_etag(None) is None
