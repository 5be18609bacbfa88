# -*- test-case-name: tests.test_tap -*-
"""twistd plugin: names where hmacfs lives so `twistd --help` stays fast."""

from twisted.application.service import ServiceMaker

hmacfs = ServiceMaker("hmacfs", "hmacfs.service.tap", "XEP-0363 HTTP upload server (HMAC-signed URLs)", "hmacfs")
