"""
Measures the memory of streaming through hmacfs.storage.s3: one PutObject of SIZE bytes
written in 64 KiB chunks, then one GetObject of it into a consumer that only hashes.
Prints baseline_rss_kib (after start-up), peak_rss_kib (VmHWM) and identical=True|False.

usage: python tests/s3_stream_rss.py ENDPOINT ACCESS_KEY SECRET_KEY BUCKET SIZE
(run by tests.test_s3_client.S3ClientTests.test_streaming_memory)
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IConsumer, IProducer
from zope.interface import implementer

from hmacfs.storage.s3.client import S3Client
from hmacfs.storage.s3.settings import S3Settings

reactor: Any = _reactor
CHUNK = 64 * 1024


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@implementer(IConsumer)
class HashingConsumer:
    """Hashes what it is given and pauses its producer now and then, as a slow client would."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.producer: Any = None
        self.count = 0

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += 1
        if self.count % 64 == 0 and self.producer is not None:
            producer = self.producer
            producer.pauseProducing()
            reactor.callLater(0.001, producer.resumeProducing)


async def main(endpoint: str, access: str, secret: str, bucket: str, size: int) -> bool:
    settings = S3Settings(
        bucket=bucket, access_key=access, secret_key=secret, endpoint=endpoint,
        addressing_style="path", request_timeout=120,
    )
    client = S3Client(settings, reactor)
    await client.head_bucket()
    print(f"baseline_rss_kib={status('VmRSS')}")
    block = hashlib.sha256(b"rss").digest() * (CHUNK // 32)
    sent = hashlib.sha256()
    upload = client.put_object("rss/big", size)
    offset = 0
    while offset < size:
        chunk = (offset.to_bytes(8, "big") + block)[: min(CHUNK, size - offset)]
        sent.update(chunk)
        await upload.write(chunk)
        offset += len(chunk)
    await upload.finish()
    download = await client.get_object("rss/big")
    consumer = HashingConsumer()
    await download.deliver(consumer)
    await client.delete_object("rss/big")
    await client.close()
    return consumer.digest.digest() == sent.digest()


def run() -> None:
    endpoint, access, secret, bucket, size = sys.argv[1:6]
    result: list[Any] = []

    def done(outcome: Any) -> None:
        result.append(outcome)
        reactor.stop()

    ensureDeferred(main(endpoint, access, secret, bucket, int(size))).addBoth(done)
    reactor.run()
    if not isinstance(result[0], bool):
        result[0].raiseException()
    print(f"peak_rss_kib={status('VmHWM')}")
    print(f"identical={result[0]}")


if __name__ == "__main__":
    run()
