"""hmacfs: a streaming XEP-0363 HTTP upload server for XMPP, built on Twisted."""

__version__ = "0.1.0"
