"""
The package's folders are layers, and imports go one way.

The rules are data (``LAYERS``, ``NO_TWISTED_WEB``, ``FORBIDDEN``); the test
walks the AST of every module under ``hmacfs/`` (imports inside functions
and ``TYPE_CHECKING`` blocks included) and names each import that breaks
them.  Twisted internals have their own test (tests/test_twisted_internals.py):
only ``hmacfs/http/channel.py`` and ``hmacfs/http/sendfile.py`` may use them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "hmacfs"

#: Each layer (a folder, or a top-level module) and the hmacfs layers it may import.
#: A layer may always import its own modules.
FOUNDATION = {"hmacfs.errors", "hmacfs.logs", "hmacfs.periodic"}
LAYERS: dict[str, set[str]] = {
    # shared by every layer: the one refusal type, the log router, the periodic-job timer
    "hmacfs.errors": set(),
    "hmacfs.logs": set(),
    "hmacfs.periodic": {"hmacfs.logs"},
    # leaves
    "hmacfs.signing": FOUNDATION,
    "hmacfs.config": FOUNDATION,
    "hmacfs.state": FOUNDATION | {"hmacfs.signing"},
    "hmacfs.storage": FOUNDATION | {"hmacfs.signing", "hmacfs.storage.interface"},
    # what callers use of a store: backends build on it, so it imports none of them
    "hmacfs.storage.interface": FOUNDATION,
    # the S3 backend: an HTTP *client* (see NO_TWISTED_WEB) and the IStore built on it;
    # of the rest of storage it sees only the interface (no filesystem code)
    "hmacfs.storage.s3": FOUNDATION | {"hmacfs.storage.interface"},
    # the upload protocols: they implement the channel's IBodyPolicy/IBodyConsumer
    "hmacfs.upload": FOUNDATION
    | {"hmacfs.signing", "hmacfs.state", "hmacfs.storage", "hmacfs.http.channel"},
    # HTTP: the channel, the resources, downloads
    "hmacfs.http": FOUNDATION
    | {"hmacfs.signing", "hmacfs.state", "hmacfs.storage", "hmacfs.upload", "hmacfs.config"},
    "hmacfs.xmpp": FOUNDATION | {"hmacfs.signing", "hmacfs.config"},
    # assembly and operations: anything below it
    "hmacfs.service": FOUNDATION
    | {"hmacfs.signing", "hmacfs.config", "hmacfs.state", "hmacfs.storage", "hmacfs.upload",
       "hmacfs.http", "hmacfs.xmpp"},
    # the public embedding API assembles like the service does
    "hmacfs.embed": FOUNDATION
    | {"hmacfs.signing", "hmacfs.config", "hmacfs.state", "hmacfs.storage", "hmacfs.upload",
       "hmacfs.http", "hmacfs.service"},
    # the upload client stands alone (it runs where hmacfs is not installed)
    "hmacfs.client": set(),
    # test helpers may reach everything; the daemon never imports them
    "hmacfs.testing": {"*"},
    "hmacfs": set(),
}

#: Layers that must not import twisted.web at all (they are used without HTTP).
NO_TWISTED_WEB = {
    "hmacfs.errors", "hmacfs.logs", "hmacfs.periodic", "hmacfs.signing", "hmacfs.config", "hmacfs.state",
    "hmacfs.storage", "hmacfs.storage.interface",
}
#: Layers that talk HTTP to another server: they may use twisted.web's client side only (S3
#: is reached through twisted.web.client.Agent), never the server side.
WEB_CLIENT_ONLY = {"hmacfs.storage.s3"}
WEB_CLIENT_MODULES = ("twisted.web.client", "twisted.web.iweb", "twisted.web.http_headers")

#: Imports refused outright: test fakes in production code.
FORBIDDEN = {"twisted.internet.testing", "twisted.trial"}
MAY_IMPORT_TEST_FAKES = {"hmacfs.testing"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The most specific layer a module belongs to (``hmacfs.http.resource`` -> ``hmacfs.http``)."""
    candidates = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return max(candidates, key=len)


def imports(path: Path, here: str | None = None) -> list[tuple[int, str]]:
    """Every module imported by ``path`` (absolute names), with the line."""
    tree = ast.parse(path.read_text(), str(path))
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # ``from hmacfs import tus`` imports the module hmacfs.tus
            submodules = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")]
            found.extend((node.lineno, name) for name in submodules or [target])
    return found


def is_module(name: str) -> bool:
    """Whether ``name`` is an hmacfs module or package (not a name inside one)."""
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").exists() or (
        PACKAGE.parent / relative / "__init__.py"
    ).exists()


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += file_violations(path, module_name(path))
    return found


def file_violations(path: Path, here: str) -> list[str]:
    """What breaks the rules in ``path``, read as the module ``here`` (it may lie elsewhere)."""
    found = []
    layer = layer_of(here)
    allowed = LAYERS[layer]
    shown = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path
    for line, target in imports(path, here):
        where = f"{shown}:{line}"
        root = target.split(".")[0]
        if root == "twisted":
            is_web = target == "twisted.web" or target.startswith("twisted.web.")
            if layer in NO_TWISTED_WEB and is_web:
                found.append(f"{where}: {layer} must not import twisted.web ({target})")
            if layer in WEB_CLIENT_ONLY and is_web and target not in WEB_CLIENT_MODULES:
                found.append(f"{where}: {layer} may use twisted.web's client only ({target})")
            if layer not in MAY_IMPORT_TEST_FAKES and any(
                target == bad or target.startswith(bad + ".") for bad in FORBIDDEN
            ):
                found.append(f"{where}: a test fake in production code ({target})")
            continue
        if root != "hmacfs" or target == "hmacfs" or not is_module(target):
            continue
        other = layer_of(target)
        if other == layer or "*" in allowed:
            continue
        if not any(target == a or target.startswith(a + ".") or other == a for a in allowed):
            found.append(f"{where}: {layer} may not import {target} (layer {other})")
    return found


class LayerTests(SynchronousTestCase):
    def test_every_module_has_a_layer(self) -> None:
        """Each module under hmacfs/ falls in a layer the rules name (a new folder needs a rule)."""
        for path in PACKAGE.rglob("*.py"):
            here = module_name(path)
            self.assertIn(layer_of(here), LAYERS, here)
            if "/" in path.relative_to(PACKAGE).as_posix():
                self.assertNotEqual(layer_of(here), "hmacfs", f"{here}: its folder needs a rule")

    def test_imports_follow_the_layers(self) -> None:
        self.assertEqual(violations(), [])

    def test_the_rules_catch_a_bad_import(self) -> None:
        """The walker sees imports in functions, relative imports and ``from hmacfs import x``."""
        sample = PACKAGE / "signing" / "_layer_probe.py"
        sample.write_text(
            "def f():\n"
            "    from hmacfs.http import resource\n"
            "    from ..service import tap\n"
            "    from hmacfs import embed\n"
            "    import twisted.web.server\n"
        )
        self.addCleanup(sample.unlink)
        problems = [p for p in violations() if "_layer_probe" in p]
        self.assertEqual(len(problems), 4, problems)
        self.assertIn("hmacfs.signing may not import hmacfs.http.resource", problems[0])
        self.assertIn("hmacfs.service.tap", problems[1])
        self.assertIn("hmacfs.embed", problems[2])
        self.assertIn("must not import twisted.web", problems[3])

    def test_s3_client_uses_the_web_client_only(self) -> None:
        """hmacfs.storage.s3 may use Agent and friends, never twisted.web's server side."""
        # read as a module of hmacfs.storage.s3 from outside the tree, so that no other test
        # walking the package (in a parallel trial worker) sees it
        sample = Path(self.mktemp())
        sample.write_text(
            "from twisted.web.client import Agent\n"
            "from twisted.web.server import Site\n"
            "from twisted.web import resource\n"
            "from hmacfs.storage import filesystem\n"
        )
        problems = file_violations(sample, "hmacfs.storage.s3._probe")
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("may use twisted.web's client only (twisted.web.server)", problems[0])
        self.assertIn("twisted.web", problems[1])
        self.assertIn("hmacfs.storage.s3 may not import hmacfs.storage.filesystem", problems[2])
