# -*- test-case-name: tests.test_embed -*-
"""
hmacfs as a library: the upload tree inside another Twisted application.

An XMPP component or a web application written with Twisted can serve
uploads itself instead of running a second daemon::

    from twisted.application import service, strports
    from twisted.web.resource import Resource
    from hmacfs.embed import embed

    application = service.Application("chat")
    uploads = embed(store_dir="/var/lib/chat/uploads", secret=b"...",
                    upload_subdir="upload", max_upload_size=100 * 1024**2)
    uploads.service.setServiceParent(application)   # disk pool, retention, metrics...

    root = Resource()
    root.putChild(b"", MyIndexPage())                 # the host's own pages
    site = uploads.site_for(root)                     # mounts /upload and returns the Site
    strports.service("tcp:8080", site).setServiceParent(application)

Why a special Site: Twisted's own ``Site`` reads a whole request body (into
memory or a temporary file) before any resource sees the request, and always
answers ``100 Continue``.  hmacfs must accept or refuse an upload from its
headers and then stream the body to disk, which needs
``hmacfs.http.channel.StreamingSite`` with its ``StreamingChannel`` and
``StreamingRequest``.  So the host serves its pages *through* that Site:

* ``site_for(root)`` (preferred) mounts the upload tree into the host's root
  resource and returns hmacfs's ``StreamingSite`` serving that root;
* ``install(site)`` upgrades a ``twisted.web.server.Site`` the host already
  built (its request factory must be the stock ``Request``): the upload tree
  is mounted into ``site.resource`` and the Site gets the streaming channel,
  request and policies.

Host pages keep working through the streaming Site: a request body for a
path outside the upload tree is read into ``request.content`` (up to
``host_body_limit`` bytes, 1 MiB by default; larger ones get 413) and an
``application/x-www-form-urlencoded`` POST body is parsed into
``request.args`` as Twisted does; ``multipart/form-data`` is not parsed.
Refusals decided at header time (bans, oversized bodies) are rendered by
hmacfs's error page, never by a host resource that would not expect them.

``service`` holds hmacfs's background services (logging, the disk thread
pool, Redis state, retention, metrics, draining on stop, and the XEP-0114
component when ``ComponentJID`` is set): make it a child of the host's
``Application``/``MultiService``.  Nothing listens or connects before it
starts.  While running it handles SIGHUP (reopen ``LogFile``, re-read
``SecretFile``); pass ``handle_sighup=False`` to leave SIGHUP to the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote_to_bytes

from twisted.application.service import MultiService
from twisted.web import server
from twisted.web.resource import Resource

from hmacfs.config import Config, default_config
from hmacfs.errors import Refusal
from hmacfs.http.channel import StreamingChannel, StreamingRequest, StreamingSite
from hmacfs.http.limits import ConnectionTable
from hmacfs.service.assembly import ServerTree, assemble

__all__ = ["DEFAULT_HOST_BODY_LIMIT", "EmbeddedUpload", "HostBodyPolicy", "embed"]

#: Largest request body accepted for the host's own pages.
DEFAULT_HOST_BODY_LIMIT = 1024 * 1024
_FORM = b"application/x-www-form-urlencoded"


def _prefix_segments(prefix: str) -> list[bytes]:
    return [segment.encode("utf-8") for segment in prefix.strip("/").split("/") if segment]


def _under_prefix(raw_path: bytes, prefix: list[bytes]) -> bool:
    """Whether a request path lies in the upload tree (compared decoded, like paths.py)."""
    parts = raw_path.lstrip(b"/").split(b"/")
    if len(parts) < len(prefix):
        return False
    # Only the first segments: the path goes on past the prefix.
    return all(unquote_to_bytes(raw) == wanted for raw, wanted in zip(parts, prefix, strict=False))


class _HostBody:
    """Collects a host page's request body into ``request.content``, as Twisted would."""

    def __init__(self, request: StreamingRequest, limit: int) -> None:
        self.request = request
        self.limit = limit
        self.received = 0

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            # Only a chunked body can get here (a declared length was checked).
            self.request.channel.forceAbortClient()
            return
        # twisted.web declares ``content = None`` on the class; the channel set a BytesIO.
        content: BinaryIO = self.request.content  # type: ignore[assignment]
        content.write(data)

    def body_complete(self) -> None:
        content: BinaryIO = self.request.content  # type: ignore[assignment]  # as in write()
        content.seek(0)
        kind = self.request.requestHeaders.getRawHeaders(b"Content-Type", [b""])[0]
        if self.request.method == b"POST" and kind.split(b";")[0].strip().lower() == _FORM:
            # latin-1 round-trips every byte: values stay the bytes that were sent.
            text = content.read().decode("latin-1")
            form = parse_qs(text, keep_blank_values=True, encoding="latin-1")
            args: dict[bytes, list[bytes]] = self.request.args  # type: ignore[assignment]  # likewise
            for name, values in form.items():
                args.setdefault(name.encode("latin-1"), []).extend(
                    value.encode("latin-1") for value in values
                )
            content.seek(0)

    def connection_lost(self) -> None:
        pass


class HostBodyPolicy:
    """
    The Site's body policy when hmacfs shares it with a host application:
    requests in the upload tree go to hmacfs's policy, bodies for the host's
    pages are read into memory up to ``limit`` bytes.
    """

    def __init__(self, upload_policy: Any, prefix: str, limit: int = DEFAULT_HOST_BODY_LIMIT) -> None:
        self.upload_policy = upload_policy
        self.prefix = _prefix_segments(prefix)
        self.limit = limit

    @property
    def active(self) -> int:
        """Uploads in flight (what the drain on stop waits for)."""
        return self.upload_policy.active

    def headers_received(self, request: StreamingRequest, length: int | None) -> None:
        if _under_prefix(request.path, self.prefix):
            self.upload_policy.headers_received(request, length)
            return
        if length == 0:
            return
        if length is not None and length > self.limit:
            request.upload_state.rejection = Refusal(
                413, f"request body too large (maximum {self.limit} bytes)"
            )
            return
        request.upload_state.consumer = _HostBody(request, self.limit)

    def __getattr__(self, name: str) -> Any:
        # Anything else the upload side asks of its policy (counters, limits).
        return getattr(self.upload_policy, name)


class _RejectionGate(Resource):
    """
    The Site's root in front of the host's root: a request refused at header
    time is answered by hmacfs's upload resource (error page, CORS headers),
    whatever path it was for; everything else is the host's.
    """

    def __init__(self, root: Resource, upload_resource: Resource) -> None:
        super().__init__()
        self.root = root
        self.upload_resource = upload_resource

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        if request.upload_state.rejection is not None:
            return self.upload_resource
        return self.root.getChildWithDefault(path, request)

    def render(self, request: Any) -> Any:
        if request.upload_state.rejection is not None:
            return self.upload_resource.render(request)
        return self.root.render(request)


class EmbeddedUpload:
    """
    hmacfs's upload tree and services, ready to mount in a host application.

    ``resource`` is the upload resource (a leaf that parses the full request
    path, so it must sit at ``/<UploadSubDir>``: use ``mount``), ``service``
    the background services, ``site`` hmacfs's own ``StreamingSite``.
    """

    def __init__(self, config: Config, service: MultiService, site: StreamingSite,
                 host_body_limit: int) -> None:
        self.config = config
        self.service = service
        self.site = site
        self.resource: Resource = site.resource
        self.upload_policy = site.body_policy
        self.host_body_limit = host_body_limit

    @property
    def prefix(self) -> str:
        """The URL path of the upload tree, without slashes (``UploadSubDir``)."""
        return self.config.upload_subdir

    def mount(self, root: Resource) -> None:
        """
        Put the upload resource at ``/<UploadSubDir>`` in the host's tree,
        creating plain intermediate resources for a multi-segment prefix.
        """
        segments = _prefix_segments(self.prefix)
        parent = root
        for segment in segments[:-1]:
            child = parent.getStaticEntity(segment)
            if child is None:
                child = Resource()
                parent.putChild(segment, child)
            parent = child
        parent.putChild(segments[-1], self.resource)

    def _policy(self) -> HostBodyPolicy:
        return HostBodyPolicy(self.upload_policy, self.prefix, self.host_body_limit)

    def site_for(self, root: Resource) -> StreamingSite:
        """
        Mount the upload tree into ``root`` and return the Site that serves
        ``root`` with hmacfs's streaming channel.  Listen with it as with any
        Site; only one host root per ``EmbeddedUpload``.
        """
        self.mount(root)
        self.site.resource = _RejectionGate(root, self.resource)
        self.site.body_policy = self._policy()
        return self.site

    def install(self, site: server.Site) -> server.Site:
        """
        Upgrade a host's existing ``Site`` in place: mount the upload tree into
        ``site.resource`` and give the Site hmacfs's channel, request, body
        policy and header-time checks.  Raises ``TypeError`` if the Site uses
        a request factory of its own (it would spool uploads).
        """
        factory = site.requestFactory
        if not (factory is server.Request or issubclass(factory, StreamingRequest)):
            raise TypeError(
                f"the Site's requestFactory {factory!r} is not twisted.web.server.Request; "
                "use site_for() and serve the host's pages through hmacfs's Site instead"
            )
        root = site.resource
        self.mount(root)
        site.resource = _RejectionGate(root, self.resource)
        # Narrower than Site's types: StreamingRequest takes (channel, queued) only, not **kw.
        site.requestFactory = StreamingRequest  # type: ignore[assignment]
        site.protocol = StreamingChannel  # type: ignore[assignment]
        site.body_policy = self._policy()  # type: ignore[attr-defined]
        site.admission_checks = self.site.admission_checks  # type: ignore[attr-defined]
        site.read_size = self.site.read_size  # type: ignore[attr-defined]
        # The channel's HeaderTimeout and MaxConnectionsPerClient, counted apart.
        site.connection_limits = self.site.connection_limits  # type: ignore[attr-defined]
        site.connections_by_client = ConnectionTable()  # type: ignore[attr-defined]
        site.metrics = self.site.metrics  # type: ignore[attr-defined]
        # The drain on stop watches hmacfs's own Site; point it at this one.
        self.site.body_policy = site.body_policy  # type: ignore[attr-defined]
        return site


def embed(
    config: Config | None = None,
    *,
    reactor: Any = None,
    handle_sighup: bool = True,
    host_body_limit: int = DEFAULT_HOST_BODY_LIMIT,
    **settings: Any,
) -> EmbeddedUpload:
    """
    Build hmacfs for a host application, from a ``Config`` (for example
    from ``hmacfs.config.load_config``) or from keyword arguments: the
    ``Config`` attribute names with final values, ``store_dir`` and
    ``secret`` required (``embed(store_dir=Path("data"), secret=b"...",
    max_upload_size=2**30)``).  ``UploadSubDir`` must not be empty: the host
    owns the other paths.

    Nothing is started: make ``.service`` a child of the host's service tree
    and serve ``.site_for(root)`` (or ``.install(site)``).
    """
    if config is None:
        try:
            store_dir, secret = settings.pop("store_dir"), settings.pop("secret")
        except KeyError as missing:
            raise TypeError(f"embed() needs a config or {missing.args[0]}=") from None
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        config = default_config(Path(store_dir).resolve(), secret, **settings)
    elif settings:
        raise TypeError("pass either a config or settings, not both")
    if not config.upload_subdir:
        raise ValueError('UploadSubDir is "": an embedded upload tree needs its own path prefix')
    # Single process whatever NumCores says: the host application is the process
    # (and owns its allocator and prometheus-client: nothing process-wide is set).
    tree = assemble(config, reactor, config_path=None)
    assert isinstance(tree, ServerTree)
    if tree.listener is not None:
        tree.service.removeService(tree.listener)  # the host listens, with the Site we return
    if not handle_sighup:
        tree.service.removeService(tree.reload)
    return EmbeddedUpload(config, tree.service, tree.site, host_body_limit)
