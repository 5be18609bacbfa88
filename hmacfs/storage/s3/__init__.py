# -*- test-case-name: tests.test_s3_units,tests.test_s3_client -*-
"""
The S3 protocol layer under the S3 store: a Twisted S3 client.

Importing this package (settings, errors, the metrics observer) does not import botocore;
only ``hmacfs.storage.s3.client`` and ``hmacfs.storage.s3.protocol`` do, so a daemon whose
``StorageBackend`` is the filesystem never pays botocore's import time or memory.
"""
