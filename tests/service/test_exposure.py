"""Unit tests for service.security.exposure: loopback detection and the warning for an open server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.config import Settings
from service.security.exposure import ServerSecurity, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_server_beyond_loopback_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    open_server = ServerSecurity.from_settings(Settings())
    assert open_server.describe() == "plaintext, tokens: off" and not open_server.interceptors()
    with caplog.at_level(logging.WARNING):
        open_server.warn_if_exposed("127.0.0.1")
        assert not caplog.text
        open_server.warn_if_exposed("0.0.0.0")
    assert "anyone who reaches the port" in caplog.text

    tokens = tmp_path / "tokens"
    tokens.write_text("token-0123456789abcdefgh\n")
    guarded = ServerSecurity.from_settings(Settings(admin_token_file=tokens))
    assert guarded.describe() == "plaintext, tokens: admin" and guarded.interceptors()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        guarded.warn_if_exposed("0.0.0.0")
    assert not caplog.text


def test_unreadable_token_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="token file"):
        ServerSecurity.from_settings(Settings(auth_token_file=tmp_path / "absent"))
