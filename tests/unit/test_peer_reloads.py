"""The record of operator reloads a front end keeps (service/pipeline/peer_reloads.py), and
the engine process's relay of it (service/engine_core/relay.py), where a retirement meets a
reload made after it."""

from __future__ import annotations

import time

from service.engine_core.frontend import FrontEnd
from service.engine_core.relay import Relay
from service.pipeline.peer_reloads import ReloadRecord


def test_a_reload_made_after_a_retirement_is_newer_than_the_pin_it_dropped_whatever_the_clock() -> None:
    """A pin stamped ahead of this front end's clock (made by another one before the host's
    clock stepped back, NTP): after its retirement an operator's reload here must still be
    newer than it, or the engine process, which refuses every reload up to the dropped stamp
    (one from before the retirement), neither records it nor relays it to the other front ends."""
    record, relay = ReloadRecord(), Relay({})
    here = FrontEnd(1, None)  # type: ignore[arg-type]  # nothing is sent to the one that asks
    ahead = time.time_ns() + 10_000_000_000
    assert record.heard("aaa", "1", ahead, replayed=False)
    relay.reload(here, {"op": "reload", "category": "aaa", "version": "1", "stamp": ahead})
    retired = record.retired("aaa")
    assert retired is not None
    relay.retire(here, retired)
    assert "aaa" not in relay.reloads

    made = record.made("aaa", "2")
    assert made["stamp"] > ahead
    relay.reload(here, made)
    assert relay.reloads["aaa"]["version"] == "2"


def test_a_peer_retirement_ends_the_pin_it_retired_once_and_never_a_newer_one() -> None:
    """Another front end's retirement, relayed by the engine process: the pin recorded here
    from up to its stamp ends (a front end started while the category was away, which the
    others retired before its own grace was over), once; a newer reload (an operator's, after
    the folder came back) stays, and the retired pin handed back later is not followed again."""
    record = ReloadRecord()
    assert record.heard("aaa", "1", 10, replayed=True)
    assert record.peer_retired("aaa", 10)
    assert "aaa" not in record.latest and record.dropped == {"aaa": 10}
    assert not record.peer_retired("aaa", 10)  # heard again: nothing ends twice
    assert not record.heard("aaa", "1", 10, replayed=True)  # the retired pin, replayed by a stale record
    assert {"op": "retired", "category": "aaa", "stamp": 10} in record.messages()  # a new engine process drops it too

    made = record.made("aaa", "2")  # an operator's pin after the folder came back
    assert not record.peer_retired("aaa", 10)  # a late retirement of the old pin
    assert record.latest["aaa"] == (made["stamp"], "2")
    assert record.retired("aaa") is not None  # its own retirement still tells the engine process

    assert not ReloadRecord().peer_retired("bbb", 10)  # no pin here: nothing to end
