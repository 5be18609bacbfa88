# -*- test-case-name: tests.test_cli -*-
"""
The ``hmacfs`` command: sign URLs, check a configuration, make a demo setup.

One argparse entry point with subcommands; later features add theirs here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import secrets
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from hmacfs.config import Config, ConfigError, load_config
from hmacfs.signing.auth import sign_slot

DEMO_FILE = "example-upload.txt"
DEMO_BODY = b"Hello from hmacfs! This file was uploaded with a signed PUT URL.\n"


def _load(path: str) -> Config:
    try:
        config, warnings = load_config(path)
    except ConfigError as error:
        sys.stderr.write(f"hmacfs: {path}: {error}\n")
        raise SystemExit(1) from None
    for warning in warnings:
        sys.stderr.write(f"hmacfs: {path}: warning: {warning}\n")
    return config


def listens_on_tcp(config: Config) -> bool:
    """False for a UNIX socket or a systemd socket: no URL can be guessed from ListenPort."""
    raw = config.listen_raw
    return not config.unix_socket and not raw.startswith(("unix:", "systemd:", "/"))


def default_base_url(config: Config) -> str:
    """
    http://HOST:PORT/<UploadSubDir> guessed from ListenPort (for local testing).

    For a UNIX or systemd socket it is http://localhost/<UploadSubDir>, which
    is what ``curl --unix-socket PATH`` wants.
    """
    raw = config.listen_raw
    host, port = "127.0.0.1", "8080"
    if not listens_on_tcp(config):
        host, port = "localhost", ""
    elif raw.startswith(("tcp:", "tcp6:")):
        for part in raw.split(":")[1:]:
            if part.startswith("port="):
                port = part[5:]
            elif part.isdigit():
                port = part
    else:
        head, _, port = raw.rpartition(":")
        if head and head not in ("0.0.0.0", "::", "[::]"):
            host = head
    prefix = f"/{config.upload_subdir}" if config.upload_subdir else ""
    authority = f"{host}:{port}" if port else host
    return f"http://{authority}{prefix}"


#: Prosody's name for the v scheme (http_upload_external_protocol = "v1").
PROTOCOL_ALIASES = {"v1": "v"}


def _size(text: str) -> int:
    """A decimal byte count >= 0, as the XMPP server puts it in the MAC."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (digits only)")
    return int(text)


def cmd_sign(args: argparse.Namespace) -> int:
    """Print the PUT and GET URLs an XMPP server would hand out for PATH and SIZE."""
    config = _load(args.config)
    scheme = PROTOCOL_ALIASES.get(args.protocol, args.protocol)
    expires = None
    if scheme == "v3":
        expires = int(time.time()) + args.expires
    try:
        slot = sign_slot(
            base_url=args.base_url or default_base_url(config),
            path=args.path,
            size=args.size,
            secret=config.secret,
            scheme=scheme,
            content_type=args.type,
            style=args.style,
            expires=expires,
        )
    except ValueError as error:
        sys.stderr.write(f"hmacfs: {error}\n")
        return 1
    if args.base_url is None and not listens_on_tcp(config):
        sys.stderr.write(
            "hmacfs: ListenPort is not a TCP port, so these URLs are for "
            "`curl --unix-socket PATH`; pass --base-url https://HOST/"
            f"{config.upload_subdir} for the URLs your clients use\n"
        )
    print(f"PUT {slot.put_url}")
    print(f"GET {slot.get_url}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate without side effects: a missing StoreDir is checked, not created."""
    try:
        config, warnings = load_config(args.file, create_store_dir=False)
    except ConfigError as error:
        print(f"{args.file}: error: {error}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"{args.file}: warning: {warning}", file=sys.stderr)
    print(json.dumps(config.redacted(), indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Write a local config (first time only) and print a signed example upload."""
    path = Path(args.config)
    if not path.exists():
        path.write_text(
            "# Written by `make run`: a local demo configuration (see packaging/config.toml).\n"
            'ListenPort = "127.0.0.1:8080"\n'
            f'Secret = "{secrets.token_urlsafe(32)}"\n'
            'StoreDir = "./data"\n'
            'UploadSubDir = "upload"\n'
            'LogLevel = "info"\n'
            "MaxUploadSize = \"1GiB\"\n"
        )
        path.chmod(0o600)
    config = _load(str(path))
    Path(DEMO_FILE).write_bytes(DEMO_BODY)
    slot = sign_slot(
        base_url=default_base_url(config),
        path=f"{uuid.uuid4()}/{DEMO_FILE}",
        size=len(DEMO_BODY),
        secret=config.secret,
        scheme="v2",
        content_type="text/plain",
    )
    print("hmacfs is starting on", default_base_url(config), "(Ctrl-C stops it)")
    print("Example upload URL (Prosody v2 scheme, valid for this one file):")
    print(f"  {slot.put_url}")
    print("Upload it, then download it:")
    print(f"  curl -sS -T {DEMO_FILE} -H 'Content-Type: text/plain' '{slot.put_url}'")
    print(f"  curl -sS '{slot.get_url}'")
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("hmacfs")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def cmd_unban(args: argparse.Namespace) -> int:
    """Lift a block: in Redis (every node) and through the store (every local process)."""
    import ipaddress

    from hmacfs.state.bans import request_unban

    config = _load(args.config)
    try:
        address = str(ipaddress.ip_address(args.address))
    except ValueError:
        print(f"hmacfs unban: {args.address!r} is not an IP address", file=sys.stderr)
        return 1
    request_unban(config.store_dir, address)
    print(f"unban of {address} requested for every process using {config.store_dir}")
    if config.redis_addr:
        removed = _unban_in_redis(config, address, args.timeout)
        if removed is None:
            print("hmacfs unban: Redis was not reachable; the block stays on other nodes", file=sys.stderr)
            return 1
        print(f"{'removed' if removed else 'no'} shared block of {address} in Redis")
    return 0


def _unban_in_redis(config: Config, address: str, timeout: float) -> bool | None:
    """Lift the shared block through the state layer's connection; None: Redis unreachable."""
    from twisted.internet.defer import Deferred

    from hmacfs.state.bans import unban_shared
    from hmacfs.state.store import StateService

    outcome: list[bool | None] = [None]

    async def run(reactor: object) -> None:
        service = StateService(
            reactor,
            redis_addr=config.redis_addr,
            redis_password=config.redis_password,
            redis_db=config.redis_db,
        )
        service.startService()
        try:
            if await service.connected_within(timeout):
                lifted = unban_shared(service.bans, address)
                if lifted is not None:
                    outcome[0] = await lifted
        finally:
            await service.stopService()

    from twisted.internet import reactor

    failures: list[object] = []
    done = Deferred.fromCoroutine(run(reactor))
    done.addErrback(failures.append)
    done.addBoth(lambda _: reactor.stop())
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]  # not in IReactorCore
    if failures:
        print(f"hmacfs unban: {failures[0].getErrorMessage()}", file=sys.stderr)  # type: ignore[attr-defined]
        return None
    return outcome[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmacfs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hmacfs {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    sign = sub.add_parser("sign", help="print PUT and GET URLs as an XMPP server would sign them")
    sign.add_argument("--config", required=True)
    sign.add_argument(
        "--protocol", choices=["v", "v1", "v2", "token", "v3"], default="v",
        help="v (= Prosody's v1, and ejabberd), v2, token (Metronome) or v3 (default: v)",
    )
    sign.add_argument(
        "--type", default=None,
        help="Content-Type bound by v2/token (default: application/octet-stream)",
    )
    sign.add_argument("--expires", type=int, default=300, help="v3: seconds from now")
    sign.add_argument("--style", choices=["prosody", "ejabberd"], default="prosody")
    sign.add_argument("--base-url", default=None, help="default: from ListenPort and UploadSubDir")
    sign.add_argument("path", help="slot path, e.g. <uuid>/<filename>")
    sign.add_argument("size", type=_size, help="the exact Content-Length of the PUT")
    sign.set_defaults(func=cmd_sign)

    check = sub.add_parser("check-config", help="validate a config file and print it (secret redacted)")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser("demo", help="write a local config and print a signed example upload")
    demo.add_argument("--config", default="config.local.toml")
    demo.set_defaults(func=cmd_demo)

    unban = sub.add_parser("unban", help="lift the block of a client address (all processes, all nodes)")
    unban.add_argument("--config", required=True)
    unban.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Redis")
    unban.add_argument("address")
    unban.set_defaults(func=cmd_unban)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
