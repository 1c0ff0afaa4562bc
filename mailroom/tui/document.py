"""The configuration file as an editable document: fields, validation, diff, crash-safe save.

The file is parsed with tomlkit, so a value changed here is written back in place: comments,
blank lines, key order and the layout of a hand-edited file stay as they were. Every change is
validated by the same pydantic validation of ``Settings`` the services load (``mailroom.config``);
``errors()`` maps each problem to the dotted key it belongs to, in words. ``save()`` refuses an
invalid document, keeps the previous file as ``config.toml.bak`` and replaces the file with
``maildir.write_file`` (tmp, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomlkit
import tomlkit.items
from pydantic import ValidationError
from tomlkit.container import Container
from tomlkit.toml_document import TOMLDocument

from mailroom.config import UNKNOWN_KEY, Settings, field_types, validated
from mailroom.errors import ConfigError
from mailroom.maildir import write_file

BACKUP_SUFFIX = ".bak"
NEW_FILE_MODE = 0o640
GENERAL = ""  # the section of the top-level keys

FieldKind = Literal["bool", "int", "float", "list", "text"]


@dataclass(frozen=True, slots=True)
class Field:
    """One editable key: ``section`` ("" for the top level, else e.g. "dns.publish")."""

    section: str
    name: str
    kind: FieldKind
    item_kind: FieldKind  # of a list's items
    default: str  # shown when the file does not set the key
    choices: tuple[str, ...]  # the allowed values of a Literal, else ()
    required: bool

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


@dataclass(frozen=True, slots=True)
class Section:
    name: str  # "" for the top level
    fields: tuple[Field, ...]
    not_editable: tuple[str, ...]  # keys (arrays of tables) left to a text editor

    @property
    def title(self) -> str:
        return self.name or "general"


def sections(section: type = Settings, prefix: str = "") -> list[Section]:
    """Every section of ``section``, the top level first, nested sections after their parent."""
    fields: list[Field] = []
    nested: list[Section] = []
    skipped: list[str] = []
    types_ = field_types(section)
    for info in dataclasses.fields(section):
        name = info.name
        annotation = _strip_optional(types_[name])
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            nested += sections(annotation, key)
            continue
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is tuple and any(
            dataclasses.is_dataclass(a) for a in args
        ):
            skipped.append(key)
            continue
        kind, item_kind = _kinds(annotation)
        required = (
            info.default is dataclasses.MISSING and info.default_factory is dataclasses.MISSING
        )
        if required:
            default = ""
        elif info.default_factory is not dataclasses.MISSING:
            default = _text(info.default_factory())
        else:
            default = _text(info.default)
        fields.append(
            Field(
                section=prefix,
                name=name,
                kind=kind,
                item_kind=item_kind,
                default=default,
                choices=_choices(annotation),
                required=required,
            )
        )
    return [Section(prefix, tuple(fields), tuple(skipped)), *nested]


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _kinds(annotation: Any) -> tuple[FieldKind, FieldKind]:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        item = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
        return "list", _kinds(item)[0]
    if annotation is bool:
        return "bool", "text"
    if annotation is int:
        return "int", "text"
    if annotation is float:
        return "float", "text"
    return "text", "text"


def _choices(annotation: Any) -> tuple[str, ...]:
    if typing.get_origin(annotation) is Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    return ()


def _text(value: Any) -> str:
    """A value as the user types it: lists comma-separated, booleans true/false."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse(field: Field, text: str) -> Any:
    """What the user typed as a TOML value for ``field``; ``None``: not set (the default).

    What cannot be converted stays a string, so that the model says what is wrong with it."""
    text = text.strip()
    if text == "":
        return None
    if field.kind == "list":
        return [_scalar(field.item_kind, part.strip()) for part in text.split(",") if part.strip()]
    return _scalar(field.kind, text)


def _scalar(kind: FieldKind, text: str) -> Any:
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    elif kind in ("int", "float"):
        try:
            return int(text)
        except ValueError:
            pass
        if kind == "float":
            try:
                return float(text)
            except ValueError:
                pass
    return text


class ConfigDocument:
    """The config file at ``path`` (an empty document when there is none yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.original = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.original = ""
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the configuration file: {err}") from None
        try:
            self.doc: TOMLDocument = tomlkit.parse(self.original)
        except tomlkit.exceptions.TOMLKitError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        self.edits: dict[str, Any] = {}

    # -- values ----------------------------------------------------------------------------

    def text(self) -> str:
        return self.doc.as_string()

    @property
    def changed(self) -> bool:
        return self.text() != self.original

    def get(self, key: str) -> Any:
        """The value the file sets for dotted ``key``, or ``None``."""
        *tables, name = key.split(".")
        node: Any = self.doc
        for table in tables:
            node = node.get(table) if isinstance(node, dict) else None
            if node is None:
                return None
        value = node.get(name) if isinstance(node, dict) else None
        return value.unwrap() if isinstance(value, tomlkit.items.Item) else value

    def display(self, field: Field) -> str:
        return _text(self.get(field.key))

    def set(self, key: str, value: Any) -> None:
        """Set dotted ``key`` (``None``: remove it, the default applies).

        The document is rebuilt from the file's text with every edit applied, so a key cleared
        and typed again while editing keeps its place and its comment."""
        self.edits[key] = value
        self.doc = tomlkit.parse(self.original)
        for edited, edit in self.edits.items():
            _apply(self.doc, edited, edit)

    def set_text(self, field: Field, text: str) -> None:
        self.set(field.key, parse(field, text))

    # -- validation, diff, save --------------------------------------------------------------

    def data(self) -> dict[str, Any]:
        return tomlkit.loads(self.text()).unwrap()

    def validate(self) -> Settings:
        """The settings this document gives, or ``ValidationError``."""
        return validated(self.data())

    def errors(self) -> dict[str, str]:
        """Problems by dotted key ("" when it belongs to none), in words; {} when valid."""
        try:
            self.validate()
        except ValidationError as err:
            return describe(err)
        return {}

    def diff(self) -> str:
        name = str(self.path)
        return "".join(
            difflib.unified_diff(
                self.original.splitlines(keepends=True),
                self.text().splitlines(keepends=True),
                fromfile=name,
                tofile=f"{name} (edited)",
            )
        )

    def save(self) -> Path | None:
        """Write the document; the previous file becomes ``<name>.bak`` (returned, or ``None``
        for a new file). Raises ``ConfigError`` when the document is invalid or a write fails."""
        problems = self.errors()
        if problems:
            listed = "; ".join(f"{k or '(top level)'}: {m}" for k, m in problems.items())
            raise ConfigError(f"not saved, the configuration is invalid: {listed}")
        backup: Path | None = None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            mode, owner = NEW_FILE_MODE, None
        else:
            mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
            backup = self.path.with_name(self.path.name + BACKUP_SUFFIX)
        text = self.text()
        try:
            if backup is not None:
                write_file(backup, self.path.read_bytes(), mode, owner=owner)
            write_file(self.path, text.encode("utf-8"), mode, owner=owner)
        except OSError as err:
            raise ConfigError(f"{self.path}: not saved: {err.strerror or err}") from None
        self.original = text
        self.edits = {}
        return backup


def _apply(doc: TOMLDocument, key: str, value: Any) -> None:
    """Set dotted ``key`` in ``doc`` in place (its comment stays); ``None`` removes it."""
    *tables, name = key.split(".")
    node: Container | tomlkit.items.Table = doc
    for table in tables:
        child = node.get(table)
        if not isinstance(child, tomlkit.items.Table):
            if value is None:
                return
            child = tomlkit.table()
            node[table] = child
        node = child
    if value is None:
        if name in node:
            del node[name]
        return
    current = node.get(name)
    if isinstance(current, tomlkit.items.Item):
        plain = current.unwrap()
        if plain == value and isinstance(plain, bool) == isinstance(value, bool):
            return  # untouched: exactly as written (e.g. 1e3 stays 1e3)
    node[name] = value


def describe(err: ValidationError) -> dict[str, str]:
    """pydantic's errors as ``{dotted key: words}``; list items name their list's key."""
    found: dict[str, str] = {}
    for problem in err.errors():
        parts = [str(p) for p in problem["loc"] if not isinstance(p, int)]
        key = ".".join(parts)
        if problem["type"] in UNKNOWN_KEY:
            message = "unknown key (only a text editor can remove it)"
        elif problem["type"] == "missing":
            message = "required, not set"
        else:
            message = problem["msg"].removeprefix("Value error, ")
        found[key] = f"{found[key]}; {message}" if key in found else message
    return found
