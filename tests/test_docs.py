"""README.rst stays valid reStructuredText and documents every configuration key."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from hmacfs.config import KNOWN_KEYS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"


class ReadmeTests(SynchronousTestCase):
    def test_valid_rst(self) -> None:
        """docutils parses the README without a warning (a broken table hides its rows)."""
        from docutils.core import publish_doctree

        messages: list[str] = []

        class Collect:
            def write(self, text: str) -> None:
                messages.append(text)

        publish_doctree(
            README.read_text(),
            settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": Collect()},
        )
        self.assertEqual("".join(messages), "")

    def test_every_key_documented(self) -> None:
        """Each configuration key the server accepts appears in the README."""
        text = README.read_text()
        missing = [key for key in KNOWN_KEYS if f"``{key}``" not in text]
        self.assertEqual(missing, [])

    def test_two_commands_first(self) -> None:
        """The README shows `make run` and `make test` before anything else."""
        text = README.read_text()
        first_block = text[: text.index("How an upload works")]
        self.assertIn("make run", first_block)
        self.assertIn("make test", first_block)

    def test_layout_lists_every_module(self) -> None:
        """README's layout section names every module of hmacfs/, and none that is gone."""
        text = README.read_text()
        start = text.index("\nLayout\n======")
        block = text[start : text.index("\nOnly ``hmacfs/http/channel.py``", start)]
        listed: set[str] = set()
        folder = ""
        for line in block.splitlines():
            entry = line.strip().split("  ")[0].strip()
            if not entry.endswith((".py", "/")) or not line.startswith("    "):
                continue
            names = [name.strip() for name in entry.split(",")]
            if names[0].startswith("hmacfs/"):
                head = names[0]
                folder = head if head.endswith("/") else head.rpartition("/")[0] + "/"
                names = [head.rpartition("/")[2] if not head.endswith("/") else ""] + names[1:]
            elif not line.startswith("        "):
                continue
            listed.update(folder + name for name in names if name.endswith(".py"))
        package = ROOT / "hmacfs"
        modules = {
            "hmacfs/" + path.relative_to(package).as_posix()
            for path in package.rglob("*.py")
            if path.name != "__init__.py"
        }
        self.assertEqual(sorted(modules - listed), [], "modules README's layout does not list")
        self.assertEqual(sorted(listed - modules), [], "README lists modules that do not exist")

    def test_sighup_keys_match_reload(self) -> None:
        """The SIGHUP section lists exactly the keys hmacfs.service.reload applies."""
        import re

        from hmacfs.service.reload import APPLIED_ON_RELOAD

        text = README.read_text()
        section = text[text.index("SIGHUP (``systemctl reload``") : text.index("every other key takes effect")]
        named = {key for key in re.findall(r"``([A-Za-z]+)``", section) if key in KNOWN_KEYS}
        self.assertEqual(named, set(APPLIED_ON_RELOAD))
