# -*- test-case-name: tests.test_component -*-
"""
hmacfs as an XEP-0114 external component: upload slots without a server module.

Prosody needs ``mod_http_upload_external`` and ejabberd ``external_secret``
to hand out slots for us; Openfire, Tigase and others have nothing of the
kind.  Every XMPP server accepts external components, though, so hmacfs can
log in as ``upload.example.org`` and answer the XEP-0363 requests itself:

* disco#info: identity ``store/file``, features ``urn:xmpp:http:upload:0``
  and the legacy ``urn:xmpp:http:upload``, and per namespace an x-data form
  with ``max-file-size``;
* slot requests in both namespaces (attributes in ``:0``, child elements in
  the legacy one), answered with ``v3`` URLs under ``PublicURL`` that expire
  after ``SlotExpiry``: since hmacfs issues the slots itself, an old slot URL
  cannot be replayed;
* the XEP-0363 errors: ``bad-request``, ``forbidden`` (outside
  ``UploadAccess``), ``not-acceptable`` + ``<file-too-large>`` and
  ``resource-constraint`` + ``<retry stamp>`` (``UserQuota`` used up).

Decisions live in plain objects (``SlotPolicy``, ``UploadAccess``,
``DailyQuota``) that know nothing of XML; ``UploadHandler`` turns stanzas into
calls on them, and ``ComponentService`` keeps the connection up, reconnecting
with exponential back-off.  The quota is counted in this process's memory:
it starts from zero on a restart and is not shared between machines.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.words.protocols.jabber import component, error, xmlstream
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

from hmacfs.config import Config
from hmacfs.logs import log_router
from hmacfs.signing.auth import SignedSlot
from hmacfs.signing.slots import SlotError, expiring_slot

__all__ = [
    "NS_UPLOAD",
    "NS_UPLOAD_LEGACY",
    "ComponentService",
    "DailyQuota",
    "FileTooLarge",
    "Forbidden",
    "QuotaExceeded",
    "SlotPolicy",
    "SlotRefused",
    "UploadAccess",
    "UploadHandler",
    "component_from_config",
    "default_access",
]

log = Logger(observer=log_router)

NS_UPLOAD = "urn:xmpp:http:upload:0"
NS_UPLOAD_LEGACY = "urn:xmpp:http:upload"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
NS_PING = "urn:xmpp:ping"
NS_XDATA = "jabber:x:data"

#: The name in our disco identity.
SERVICE_NAME = "HTTP File Upload"
DAY = 86400


# --- policy: who may have which slot --------------------------------------------------------


class SlotRefused(Exception):
    """A slot request is refused; the handler turns this into a stanza error."""

    condition = "bad-request"
    error_type = "modify"

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class BadRequest(SlotRefused):
    """Missing or invalid filename or size."""


class Forbidden(SlotRefused):
    """The requester is not in ``UploadAccess``."""

    condition = "forbidden"
    error_type = "auth"


class FileTooLarge(SlotRefused):
    """Larger than ``MaxUploadSize``; ``max_size`` goes into ``<max-file-size>``."""

    condition = "not-acceptable"
    error_type = "modify"

    def __init__(self, max_size: int) -> None:
        super().__init__(f"file too large (maximum {max_size} bytes)")
        self.max_size = max_size


class QuotaExceeded(SlotRefused):
    """``UserQuota`` is used up until ``retry_at`` (unix time) for this user."""

    condition = "resource-constraint"
    error_type = "wait"

    def __init__(self, retry_at: float) -> None:
        super().__init__("daily upload quota used up")
        self.retry_at = retry_at


def default_access(component_jid: str) -> tuple[str, ...]:
    """
    With no ``UploadAccess``, the users of the domain the component sits
    under: ``upload.example.org`` serves ``example.org`` (and its own domain).
    """
    _, dot, parent = component_jid.partition(".")
    return (parent, component_jid) if dot and parent else (component_jid,)


class UploadAccess:
    """
    Who may request slots: entries are domains (all their users), bare JIDs,
    or ``*`` for anyone.
    """

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = frozenset(entry.lower() for entry in entries)

    def allows(self, requester: str) -> bool:
        """Whether the (full or bare) JID ``requester`` may upload."""
        if "*" in self.entries:
            return True
        try:
            jid = JID(requester)
        except InvalidFormat:
            return False
        return jid.host in self.entries or jid.userhost() in self.entries


class DailyQuota:
    """
    Bytes per bare JID per UTC day, counted when the slot is issued.

    In memory and per process: a restart forgets the counts, and several
    hmacfs instances each count their own slots.  Only today's counters are
    kept, so memory is bounded by the users seen in one day.
    """

    def __init__(self, limit: int, clock: IReactorTime) -> None:
        self.limit = limit
        self._clock = clock
        self._day = -1
        self._used: dict[str, int] = {}

    def used(self, user: str) -> int:
        """Bytes ``user`` has had slots for today."""
        self._roll()
        return self._used.get(user, 0)

    def reserve(self, user: str, size: int) -> None:
        """Count ``size`` bytes against ``user`` or raise ``QuotaExceeded``."""
        if self.limit <= 0:
            return
        self._roll()
        used = self._used.get(user, 0)
        if used + size > self.limit:
            raise QuotaExceeded(retry_at=(self._day + 1) * DAY)
        self._used[user] = used + size

    def _roll(self) -> None:
        day = int(self._clock.seconds() // DAY)
        if day != self._day:
            self._day = day
            self._used.clear()


@attrs.frozen
class SlotRequest:
    """A parsed XEP-0363 request, in either namespace."""

    requester: str
    filename: str | None
    size: str | None
    content_type: str | None
    namespace: str


class SlotPolicy:
    """
    Decides on slot requests and signs the slots: plain logic, no XML.

    ``secret`` is called for each slot so a rotated secret is used at once;
    ``base_url`` is where hmacfs serves its upload tree
    (``PublicURL`` + ``/`` + ``UploadSubDir``).
    """

    def __init__(
        self,
        *,
        secret: Callable[[], bytes],
        base_url: str,
        max_size: int,
        access: UploadAccess,
        quota: DailyQuota,
        expiry: float,
        clock: IReactorTime,
    ) -> None:
        self.secret = secret
        self.base_url = base_url.rstrip("/")
        self.max_size = max_size
        self.access = access
        self.quota = quota
        self.expiry = expiry
        self.clock = clock

    def issue(self, request: SlotRequest) -> SignedSlot:
        """A signed slot for ``request``, or ``SlotRefused`` saying why not."""
        try:
            user = JID(request.requester).userhost()
        except InvalidFormat:
            raise Forbidden("no valid sender address") from None
        if not self.access.allows(user):
            raise Forbidden("not allowed to upload files here")
        if not request.filename:
            raise BadRequest("missing filename")
        if "/" in request.filename:
            raise BadRequest("filename must not contain '/'")
        size = _parse_size(request.size)
        if self.max_size and size > self.max_size:
            raise FileTooLarge(self.max_size)
        expires = int(self.clock.seconds() + self.expiry)
        try:
            slot = expiring_slot(
                base_url=self.base_url,
                secret=self.secret(),
                filename=request.filename,
                size=size,
                expires=expires,
            )
        except SlotError as refusal:
            raise BadRequest(f"filename not accepted: {refusal.reason}") from None
        # Counted last: a refused request must not use up the quota.
        self.quota.reserve(user, size)
        return slot


def _parse_size(text: str | None) -> int:
    if text is None or not text.strip():
        raise BadRequest("missing size")
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise BadRequest("size is not a whole number of bytes")
    return int(text)


# --- XMPP: stanzas in, stanzas out ------------------------------------------------------------


def _stamp(unix_time: float) -> str:
    """An XEP-0082 DateTime in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_time))


def _error_reply(iq: domish.Element, refusal: SlotRefused, namespace: str | None) -> domish.Element:
    app_condition = None
    if isinstance(refusal, FileTooLarge) and namespace:
        app_condition = domish.Element((namespace, "file-too-large"))
        app_condition.addElement("max-file-size", content=str(refusal.max_size))
    elif isinstance(refusal, QuotaExceeded) and namespace:
        app_condition = domish.Element((namespace, "retry"))
        app_condition["stamp"] = _stamp(refusal.retry_at)
    stanza_error = error.StanzaError(
        refusal.condition, type=refusal.error_type, text=refusal.text, appCondition=app_condition
    )
    return stanza_error.toResponse(iq)


def _upload_form(namespace: str, max_size: int) -> domish.Element:
    form = domish.Element((NS_XDATA, "x"))
    form["type"] = "result"
    field = form.addElement("field")
    field["var"] = "FORM_TYPE"
    field["type"] = "hidden"
    field.addElement("value", content=namespace)
    if max_size:
        field = form.addElement("field")
        field["var"] = "max-file-size"
        field.addElement("value", content=str(max_size))
    return form


class UploadHandler(xmlstream.XMPPHandler):
    """
    Answers the IQs addressed to the component.

    Only ``get``/``set`` IQs are answered; results, errors, messages and
    presence are ignored.  Anything not understood gets
    ``service-unavailable``, as RFC 6120 asks.
    """

    def __init__(self, policy: SlotPolicy) -> None:
        super().__init__()
        self.policy = policy

    def connectionInitialized(self) -> None:
        self.xmlstream.addObserver("/iq[@type='get']", self.on_iq)
        self.xmlstream.addObserver("/iq[@type='set']", self.on_iq)

    def on_iq(self, iq: domish.Element) -> None:
        """Dispatch one request IQ and send exactly one reply."""
        if getattr(iq, "handled", False):
            return
        # twisted.words' convention: an observer marks a stanza handled (Element has no such slot).
        iq.handled = True  # type: ignore[attr-defined]
        payload = next(iter(iq.elements()), None)
        reply: domish.Element
        if payload is None:
            reply = error.StanzaError("bad-request").toResponse(iq)
        elif iq["type"] == "get" and payload.uri == NS_DISCO_INFO:
            reply = self.disco_info(iq, payload)
        elif iq["type"] == "get" and payload.uri == NS_DISCO_ITEMS:
            reply = xmlstream.toResponse(iq, "result")
            reply.addElement((NS_DISCO_ITEMS, "query"))
        elif iq["type"] == "get" and payload.uri == NS_PING and payload.name == "ping":
            reply = xmlstream.toResponse(iq, "result")
        elif iq["type"] == "get" and payload.name == "request" and payload.uri in (
            NS_UPLOAD,
            NS_UPLOAD_LEGACY,
        ):
            reply = self.slot_reply(iq, payload)
        else:
            reply = error.StanzaError("service-unavailable").toResponse(iq)
        self.send(reply)

    def disco_info(self, iq: domish.Element, query: domish.Element) -> domish.Element:
        if query.getAttribute("node"):
            return error.StanzaError("item-not-found").toResponse(iq)
        reply = xmlstream.toResponse(iq, "result")
        result = reply.addElement((NS_DISCO_INFO, "query"))
        identity = result.addElement("identity")
        identity["category"] = "store"
        identity["type"] = "file"
        identity["name"] = SERVICE_NAME
        for feature in (NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_UPLOAD, NS_UPLOAD_LEGACY):
            result.addElement("feature")["var"] = feature
        for namespace in (NS_UPLOAD, NS_UPLOAD_LEGACY):
            result.addChild(_upload_form(namespace, self.policy.max_size))
        return reply

    def slot_reply(self, iq: domish.Element, request: domish.Element) -> domish.Element:
        namespace = request.uri
        parsed = _parse_request(iq, request)
        try:
            slot = self.policy.issue(parsed)
        except SlotRefused as refusal:
            log.info(
                "slot for {requester} refused: {reason}",
                requester=parsed.requester,
                reason=refusal.text,
            )
            return _error_reply(iq, refusal, namespace)
        log.info(
            "slot {url} issued to {requester} for {size} bytes",
            url=slot.get_url,  # the GET URL carries no MAC
            requester=parsed.requester,
            size=parsed.size,
        )
        reply = xmlstream.toResponse(iq, "result")
        answer = reply.addElement((namespace, "slot"))
        if namespace == NS_UPLOAD:
            put = answer.addElement("put")
            put["url"] = slot.put_url
            for name, value in slot.headers.items():
                put.addElement("header", content=value)["name"] = name
            answer.addElement("get")["url"] = slot.get_url
        else:
            answer.addElement("put", content=slot.put_url)
            answer.addElement("get", content=slot.get_url)
        return reply


def _parse_request(iq: domish.Element, request: domish.Element) -> SlotRequest:
    requester = iq.getAttribute("from", "")
    if request.uri == NS_UPLOAD:
        return SlotRequest(
            requester=requester,
            filename=request.getAttribute("filename"),
            size=request.getAttribute("size"),
            content_type=request.getAttribute("content-type"),
            namespace=NS_UPLOAD,
        )

    def child_text(name: str) -> str | None:
        for child in request.elements(NS_UPLOAD_LEGACY, name):
            return str(child)
        return None

    return SlotRequest(
        requester=requester,
        filename=child_text("filename"),
        size=child_text("size"),
        content_type=child_text("content-type"),
        namespace=NS_UPLOAD_LEGACY,
    )


# --- the connection -------------------------------------------------------------------------


class ComponentService(Service):
    """
    Keeps hmacfs logged in to the XMPP server as a component.

    ``ClientService`` reconnects whenever the connection drops; the delay
    grows exponentially (``initial_delay`` up to ``max_delay``, with jitter)
    over consecutive failures, where a connection that ended before the
    handshake succeeded (a wrong secret, a server still starting) counts as a
    failure too.  A successful handshake resets the back-off.
    """

    def __init__(
        self,
        *,
        jid: str,
        password: str,
        endpoint: IStreamClientEndpoint,
        handler: UploadHandler,
        clock: IReactorTime,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
        handshake_timeout: float = 30.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.jid = jid
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self._handshake_call: Any = None
        self.factory = component.componentFactory(jid, password)
        self.manager = xmlstream.StreamManager(self.factory)
        handler.setHandlerParent(self.manager)
        self.handler = handler
        #: connections in a row that never got past the handshake
        self.unauthenticated = 0
        self._authenticated_now = False
        self._backoff = backoffPolicy(initial_delay, max_delay, 2.0, jitter)
        self.factory.addBootstrap(xmlstream.STREAM_CONNECTED_EVENT, self._connected)
        self.factory.addBootstrap(xmlstream.STREAM_AUTHD_EVENT, self._authenticated)
        self.factory.addBootstrap(xmlstream.INIT_FAILED_EVENT, self._init_failed)
        self.factory.addBootstrap(xmlstream.STREAM_ERROR_EVENT, self._stream_error)
        self.factory.addBootstrap(xmlstream.STREAM_END_EVENT, self._ended)
        self.client = ClientService(endpoint, self.factory, retryPolicy=self._retry_delay, clock=clock)

    @property
    def connected(self) -> bool:
        """Whether the component is logged in right now."""
        return self._authenticated_now

    def _retry_delay(self, attempt: int) -> float:
        return self._backoff(attempt + self.unauthenticated)

    def _connected(self, xs: Any) -> None:
        self._authenticated_now = False
        log.debug("connected to the XMPP server, handshaking as {jid}", jid=self.jid)
        self._cancel_handshake_timeout()
        self._handshake_call = self.clock.callLater(
            self.handshake_timeout, self._handshake_timed_out, xs
        )

    def _handshake_timed_out(self, xs: Any) -> None:
        self._handshake_call = None
        log.error(
            "the XMPP server did not complete the component handshake within {seconds}s",
            seconds=self.handshake_timeout,
        )
        if xs.transport is not None:
            xs.transport.loseConnection()

    def _cancel_handshake_timeout(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None

    def _authenticated(self, xs: Any) -> None:
        self._cancel_handshake_timeout()
        self._authenticated_now = True
        self.unauthenticated = 0
        log.info("logged in to the XMPP server as component {jid}", jid=self.jid)

    def _init_failed(self, reason: Any) -> None:
        log.error(
            "the XMPP server refused component {jid}: {reason} "
            "(check ComponentJID and ComponentSecret)",
            jid=self.jid,
            reason=reason.getErrorMessage(),
        )
        xs = self.manager.xmlstream
        if xs is not None and xs.transport is not None:
            xs.transport.loseConnection()

    def _stream_error(self, reason: Any) -> None:
        condition = getattr(reason.value, "condition", None) or reason.getErrorMessage()
        log.error(
            "the XMPP server closed the component stream: {condition}"
            "{hint}",
            condition=condition,
            hint=" (check ComponentJID and ComponentSecret)" if condition == "not-authorized" else "",
        )

    def _ended(self, reason: Any) -> None:
        self._cancel_handshake_timeout()
        if self._authenticated_now:
            log.warn("lost the connection to the XMPP server; reconnecting")
        else:
            self.unauthenticated += 1
        self._authenticated_now = False

    def startService(self) -> None:
        super().startService()
        self.client.startService()

    def stopService(self) -> Deferred:
        super().stopService()
        return self.client.stopService()


def component_from_config(
    config: Config, reactor: Any, secret: Callable[[], bytes] | None = None
) -> ComponentService:
    """
    The component for ``config`` (``ComponentJID`` must be set).

    ``secret`` returns the current HMAC secret (the daemon passes its secret
    ring so a rotation applies at once); by default ``config.read_secret``.
    """
    if not config.component_jid:
        raise ValueError("ComponentJID is not set")
    base_url = config.public_url
    if config.upload_subdir:
        base_url = f"{base_url}/{config.upload_subdir}"
    policy = SlotPolicy(
        secret=secret or config.read_secret,
        base_url=base_url,
        max_size=config.max_upload_size,
        access=UploadAccess(config.upload_access or default_access(config.component_jid)),
        quota=DailyQuota(config.user_quota, reactor),
        expiry=config.slot_expiry,
        clock=reactor,
    )
    return ComponentService(
        jid=config.component_jid,
        password=config.component_secret,
        endpoint=clientFromString(reactor, config.component_server),
        handler=UploadHandler(policy),
        clock=reactor,
    )
