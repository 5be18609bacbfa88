"""
The pause arbiter (hmacfs.http.pauses) alone, on a fake transport: the
transport is paused on the first reason and resumed only when the last one
is released, whatever the order; the channel's own use is in tests.test_request.
"""

from __future__ import annotations

import itertools

from twisted.trial.unittest import SynchronousTestCase

from hmacfs.http.pauses import ADMISSION, DISCARD, DISK, TWISTED, PauseArbiter

REASONS = (DISK, ADMISSION, TWISTED, DISCARD)


class FakeTransport:
    """Counts the calls a producer gets, and whether it is paused now."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def paused(self) -> bool:
        return bool(self.calls) and self.calls[-1] == "pause"

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.calls.append(f"register {streaming}")

    def unregisterProducer(self) -> None:
        self.calls.append("unregister")


class PauseArbiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.transport = FakeTransport()
        self.arbiter = PauseArbiter(self.transport)

    def test_every_pair_of_reasons(self) -> None:
        """For each two reasons, in either release order: one pause, one resume, after both."""
        cases = 0
        for first, second in itertools.permutations(REASONS, 2):
            for release in ((first, second), (second, first)):
                transport = FakeTransport()
                arbiter = PauseArbiter(transport)
                arbiter.pause(first)
                arbiter.pause(second)
                self.assertEqual(transport.calls, ["pause"], (first, second))
                self.assertEqual(arbiter.reasons, {first, second})
                arbiter.resume(release[0])
                self.assertEqual(transport.calls, ["pause"], (first, second, release))
                self.assertEqual(arbiter.reasons, {release[1]})
                arbiter.resume(release[1])
                self.assertEqual(transport.calls, ["pause", "resume"], (first, second, release))
                self.assertEqual(arbiter.reasons, frozenset())
                cases += 1
        self.assertEqual(cases, 24)

    def test_repeated_pause_is_one_reason(self) -> None:
        """Pausing twice for one reason needs one resume, and pauses the transport once."""
        self.arbiter.pause(TWISTED)
        self.arbiter.pause(TWISTED)
        self.arbiter.resume(TWISTED)
        self.assertEqual(self.transport.calls, ["pause", "resume"])

    def test_resume_without_pause_does_nothing(self) -> None:
        """Releasing a reason nobody holds never resumes the transport."""
        self.arbiter.resume(DISK)
        self.arbiter.pause(ADMISSION)
        self.arbiter.resume(DISK)
        self.assertEqual(self.transport.calls, ["pause"])
        self.assertTrue(self.transport.paused)

    def test_reasons_is_a_snapshot(self) -> None:
        self.arbiter.pause(DISK)
        reasons = self.arbiter.reasons
        self.arbiter.resume(DISK)
        self.assertEqual(reasons, {DISK})
        self.assertIsInstance(reasons, frozenset)

    def test_stop_resumes_and_ignores_later_pauses(self) -> None:
        """After stop (the linger) the transport reads, whatever held it or asks again."""
        self.arbiter.pause(DISK)
        self.arbiter.pause(TWISTED)
        self.arbiter.stop()
        self.assertEqual(self.transport.calls, ["pause", "resume"])
        self.assertEqual(self.arbiter.reasons, frozenset())
        self.arbiter.pause(DISCARD)
        self.arbiter.resume(DISK)
        self.assertEqual(self.transport.calls, ["pause", "resume"])

    def test_stop_while_reading_does_not_resume(self) -> None:
        self.arbiter.stop()
        self.assertEqual(self.transport.calls, [])

    def test_unconnected_ignores_everything(self) -> None:
        """With no transport (before the connection) nothing is held and nothing raises."""
        arbiter = PauseArbiter(None)
        arbiter.pause(DISK)
        arbiter.resume(DISK)
        arbiter.stop()
        self.assertEqual(arbiter.reasons, frozenset())


class TwistedReasonTests(SynchronousTestCase):
    """The arbiter stands for the transport as HTTPChannel's _networkProducer."""

    def test_pause_and_resume_are_the_twisted_reason(self) -> None:
        """Twisted's own pause joins the other reasons instead of acting on the transport."""
        transport = FakeTransport()
        arbiter = PauseArbiter(transport)
        arbiter.pause(DISK)
        arbiter.pauseProducing()
        self.assertEqual(arbiter.reasons, {DISK, TWISTED})
        arbiter.resumeProducing()
        self.assertEqual(transport.calls, ["pause"])
        arbiter.resume(DISK)
        self.assertEqual(transport.calls, ["pause", "resume"])

    def test_rest_goes_to_the_transport(self) -> None:
        transport = FakeTransport()
        arbiter = PauseArbiter(transport)
        arbiter.registerProducer(object(), True)
        arbiter.unregisterProducer()
        arbiter.stopProducing()
        self.assertEqual(transport.calls, ["register True", "unregister", "stop"])
