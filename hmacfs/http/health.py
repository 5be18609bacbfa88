# -*- test-case-name: tests.test_health -*-
"""
``GET /healthz``: can this process take uploads right now?

200 with a short JSON when the store is writable and Redis (when
configured) is connected, 503 with the same JSON naming what is wrong.  The
store is probed through ``IStore.probe`` (the filesystem backend creates,
writes and removes a file in ``StoreDir/.hmacfs`` on the disk pool, never on
the reactor thread), and the answer is kept for ``cache_seconds`` so that a
monitor polling every second (or several at once) costs one probe per
interval, not one per request.
Served on the metrics listener, and on the main listener with
``HealthOnMainPort``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from hmacfs.errors import Refusal
from hmacfs.logs import log_router

if TYPE_CHECKING:
    from twisted.python.failure import Failure

log = Logger(observer=log_router)

HEALTH_PATH = b"/healthz"


@attrs.frozen
class HealthReport:
    """One answer: whether all is well, and the JSON fields that say so."""

    healthy: bool
    fields: dict[str, str]

    def body(self) -> bytes:
        return json.dumps({"status": "ok" if self.healthy else "fail", **self.fields}).encode() + b"\n"


class Probed(Protocol):
    """What the check uses of an ``IStore``."""

    def probe(self) -> Deferred[None]:
        """Fails if the store cannot be written now."""


class HealthCheck:
    """
    The checks behind ``/healthz``.

    ``store.probe`` says whether the store can be written (a refusal's reason
    is the problem reported); ``redis_connected`` is None when no Redis is
    configured.
    """

    def __init__(
        self,
        *,
        store: Probed,
        clock: Any,
        redis_connected: Callable[[], bool] | None = None,
        cache_seconds: float = 2.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.redis_connected = redis_connected
        self.cache_seconds = cache_seconds
        self._store_problem: str | None = None
        self._probed_at: float | None = None
        self._waiting: list[Deferred[str | None]] | None = None  # a probe in flight

    def check(self) -> Deferred[HealthReport]:
        """The current report (the store probe at most ``cache_seconds`` old)."""
        return self._store().addCallback(self._report)

    def _report(self, store_problem: str | None) -> HealthReport:
        fields = {"store": store_problem or "writable"}
        healthy = store_problem is None
        if self.redis_connected is not None:
            connected = self.redis_connected()
            fields["redis"] = "connected" if connected else "disconnected"
            healthy = healthy and connected
        return HealthReport(healthy, fields)

    def _store(self) -> Deferred[str | None]:
        now = self.clock.seconds()
        if self._probed_at is not None and now - self._probed_at < self.cache_seconds:
            return succeed(self._store_problem)
        result: Deferred[str | None] = Deferred()
        if self._waiting is not None:
            self._waiting.append(result)
            return result
        self._waiting = [result]
        probing = self.store.probe()
        probing.addCallbacks(lambda _: None, _problem)
        probing.addCallback(self._probed)
        return result

    def _probed(self, problem: str | None) -> None:
        if problem is not None and problem != self._store_problem:
            where = getattr(self.store, "root", "")
            log.warn("health check: store {path} {problem}", path=str(where), problem=problem)
        self._store_problem = problem
        self._probed_at = self.clock.seconds()
        waiting, self._waiting = self._waiting or [], None
        for deferred in waiting:
            deferred.callback(problem)


def _problem(failure: Failure) -> str:
    """A refusal says what is wrong (``not writable: ...``); anything else was not checked."""
    if failure.check(Refusal):
        return str(failure.value.reason)
    return f"not checked: {failure.getErrorMessage()}"


class HealthResource(Resource):
    """``GET``/``HEAD /healthz``: 200 or 503 with the report's JSON."""

    isLeaf = True

    def __init__(self, health: HealthCheck) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request: Any) -> int:
        finished: list[object] = []
        request.notifyFinish().addBoth(finished.append)

        def answer(report: HealthReport) -> None:
            if finished:
                return  # the client went away
            body = report.body()
            request.setResponseCode(200 if report.healthy else 503)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        self.health.check().addCallback(answer).addErrback(
            lambda failure: log.failure("health check failed", failure)
        )
        return NOT_DONE_YET

    render_HEAD = render_GET


class HealthGate(Resource):
    """The main listener's root with HealthOnMainPort: /healthz here, the rest to hmacfs."""

    isLeaf = True

    def __init__(self, uploads: Resource, health: HealthResource) -> None:
        super().__init__()
        self.uploads = uploads
        self.health = health

    def render(self, request: Any) -> Any:
        if (
            request.path == HEALTH_PATH
            and request.method in (b"GET", b"HEAD")
            and getattr(request, "rejection", None) is None
        ):
            return self.health.render(request)
        return self.uploads.render(request)
