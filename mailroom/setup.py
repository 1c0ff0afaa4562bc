"""The first-run wizard behind ``mailroomctl setup``: config, directories, domain and first
user, DKIM keys, a self-signed certificate, the DNS records to publish, and a check.

What this module owns: the order of the steps and what each one leaves behind. What it
promises: every step first looks at what is there and does nothing when it is done already
(a second run changes no file, not even its mtime); an existing password is never changed
unless the caller passes ``new_password=True``; the config file keeps every other key and
comment, and is replaced crash-safe (tmp, fsync, rename, fsync dir). Errors are
``MailroomError``s whose message is one line.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailroom import dkim
from mailroom.accounts import Accounts
from mailroom.addresses import normalise_domain, parse_address
from mailroom.config import Settings, load_settings
from mailroom.errors import InvalidNameError, MailroomError
from mailroom.maildir import fsync_dir, write_file

DEFAULT_DATA_DIR = Path("/var/lib/mailroom")
PLACEHOLDER_HOSTNAME = "mail.example.org"  # what packaging/config.toml ships
SERVICE_GROUP = "mailroom"
SERVICE_USER = "mailroom"
CONFIG_MODE = 0o640
DATA_DIR_MODE = 0o750
SUBDIR_MODE = 0o700
SUBDIRS = ("mail", "queue", "dkim", "tls")
CERT_DAYS = 825
#: Ports the services listen on in production (design.md), checked on localhost.
PORTS = (
    (25, "smtp"),
    (587, "submission"),
    (465, "submissions"),
    (143, "imap"),
    (993, "imaps"),
    (110, "pop3"),
    (995, "pop3s"),
)

Echo = Callable[[str], None]
#: Drops root for the rest of the process, to the owner of the given path (ctl._become_owner).
BecomeOwner = Callable[[Path], None]


@dataclass(frozen=True, slots=True)
class Answers:
    """What the wizard was told, validated and normalised (``checked`` makes one)."""

    hostname: str
    domain: str
    user: str
    data_dir: Path
    password: str | None  # for a new user, and for the login check; None: not known
    change_password: bool = False  # set an existing user's password to ``password``


def checked(hostname: str, domain: str, user: str, data_dir: str | Path) -> Answers:
    """Validate and normalise the answers; ``MailroomError`` with one line otherwise."""
    host = check_hostname(hostname)
    try:
        dom = normalise_domain(domain)
    except InvalidNameError as err:
        raise MailroomError(f"invalid domain: {err}") from None
    try:
        addr = parse_address(user, allow_plus=False)
    except InvalidNameError as err:
        raise MailroomError(f"invalid first user: {err}") from None
    if addr.domain != dom:
        raise MailroomError(f"the first user {addr} must be an address in {dom}")
    path = Path(data_dir)
    if not path.is_absolute():
        raise MailroomError(f"the data directory must be an absolute path, not {str(path)!r}")
    return Answers(host, dom, str(addr), path, None)


def check_hostname(hostname: str) -> str:
    """``hostname`` as an A-label FQDN, or ``MailroomError``."""
    try:
        return normalise_domain(hostname)
    except InvalidNameError:
        raise MailroomError(
            f"invalid host name {hostname!r}: it must be a fully qualified name such as"
            " mail.example.org"
        ) from None


def default_hostname() -> str:
    """This machine's FQDN when it has a dot, else ``""`` (nothing sensible to offer)."""
    name = socket.getfqdn().rstrip(".").lower()
    return name if "." in name and name != "localhost.localdomain" else ""


def domain_of(hostname: str) -> str:
    """``mail.example.org`` → ``example.org``; a two-label name is its own domain."""
    labels = hostname.split(".")
    return ".".join(labels[1:]) if len(labels) > 2 else hostname


def current_config(path: Path) -> dict[str, object]:
    """The config file's top-level data, ``{}`` if there is none; ``MailroomError`` if broken."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise MailroomError(f"{path}: cannot read the configuration file: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise MailroomError(f"{path}: not valid TOML: {err}") from None


def user_exists(data_dir: Path, address: str) -> bool:
    """Whether ``address`` is a user already (without creating the database)."""
    db = data_dir / "auth.sqlite3"
    if not db.exists():
        return False
    with Accounts(db) as accounts:
        return accounts.get_user(address) is not None


def run(
    answers: Answers, config: Path, *, echo: Echo, become_owner: BecomeOwner
) -> tuple[Settings, bool]:
    """Do every step; return the settings in force and whether the login check passed."""
    write_config(config, answers, echo)
    settings = _load(config)
    make_dirs(settings.data_dir, echo)
    add_accounts(settings, answers, echo)
    make_dkim_keys(settings, answers.domain, echo, become_owner)
    make_certificate(settings, echo)
    print_records(settings, answers.domain, echo)
    return settings, check(settings, config, answers, echo)


# -- 1. config -------------------------------------------------------------------------------


def write_config(path: Path, answers: Answers, echo: Echo) -> None:
    """Set ``hostname`` and ``data_dir`` in ``path``, keeping every other line."""
    values = {"hostname": answers.hostname, "data_dir": str(answers.data_dir)}
    current = current_config(path)
    try:
        old_text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old_text = ""
    new_text = _set_top_level(old_text, values)
    try:
        data = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        data = {}
    if any(data.get(k) != v for k, v in values.items()):
        raise MailroomError(f"{path}: cannot update hostname and data_dir; edit them by hand")
    if new_text == old_text and all(current.get(k) == v for k, v in values.items()):
        echo(f"already: {path} has hostname {answers.hostname}, data_dir {answers.data_dir}")
        return
    _write_atomic(path, new_text.encode("utf-8"))
    verb = "updated" if old_text else "wrote"
    echo(f"done: {verb} {path} (hostname {answers.hostname}, data_dir {answers.data_dir})")


def _set_top_level(text: str, values: dict[str, str]) -> str:
    """``text`` with each top-level ``key = ...`` line set to ``values[key]`` (added if absent,
    before the first table)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    end = next((i for i, line in enumerate(lines) if re.match(r"\s*\[", line)), len(lines))
    for key, value in values.items():
        line = f"{key} = {json.dumps(value, ensure_ascii=False)}\n"
        pattern = re.compile(rf"\s*{re.escape(key)}\s*=")
        for i in range(end):
            if pattern.match(lines[i]):
                if lines[i] != line:
                    lines[i] = line
                break
        else:
            at = end
            while at > 0 and not lines[at - 1].strip():
                at -= 1  # after the last top-level line, before the blank lines
            lines.insert(at, line)
            end += 1
    return "".join(lines)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` crash-safe; root:mailroom 0640 as root, else keep the old mode."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    mode, owner = CONFIG_MODE, None
    with contextlib.suppress(FileNotFoundError):
        old = os.stat(path)
        mode, owner = old.st_mode & 0o7777, (old.st_uid, old.st_gid)
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            owner, mode = (0, grp.getgrnam(SERVICE_GROUP).gr_gid), CONFIG_MODE
    try:
        write_file(path, data, mode, owner=owner)
    except OSError as err:
        raise MailroomError(f"cannot write {path}: {err.strerror}") from None


def _load(path: Path) -> Settings:
    try:
        return load_settings(path)
    except MailroomError as err:
        raise MailroomError("; ".join(s.strip() for s in str(err).splitlines())) from None


# -- 2. directories --------------------------------------------------------------------------


def make_dirs(data_dir: Path, echo: Echo) -> None:
    """``data_dir`` and its subdirectories, 0700, owned by ``data_dir``'s owner (as root)."""
    made: list[str] = []
    try:
        if not data_dir.is_dir():
            data_dir.mkdir(mode=DATA_DIR_MODE, parents=True)
            os.chmod(data_dir, DATA_DIR_MODE)
            if os.geteuid() == 0:
                with contextlib.suppress(KeyError):
                    service = pwd.getpwnam(SERVICE_USER)
                    os.chown(data_dir, service.pw_uid, service.pw_gid)
            made.append(str(data_dir))
        owner = os.stat(data_dir)
        for name in SUBDIRS:
            sub = data_dir / name
            if sub.is_dir():
                continue
            sub.mkdir(mode=SUBDIR_MODE)
            os.chmod(sub, SUBDIR_MODE)  # mkdir's mode is masked by the umask
            if os.geteuid() == 0:
                os.chown(sub, owner.st_uid, owner.st_gid)
            made.append(name)
    except OSError as err:
        raise MailroomError(f"cannot create {err.filename}: {err.strerror}") from None
    if made:
        fsync_dir(data_dir)
        echo(f"done: created {', '.join(made)} in {data_dir}")
    else:
        echo(f"already: {data_dir} has {', '.join(SUBDIRS)}")


# -- 3. domain and first user ----------------------------------------------------------------


def add_accounts(settings: Settings, answers: Answers, echo: Echo) -> None:
    with Accounts(settings.auth_db) as accounts:
        if accounts.is_local_domain(answers.domain):
            echo(f"already: domain {answers.domain} exists")
        else:
            accounts.add_domain(answers.domain)
            echo(f"done: added domain {answers.domain}")
        if accounts.get_user(answers.user) is None:
            if answers.password is None:
                raise MailroomError(f"a password is needed to add the user {answers.user}")
            accounts.add_user(answers.user, answers.password)
            echo(f"done: added user {answers.user}")
        elif answers.password is not None and answers.change_password:
            accounts.set_password(answers.user, answers.password)
            echo(f"done: changed the password of {answers.user}")
        else:
            echo(f"already: user {answers.user} exists (password unchanged)")


# -- 4. DKIM ---------------------------------------------------------------------------------


def make_dkim_keys(settings: Settings, domain: str, echo: Echo, become_owner: BecomeOwner) -> None:
    keys = dkim.load_keys(settings.dkim_dir, domain)
    if keys:
        echo(f"already: DKIM keys for {domain}: {', '.join(k.selector for k in keys)}")
        return
    _as_owner(settings.data_dir, become_owner, lambda: dkim.generate(settings.dkim_dir, domain))
    keys = dkim.load_keys(settings.dkim_dir, domain)
    echo(f"done: created DKIM keys for {domain}: {', '.join(k.selector for k in keys)}")


def _as_owner(path: Path, become_owner: BecomeOwner, work: Callable[[], object]) -> None:
    """Run ``work`` as the owner of ``path``, like the ctl commands do, in a child process
    when root must stay root for the steps after it."""
    if os.geteuid() != 0 or os.stat(path).st_uid == 0:
        work()
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, work, report an error on the pipe
        os.close(read_end)
        status = 0
        try:
            become_owner(path)
            work()
        except BaseException as err:  # anything goes to the parent as text
            os.write(write_end, str(err).encode("utf-8", "replace") or repr(err).encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise MailroomError(message.splitlines()[0] if message else "DKIM key generation failed")


# -- 5. TLS ----------------------------------------------------------------------------------


def make_certificate(settings: Settings, echo: Echo) -> None:
    """A self-signed certificate for the hostname unless one is in place."""
    cert, key = settings.tls_cert, settings.tls_key
    if cert.exists():
        echo(f"already: TLS certificate {cert}")
        return
    openssl = shutil.which("openssl")
    if openssl is None:
        raise MailroomError("openssl is not installed; it is needed for a self-signed certificate")
    owner = os.stat(settings.data_dir)
    cert.parent.mkdir(mode=SUBDIR_MODE, parents=True, exist_ok=True)
    host = settings.hostname
    with tempfile.TemporaryDirectory(dir=cert.parent, prefix=".selfsigned.") as tmp:
        tmp_key, tmp_cert = Path(tmp) / "privkey.pem", Path(tmp) / "fullchain.pem"
        command = [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-nodes",
            "-days", str(CERT_DAYS), "-subj", f"/CN={host}",
            "-addext", f"subjectAltName=DNS:{host}",
            "-addext", "extendedKeyUsage=serverAuth",
            "-keyout", str(tmp_key), "-out", str(tmp_cert),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise MailroomError(f"openssl could not make a self-signed certificate: {last}")
        for path, mode in ((tmp_key, 0o600), (tmp_cert, 0o644)):
            os.chmod(path, mode)
            if os.geteuid() == 0:
                os.chown(path, owner.st_uid, owner.st_gid)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        key.parent.mkdir(mode=SUBDIR_MODE, parents=True, exist_ok=True)
        os.replace(tmp_key, key)  # the key first: a certificate in place means both are
        os.replace(tmp_cert, cert)
    fsync_dir(cert.parent)
    echo(
        f"done: made a self-signed TLS certificate for {host} ({cert});"
        " `mailroomctl tls issue` replaces it with a Let's Encrypt one"
    )


# -- 6. DNS ----------------------------------------------------------------------------------


def dns_records(settings: Settings, domain: str) -> list[str]:
    """The zone-file lines ``domain`` needs (mailroom.dnsrecords owns them)."""
    from mailroom import dnsrecords

    return [record.zone_line() for record in dnsrecords.generate(settings, domain).records]


def print_records(settings: Settings, domain: str, echo: Echo) -> None:
    echo(f"publish these DNS records for {domain}:")
    for line in dns_records(settings, domain):
        echo(f"  {line}")


# -- 7. check --------------------------------------------------------------------------------


def check(settings: Settings, config: Path, answers: Answers, echo: Echo) -> bool:
    """Report whether the config loads, the user can log in, and which ports listen."""
    _load(config)
    echo(f"check: {config} is valid")
    ok = True
    if answers.password is None:
        echo(f"check: login of {answers.user} not tried (no password given)")
    else:
        with Accounts(settings.auth_db) as accounts:
            ok = accounts.verify_password(answers.user, answers.password) is not None
        echo(f"check: {answers.user} {'can log in' if ok else 'CANNOT log in with that password'}")
    state = {f"{port} ({name})": _listening(port) for port, name in PORTS}
    listening = [port for port, up in state.items() if up]
    silent = [port for port, up in state.items() if not up]
    echo(f"check: listening on localhost: {', '.join(listening) or 'none'}")
    if silent:
        echo(f"check: not listening on localhost: {', '.join(silent)}")
    return ok


def _listening(port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False
