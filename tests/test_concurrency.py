"""One mailbox, everyone at once: deliveries, two IMAP clients and a POP3 session in parallel.

Whatever the interleaving: no message lost, none duplicated, no UID given twice, and exactly
the messages that were expunged (IMAP) or deleted (POP3) are gone.
"""

from __future__ import annotations

import imaplib
import poplib
import random
import re
import ssl
import threading
import time

from tests.conftest import PASSWORD, Certificate, MailEnv, Server
from tests.test_imap_clients import ALICE, deliver

COUNT = 80
_ID = re.compile(rb"Message-ID: <(\d+)@load.test>", re.I)


def _message(i: int) -> bytes:
    return f"From: load@load.test\r\nSubject: m{i}\r\nMessage-ID: <{i}@load.test>\r\n\r\nbody {i}\r\n".encode()


def _ids(data: list[object]) -> list[int]:
    found = []
    for part in data:
        if isinstance(part, tuple):
            match = _ID.search(part[1])
            if match:
                found.append(int(match.group(1)))
    return found


def test_deliveries_imap_and_pop3_together(mail_env: MailEnv, certificate: Certificate) -> None:
    imapd = Server(mail_env, "mailroom-imapd", ("imap", "imaps"))
    pop3d = Server(mail_env, "mailroom-pop3d", ("pop3", "pop3s"))
    context = ssl.create_default_context(cafile=str(certificate[0]))
    context.check_hostname = False
    removed: set[int] = set()
    lock = threading.Lock()
    errors: list[BaseException] = []
    delivering = threading.Event()
    delivering.set()

    def deliverer() -> None:
        for i in range(COUNT):
            deliver(mail_env, ALICE, _message(i))
            time.sleep(0.005)
        delivering.clear()

    def imap_client(seed: int) -> None:
        rng = random.Random(seed)
        client = imaplib.IMAP4_SSL("127.0.0.1", imapd.ports["imaps"], ssl_context=context)
        client.login(ALICE, PASSWORD)
        while delivering.is_set():
            client.select("INBOX")
            typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            uids = [
                int(m.group(1))
                for m in re.finditer(
                    rb"UID (\d+)", b" ".join(p[0] for p in data if isinstance(p, tuple))
                )
            ]
            if not uids:
                continue
            chosen = rng.sample(uids, min(2, len(uids)))
            client.uid("STORE", ",".join(map(str, chosen)), "+FLAGS", "(\\Seen)")
            victim = rng.choice(uids)
            typ, data = client.uid("FETCH", str(victim), "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            ids = _ids(data)
            client.uid("STORE", str(victim), "+FLAGS", "(\\Deleted)")
            typ, _ = client.uid("EXPUNGE", str(victim))
            if typ == "OK" and ids:
                with lock:
                    removed.add(ids[0])
        client.logout()

    def pop3_client() -> None:
        time.sleep(0.2)
        client = poplib.POP3_SSL("127.0.0.1", pop3d.ports["pop3s"], context=context)
        client.user(ALICE)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        deleted = []
        for n in range(1, count + 1, 3):
            try:
                lines = client.retr(n)[1]
            except poplib.error_proto:
                continue  # RFC 1939: a message IMAP expunged meanwhile may be gone
            match = _ID.search(b"\r\n".join(lines))
            if match:
                client.dele(n)
                deleted.append(int(match.group(1)))
        client.quit()
        with lock:
            removed.update(deleted)

    def guard(target: object, *args: object) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)  # type: ignore[operator]
            except BaseException as err:
                errors.append(err)

        return threading.Thread(target=run)

    threads = [guard(deliverer), guard(imap_client, 1), guard(imap_client, 2), guard(pop3_client)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        client = imaplib.IMAP4_SSL("127.0.0.1", imapd.ports["imaps"], ssl_context=context)
        client.login(ALICE, PASSWORD)
        client.select("INBOX")
        typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        uids = re.findall(rb"UID (\d+)", b" ".join(p[0] for p in data if isinstance(p, tuple)))
        seen = _ids(data)
        client.logout()
    finally:
        imapd.stop()
        pop3d.stop()
    assert len(uids) == len(set(uids)), "a UID was given twice"
    assert len(seen) == len(set(seen)), "a message appears twice"
    assert set(seen) == set(range(COUNT)) - removed
    on_disk = {
        int(m.group(1))
        for sub in ("new", "cur")
        for p in (mail_env.mailbox(ALICE) / sub).iterdir()
        if (m := _ID.search(p.read_bytes().replace(b"\n", b"\r\n")))
    }
    assert on_disk == set(seen)
    assert removed, "nothing was removed: the test did not test removal"
