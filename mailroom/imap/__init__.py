"""IMAP4rev1 + IMAP4rev2: the wire format, the command parser, the session core and the server.

``wire``, ``parser``, ``search`` and ``session`` are sans-IO: they import no asyncio, socket,
sqlite3 or dns (a test checks). ``server`` is the thin asyncio layer around ``session``.
"""
