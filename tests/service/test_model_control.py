"""Unit tests for service.core.model_control: the none, explicit and poll modes over a repository.

The loader is a stand-in (no ONNX Runtime): a version whose model file says `broken` fails.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from service.core.errors import ModelControlDisabled, ModelLoadError
from service.core.model_control import ModelControl, fingerprint
from service.core.repository import ModelFolder, ModelRepository


class FakeVersion:
    def __init__(self, spec: ModelFolder, version: int) -> None:
        self.name, self.version = spec.name, version
        self.content = spec.versions[version].read_text()
        self.closed = False

    async def close(self) -> None:
        self.closed = True


async def fake_loader(spec: ModelFolder, version: int) -> FakeVersion:
    loaded = FakeVersion(spec, version)
    if loaded.content == "broken":
        raise RuntimeError("not a model")
    return loaded


def add_model(root: Path, name: str, versions: dict[int, str], policy: str = "") -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(f'name: "{name}"\n{policy}')
    for version, content in versions.items():
        (folder / str(version)).mkdir(exist_ok=True)
        (folder / str(version) / "model.onnx").write_text(content)


def serving(repository: ModelRepository) -> dict[str, dict[int, str]]:
    return {
        e.name: {v: m.content for v, m in e.versions.items()}  # type: ignore[attr-defined]
        for e in repository.entries()
        if e.versions
    }


def run(root: Path, scenario: Callable[[ModelControl], Awaitable[Any]], **control: Any) -> Any:
    async def main() -> Any:
        repository = ModelRepository(root, fake_loader)
        model_control = ModelControl(repository, **control)
        await model_control.start()
        try:
            return await scenario(model_control)
        finally:
            await model_control.stop()
            await repository.close()

    return asyncio.run(main())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    add_model(tmp_path, "a", {1: "a1"})
    add_model(tmp_path, "b", {1: "b1"})
    return tmp_path


def test_none_loads_everything_and_refuses_changes(root: Path) -> None:
    async def scenario(control: ModelControl) -> None:
        assert serving(control.repository) == {"a": {1: "a1"}, "b": {1: "b1"}}
        for call in (control.load, control.unload):
            with pytest.raises(ModelControlDisabled, match="--model-control-mode"):
                await call("a")
        assert serving(control.repository)["a"] == {1: "a1"}

    run(root, scenario)


@pytest.mark.parametrize(
    ("load_models", "expected"),
    [((), set()), (("b",), {"b"}), (("*",), {"a", "b"}), (("a", "a"), {"a"})],
)
def test_explicit_loads_what_is_named(
    root: Path, load_models: tuple[str, ...], expected: set[str]
) -> None:
    async def scenario(control: ModelControl) -> None:
        assert set(serving(control.repository)) == expected
        await control.load("a")
        await control.unload("a")
        assert "a" not in serving(control.repository)

    run(root, scenario, mode="explicit", load_models=load_models)


def test_explicit_refuses_to_start_with_an_unknown_name(root: Path) -> None:
    with pytest.raises(ModelLoadError, match="ghost"):
        run(root, lambda c: asyncio.sleep(0), mode="explicit", load_models=("a", "ghost"))


def test_load_models_only_with_explicit(root: Path) -> None:
    with pytest.raises(ValueError, match="explicit"):
        ModelControl(ModelRepository(root, fake_loader), mode="poll", load_models=("a",))


def test_poll_follows_the_folder(root: Path) -> None:
    async def scenario(control: ModelControl) -> list[dict[str, dict[int, str]]]:
        with pytest.raises(ModelControlDisabled, match="poll"):
            await control.unload("a")
        states = []
        add_model(root, "a", {2: "a2"})  # a new version (default policy: the latest)
        add_model(root, "c", {1: "c1"})  # a new model
        shutil.rmtree(root / "b")  # a removed model
        await control.poll_once()
        states.append(serving(control.repository))
        add_model(root, "a", {3: "broken"})  # a broken newer version: a2 keeps serving
        await control.poll_once()
        states.append(serving(control.repository))
        shutil.rmtree(root / "a" / "3")  # fixed by removing it: back to a2, freshly loaded
        await control.poll_once()
        states.append(serving(control.repository))
        await control.poll_once()  # nothing changed, nothing reloaded
        states.append(serving(control.repository))
        return states

    states = run(root, scenario, mode="poll", poll_secs=3600)
    assert states[0] == {"a": {2: "a2"}, "c": {1: "c1"}}
    assert states[1] == states[0]
    assert states[2] == states[0] and states[3] == states[0]


def test_poll_broken_version_beside_a_good_one(tmp_path: Path) -> None:
    add_model(tmp_path, "m", {1: "m1"}, policy="version_policy { all {} }")

    async def scenario(control: ModelControl) -> dict[str, Any]:
        entry = control.repository.entry("m")
        add_model(tmp_path, "m", {2: "broken"}, policy="version_policy { all {} }")
        await control.poll_once()
        return {"serving": serving(control.repository), "failed": dict(entry.failed)}

    seen = run(tmp_path, scenario, mode="poll", poll_secs=3600)
    assert seen["serving"] == {"m": {1: "m1"}}
    assert list(seen["failed"]) == [2]


def test_poller_runs_on_its_own_and_stops(root: Path) -> None:
    async def scenario(control: ModelControl) -> dict[str, dict[int, str]]:
        add_model(root, "c", {1: "c1"})
        for _ in range(100):
            if "c" in serving(control.repository):
                break
            await asyncio.sleep(0.02)
        return serving(control.repository)

    assert "c" in run(root, scenario, mode="poll", poll_secs=0.05)


def test_fingerprint_sees_changes_in_version_folders(tmp_path: Path) -> None:
    add_model(tmp_path, "m", {1: "m1"})
    before = fingerprint(tmp_path / "m")
    assert {p for p, _, _ in before} == {"config.pbtxt", "1/", "1/model.onnx"}
    (tmp_path / "m" / "1" / "model.onnx").write_text("m1, retrained")
    assert fingerprint(tmp_path / "m") != before
    assert fingerprint(tmp_path / "gone") == ()


def test_poll_a_serving_version_changed_into_a_broken_file_keeps_serving(tmp_path: Path) -> None:
    add_model(tmp_path, "m", {1: "m1", 2: "m2"}, policy="version_policy { all {} }")

    async def scenario(control: ModelControl) -> dict[str, Any]:
        old = control.repository.entry("m").versions[2]
        (tmp_path / "m" / "2" / "model.onnx").write_text("broken")
        await control.poll_once()
        entry = control.repository.entry("m")
        return {
            "serving": serving(control.repository),
            "kept": entry.versions[2] is old and not old.closed,  # type: ignore[attr-defined]
        }

    seen = run(tmp_path, scenario, mode="poll", poll_secs=3600)
    assert seen == {"serving": {"m": {1: "m1", 2: "m2"}}, "kept": True}
