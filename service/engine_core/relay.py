"""What the front ends ask of each other, relayed by the engine process.

* An operator's ``reload`` on one front end: every other one follows it. The last reload of
  each category is kept and replayed to every front end that connects (``greet``), so that
  one started after it (a killed one's replacement) or cut off when it was relayed serves
  what the others serve, not the newest version an operator had rolled back from. A
  ``greeted`` message ends the replay: a starting front end follows what came before it first.
  The record is also kept in a file beside the engine process's socket (``keep_at``), which a
  restarted engine process replays from its first greeting: a front end restarted with it
  is greeted before the surviving front ends have reconnected to hand the record back.
* A category the store watch retired (``retired``, sent by each front end that retires it, on
  its own scans): its record is dropped, here and in the file, so that a front end started
  after its folder came back serves the newest version as the running ones do, not the pin of
  a category that left the store. A retirement newly accepted (not one heard already, nor one
  older than the reload recorded) is relayed to the other front ends, which end that pin (not
  a newer one) and retire on their own scans, or serve the newest version if the folder is
  back: one started while the category was away began its grace later than the others and
  kept the pin for good otherwise. What was dropped is remembered by its
  stamp (in the file too), so that a front end still carrying that pin (one started while the
  category was away, handing its record to a new engine process) cannot bring it back.
* A ``gather`` (an admin's view of what every front end holds: the recent scores of
  :mod:`service.pipeline.recent`): every other front end is asked (``collect``), their
  ``part`` frames go to the front end that asked as they come, unparsed, and ``gathered``
  ends it once all answered, or after :data:`GATHER_TIMEOUT_S` with those that did (a
  stopped front end must not hang an admin's page). A scrape's gather (``FLUSH_TOPIC`` of
  :mod:`service.metrics_buffer`) also reads what is read at scrape time here (``on_scrape``:
  the GPU's memory, whose CUDA context is this process's, not the front ends') and writes
  this process's buffered metric values first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.engine_core.frontend import FrontEnd
from service.ipc import frames
from service.ipc.channel import Message
from service.metrics_buffer import FLUSH_TOPIC
from service.metrics_buffer import flush as flush_metrics
from service.pipeline.peer_reloads import retired_message

log = logging.getLogger(__name__)

# How long a gather waits for the front ends' answers (each is a copy of memory it holds,
# made on its event loop: milliseconds, unless that process is stuck).
GATHER_TIMEOUT_S = 2.0


@dataclass
class Gather:
    """A front end's ``gather`` in progress: who asked, under which request id, who is left."""

    asker: FrontEnd
    rid: int
    asked: int
    waiting: set[int]
    answered: int = 0
    timer: asyncio.TimerHandle | None = None


class Relay:
    """Reloads and gathers between the connected ``frontends`` (the engine core's table)."""

    def __init__(self, frontends: dict[int, FrontEnd], on_scrape: Callable[[], None] | None = None) -> None:
        self.frontends = frontends
        self.on_scrape = on_scrape
        # The last operator reload of each category (its message, stamped by the front end
        # that made it).
        self.reloads: dict[str, Message] = {}
        # category -> the stamp of the last reload dropped when the category was retired: a
        # reload of it up to that stamp is one from before the retirement, and not recorded.
        self.retired: dict[str, int] = {}
        self.gathers: dict[int, Gather] = {}
        self._next_gather = 0
        self._kept_at: Path | None = None

    def keep_at(self, path: Path) -> None:
        """Keep the last reloads in ``path`` (beside the socket, in the server's run folder, which
        outlives this process and not the server), starting from what an engine process before
        this one kept there. Before, a new engine process knew no reload until a surviving front
        end reconnected (its back-off, up to a second) and handed its record over, and a front end
        restarted with it (killed together) was greeted with none: it loaded the newest version
        and served it beside the others' pin until then (4 answers of 198 in a real server)."""
        self._kept_at = path
        try:
            kept = json.loads(path.read_text())
            for message in kept:
                category, stamp = str(message["category"]), int(message["stamp"])
                if message.get("op") == "retired":
                    self.retired[category] = max(stamp, self.retired.get(category, 0))
                    continue
                known = self.reloads.get(category)
                if known is None or int(known["stamp"]) < stamp:
                    self.reloads[category] = {"op": "reload", "category": category,
                                              "version": message.get("version"), "stamp": stamp}
            for category, stamp in self.retired.items():  # a retirement newer than a reload kept
                if category in self.reloads and int(self.reloads[category]["stamp"]) <= stamp:
                    del self.reloads[category]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as exc:  # the front ends hand theirs over still
            log.warning("cannot read the reloads kept at %s (%s); learning them from the front ends", path, exc)

    def _keep(self) -> None:
        if self._kept_at is None:
            return
        staging = self._kept_at.with_name(f".{self._kept_at.name}.{os.getpid()}")
        try:  # whole or not at all: a process killed while writing leaves the last one
            dropped = [retired_message(category, stamp) for category, stamp in self.retired.items()]
            staging.write_text(json.dumps(list(self.reloads.values()) + dropped))
            staging.replace(self._kept_at)
        except OSError as exc:  # a full disk: the front ends still hand the record over
            log.warning("cannot keep the reloads at %s: %s", self._kept_at, exc)

    def greet(self, frontend: FrontEnd) -> None:
        """A front end said hello: the last reloads, which it ignores if it followed them, then
        ``greeted``: a front end starting waits for it (and follows the pins) before it loads
        and listens, so that no answer of its comes from the version an operator rolled back from."""
        for reload in self.reloads.values():
            frontend.channel.send({**reload, "replayed": True})
        frontend.channel.send({"op": "greeted"})

    def reload(self, frontend: FrontEnd, message: Message) -> None:
        """One front end reloaded a category: every other one follows."""
        # A front end also hands over its own record when it connects (this process may
        # be new): only a reload newer than the one recorded is recorded and relayed.
        category, stamp = str(message["category"]), int(message["stamp"])
        known = self.reloads.get(category)
        if known is not None and int(known["stamp"]) >= stamp or self.retired.get(category, -1) >= stamp:
            return
        self.reloads[category] = {"op": "reload", "category": category, "version": message.get("version"),
                                  "stamp": stamp}
        self.retired.pop(category, None)
        self._keep()
        for other in self.frontends.values():
            if other is not frontend:
                other.channel.send(self.reloads[category])

    def retire(self, frontend: FrontEnd, message: Message) -> None:
        """``frontend``'s store watch retired a category whose last reload it knew by ``stamp``:
        that reload (or an older one) is dropped, and the other front ends are told (once).
        Idempotent (every front end sends it), and a reload newer than the stamp (an operator's,
        after the folder came back) is left alone."""
        category, stamp = str(message["category"]), int(message["stamp"])
        known = self.reloads.get(category)
        if known is not None and int(known["stamp"]) > stamp or self.retired.get(category, -1) >= stamp:
            return
        if known is not None:
            del self.reloads[category]
            log.info("%s: retired by front end %d (pid %d): its last reload (version %s) is no longer "
                     "replayed", category, frontend.ident, frontend.pid, known.get("version") or "newest")
        self.retired[category] = stamp
        self._keep()
        # The others end that pin too (:meth:`ReloadRecord.peer_retired`): one started while the
        # folder was away began its grace later, and would serve the pin for good if the folder
        # came back between the others' grace and its own (they serve the newest, unpinned).
        for other in self.frontends.values():
            if other is not frontend:
                other.channel.send(retired_message(category, stamp))

    # ------------------------------------------------------------------ gathers
    def gather(self, asker: FrontEnd, rid: int, topic: str, args: Message) -> None:
        if topic == FLUSH_TOPIC:  # a scrape: this process's values too (the front ends write theirs to answer)
            if self.on_scrape is not None:
                try:
                    self.on_scrape()
                except Exception:  # a gauge left as it was must not cost the scrape its other series
                    log.exception("reading this process's scrape-time metrics failed")
            flush_metrics()
        others = [f for f in self.frontends.values() if f is not asker]
        self._next_gather += 1
        gid = self._next_gather
        gather = self.gathers[gid] = Gather(asker, rid, len(others), {f.ident for f in others})
        for other in others:
            other.channel.send({"op": "collect", "gid": gid, "topic": topic, "args": args})
        if others:
            gather.timer = asyncio.get_running_loop().call_later(GATHER_TIMEOUT_S, self._end_gather, gid)
        else:
            self._end_gather(gid)

    def relay_part(self, frontend: FrontEnd, frame: bytes) -> None:
        gid, last, _ = frames.unpack_part(frame)
        gather = self.gathers.get(gid)
        if gather is None or frontend.ident not in gather.waiting:
            return  # late (the gather ended without it) or not asked: dropped
        gather.asker.channel.send_frame(frames.readdress_part(frame, gather.rid))
        if last:
            gather.waiting.discard(frontend.ident)
            gather.answered += 1
            if not gather.waiting:
                self._end_gather(gid)

    def _end_gather(self, gid: int) -> None:
        gather = self.gathers.pop(gid, None)
        if gather is None:
            return
        if gather.timer is not None:
            gather.timer.cancel()
        if gather.answered < gather.asked:
            log.warning("gather %d: %d of %d front ends did not answer (gone, or not within %.0f s)", gid,
                        gather.asked - gather.answered, gather.asked, GATHER_TIMEOUT_S)
        gather.asker.channel.send({"op": "gathered", "rid": gather.rid, "asked": gather.asked,
                                   "answered": gather.answered})

    def left(self, frontend: FrontEnd) -> None:
        """``frontend`` went away: its gathers end unanswered, the others stop waiting for it."""
        for gid, gather in list(self.gathers.items()):
            if gather.asker is frontend:  # no one to answer any more
                if gather.timer is not None:
                    gather.timer.cancel()
                del self.gathers[gid]
            elif frontend.ident in gather.waiting:  # it will not answer: the others' answers go now
                gather.waiting.discard(frontend.ident)
                if not gather.waiting:
                    self._end_gather(gid)
