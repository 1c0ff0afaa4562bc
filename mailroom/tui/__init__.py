"""``mailroomctl config edit``: the configuration TUI.

``document`` owns the config file as an editable TOML document (no textual: the CLI and the
tests use it alone); ``probes`` gathers what the read-only views show; ``app`` is the textual
application, imported only by the ``config edit`` command so that mailroomctl starts fast.
"""
