"""Programs whose issue has not landed yet say so plainly and exit 2."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import BIN


@pytest.mark.parametrize("program", ["mailroom-submission", "mailroom-deliver"])
def test_pending_program_says_not_implemented(program: str) -> None:
    out = subprocess.run([BIN / program], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "not implemented yet" in out.stderr and "Traceback" not in out.stderr
