"""POP3 (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 SASL): the session core and its server.

``session`` is sans-IO: it imports no asyncio, socket, sqlite3 or dns (a test checks).
``maildrop`` is one user's INBOX as POP3 sees it (the session lock, the snapshot, removal),
on the mail store. ``server`` is the thin asyncio layer around ``session``.
"""
