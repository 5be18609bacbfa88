# -*- test-case-name: tests.test_upload -*-
"""
Upload admission, decided from the request line and headers.

``UploadPolicy.headers_received`` runs before any byte of the body is read:
path, method, length, MAC, size limit, tombstones, existence, free space
and, for a resumed upload, its binding and offset are all checked there, so a
refused client gets its answer without sending the body.  The checks that need
the store are Deferreds of the ``IStore`` (``RequestState.admission``): the
channel holds the body, and any 100 Continue, until they are decided.  The same holds for the
three ways a body can arrive:

* ``PUT`` of the whole file (XEP-0363), or of its rest with ``Content-Range:
  bytes N-(S-1)/S`` and the same ``X-Session-Token`` (``hmacfs.upload.resume``);
* tus ``POST`` (creation, creation-with-upload) and ``PATCH`` on the same
  signed URL (``hmacfs.upload.tus``).

Body-less tus ``HEAD``/``DELETE`` and the session-token ``HEAD`` are answered
from here too (``RequestState.answer``), so every MAC check lives in one place.

This module only routes a request to its verb's handler
(``hmacfs.upload.protocols``) and records the outcome in the request's
``RequestState``; the checks are ``hmacfs.upload.admission``'s, the lease
dance ``hmacfs.upload.leases``' and the body writer ``hmacfs.upload.receiver``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacfs.errors import Refusal, storage_refusal
from hmacfs.http.channel import Answer, RequestState, StreamingRequest
from hmacfs.logs import log_router
from hmacfs.signing.auth import Authenticator
from hmacfs.signing.paths import PathError, SlotPath, parse_slot_path
from hmacfs.storage.interface import IStore
from hmacfs.upload import tus
from hmacfs.upload.admission import Admission, UploadLimits, client_token, has_mac
from hmacfs.upload.leases import UploadStarter
from hmacfs.upload.protocols import PutUploads, TusUploads
from hmacfs.upload.receiver import UploadReceiver
from hmacfs.upload.resume import Uploads

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = ["ALLOW", "UploadLimits", "UploadPolicy"]

log = Logger(observer=log_router)

#: What a refused body method is told (tus methods need Tus-Resumable).
ALLOW = b"GET, HEAD, PUT, OPTIONS"

#: A verb's handler: an Answer now, or a Deferred receiver (or answer) once leased.
Handler = Callable[[StreamingRequest, SlotPath, int | None], Any]


class UploadPolicy:
    """Admits or refuses uploads from their request line and headers (an ``IBodyPolicy``)."""

    def __init__(
        self,
        *,
        limits: UploadLimits,
        store: IStore,
        authenticator: Authenticator,
        clock: IReactorTime,
        on_auth_failure: Callable[[StreamingRequest, str], None] | None = None,
        uploads: Uploads | None = None,
    ) -> None:
        self.limits = limits
        self.store = store
        if uploads is None:
            from hmacfs.state.store import EmbeddedState

            uploads = Uploads(store=store, state=EmbeddedState(clock), clock=clock)
        self.uploads = uploads
        self.admission = Admission(
            limits=limits, store=store, authenticator=authenticator, on_auth_failure=on_auth_failure
        )
        self.starter = UploadStarter(limits=limits, store=store, uploads=uploads, clock=clock)
        self.put = PutUploads(self.admission, self.starter, store)
        self.tus = TusUploads(self.admission, self.starter, store, uploads)
        self._tus_verbs: dict[bytes, Handler] = {
            b"POST": self.tus.create,
            b"PATCH": self.tus.patch,
            b"HEAD": self.tus.head,
            b"DELETE": self.tus.delete,
        }

    @property
    def active(self) -> int:
        """Uploads accepted and not yet stored, kept or abandoned (for graceful stop)."""
        return self.starter.active

    # routing

    def headers_received(self, request: StreamingRequest, length: int | None) -> None:
        """Attach a receiver, an answer or a ``Refusal`` to an upload request."""
        state = request.upload_state
        method = request.method
        is_tus = tus.is_tus(request)
        if is_tus and method == b"POST":
            # tus clients behind proxies that drop PATCH/DELETE send them as POST.
            method = request.method = tus.method_override(request) or method
        handler: Handler | None = None
        if method == b"PUT":
            handler = self.put.put
        elif is_tus:
            handler = self._tus_verbs.get(method)
        elif method == b"HEAD" and client_token(request) is not None and has_mac(request):
            handler = self.put.head
        if handler is None:
            if length != 0:
                state.rejection = Refusal(405, "method not allowed", ((b"Allow", ALLOW),))
            return
        try:
            slot = parse_slot_path(request.path, self.limits.prefix)
        except PathError as error:
            state.rejection = Refusal(error.status, error.reason)
            return
        state.slot = slot
        try:
            if is_tus:
                tus.check_version(request)
            outcome = handler(request, slot, length)
        except Refusal as refusal:
            state.rejection = Refusal(refusal.status, refusal.reason, refusal.headers)
            return
        if isinstance(outcome, Deferred):
            outcome.addCallbacks(
                self._attach, self._refuse, callbackArgs=(state,),
                errbackArgs=(state, slot, method == b"HEAD"),
            )
            if state.consumer is None and state.answer is None and state.rejection is None:
                # The store answers later (off the reactor thread): the channel reads
                # no body and sends no 100 Continue until then.  (Not ``outcome``
                # itself: a Deferred waiting on an inner one already counts as called.)
                decided: Deferred[None] = Deferred()
                outcome.addBoth(lambda _: decided.callback(None))
                state.admission = decided
        else:
            self._attach(outcome, state)

    def _attach(self, outcome: Answer | UploadReceiver, state: RequestState) -> None:
        if isinstance(outcome, Answer):
            state.answer = outcome
        else:
            state.consumer = state.receiver = outcome

    def _refuse(self, failure: Failure, state: RequestState, slot: SlotPath, reading: bool) -> None:
        if failure.check(Refusal):
            error = failure.value
            state.rejection = Refusal(error.status, error.reason, error.headers)
        elif failure.check(OSError):
            # A store lookup at header time (a HEAD's offset, a PUT's parents) that failed:
            # a short answer, never an unhandled error in the channel.
            error = failure.value
            refused = storage_refusal(error, reading=reading)
            if refused.status == 503:
                log.warn("{path}: storage error: {error}", path=slot.text, error=error.strerror or error)
            state.rejection = Refusal(refused.status, refused.reason, refused.headers)
        else:
            log.failure("upload admission failed", failure)
            state.rejection = Refusal(500, "internal error")
