"""README.rst stays valid reStructuredText and documents every configuration key."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from hmacfs.config import KNOWN_KEYS

README = Path(__file__).resolve().parent.parent / "README.rst"


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

    def test_sighup_keys_match_reload(self) -> None:
        """The SIGHUP section lists exactly the keys hmacfs.service.reload applies."""
        import re

        from hmacfs.service.reload import APPLIED_ON_RELOAD

        text = README.read_text()
        section = text[text.index("SIGHUP (``systemctl reload``") : text.index("every other key takes effect")]
        named = {key for key in re.findall(r"``([A-Za-z]+)``", section) if key in KNOWN_KEYS}
        self.assertEqual(named, set(APPLIED_ON_RELOAD))
