"""MIME structure of one message for IMAP: ENVELOPE, BODYSTRUCTURE, body sections, BINARY.

(Being written: only the section address type is here yet.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Section:
    """A body section address of FETCH BODY[...] / BINARY[...] (RFC 9051 6.4.5).

    ``part`` is the part number path (``()`` for the whole message, ``(1, 2)`` for ``1.2``);
    ``text`` is ``""``, ``"HEADER"``, ``"HEADER.FIELDS"``, ``"HEADER.FIELDS.NOT"``, ``"TEXT"``
    or ``"MIME"``; ``fields`` are the upper-cased field names of HEADER.FIELDS(.NOT).
    """

    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()
