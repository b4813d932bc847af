"""The client's command line: common options before or after the command, help without repeats."""

from __future__ import annotations

import pytest

from client.__main__ import build_parser, main, server_address

COMMON = {
    "--url": ("url", "127.0.0.1:9", "127.0.0.1:8001"),
    "--model": ("model", "lenet5", "mnist_cnn"),
    "--model-version": ("model_version", "2", ""),
    "--top-k": ("top_k", 3, 1),
    "--polarity": ("polarity", "invert", "auto"),
    "--timeout": ("timeout", 2.5, 30.0),
}
COMMANDS = {
    "classify": ["classify", "x.png"],
    "explain": ["explain", "x.png"],
    "explain-dir": ["explain-dir", "scans", "--out-dir", "out"],
}


@pytest.fixture(autouse=True)
def no_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CNNSERVE_URL", raising=False)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", COMMON)
@pytest.mark.parametrize("where", ["before", "after"])
def test_common_option_before_or_after_the_command(flag: str, command: str, where: str) -> None:
    field, value, default = COMMON[flag]
    given = [flag, str(value)]
    argv = given + COMMANDS[command] if where == "before" else COMMANDS[command] + given
    args = build_parser().parse_args(argv)
    assert getattr(args, field) == value
    for other, (other_field, _, other_default) in COMMON.items():
        if other != flag:
            assert getattr(args, other_field) == other_default, f"{other} lost its default"
    assert default != value


def test_after_the_command_wins_over_before() -> None:
    args = build_parser().parse_args(["--top-k", "2", "explain", "x.png", "--top-k", "5"])
    assert args.top_k == 5


def test_url_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNSERVE_URL", "10.0.0.1:8001")
    assert build_parser().parse_args(["explain", "x.png"]).url == "10.0.0.1:8001"
    assert build_parser().parse_args(["explain", "x.png", "--url", "h:1"]).url == "h:1"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_names_each_default_once(
    command: str | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"] if command else ["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: )" not in text
    lines = [line for line in text.splitlines() if line.lstrip().startswith("--")]
    assert lines
    for line in lines:
        assert line.count("default") <= 1, line
    for flag in COMMON:
        assert any(line.lstrip().startswith(flag + " ") for line in lines), flag


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("127.0.0.1:8001", "127.0.0.1:8001"),
        ("http://127.0.0.1:8001", "127.0.0.1:8001"),
        ("http://server.example:9000/", "server.example:9000"),
        ("[::1]:8001", "[::1]:8001"),
    ],
)
def test_url_takes_host_port_or_plain_http(url: str, address: str) -> None:
    assert server_address(url) == address


@pytest.mark.parametrize("url", ["https://h:443", "grpc://h:1", "localhost", "h:port", "/tmp/s"])
def test_other_urls_are_refused_with_the_expected_form(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--url", url, "classify", "x.png"])
    assert exit_.value.code == 2
    assert "HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["x.gif", "x", "x.webp"])
def test_explain_out_names_a_png_or_jpeg(out: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["explain", "x.png", "--out", out])
    assert ".png, .jpg or .jpeg" in capsys.readouterr().err
