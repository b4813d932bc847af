"""The training and export commands' help: each default named once, and named right."""

from __future__ import annotations

import pytest

from export.__main__ import build_parser as export_parser
from training.models import MODELS
from training.train import build_parser as train_parser


def _help_line(parser_text: str, flag: str) -> str:
    lines = parser_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag + " "))
    text = [lines[start]]
    for line in lines[start + 1 :]:
        if line.lstrip().startswith("-") or not line.strip():
            break
        text.append(line.strip())
    return " ".join(text)


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")


def test_train_lr_names_every_models_default() -> None:
    line = _help_line(train_parser().format_help(), "--lr")
    for name, spec in MODELS.items():
        assert name in line and str(spec.lr) in line, (name, line)
    assert line.count("default") == 1


def test_export_checkpoint_says_required() -> None:
    line = _help_line(export_parser().format_help(), "--checkpoint")
    assert "(required)" in line and "default" not in line


def test_export_queue_delay_says_when_it_matters() -> None:
    line = _help_line(export_parser().format_help(), "--max-queue-delay-us")
    assert "--batching delay" in line and "(default: 1000)" in line
