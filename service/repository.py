"""The model repository (Triton layout): configs, versions, labels, and each model's life cycle.

`<root>/<model>/config.pbtxt` is a text-format ModelConfig; `<root>/<model>/<version>/model.onnx`
holds each version. A model that fails to load is kept as UNAVAILABLE with its reason while the
others serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from google.protobuf import text_format

from pb import model_config_pb2 as mc

from .errors import ModelLoadError, ModelNotFound, ModelNotReady

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILE = "model.onnx"

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"
STATES = (READY, UNAVAILABLE, LOADING, UNLOADING)


@dataclass(frozen=True)
class ModelSpec:
    """What the repository says about one model: its config, chosen versions and labels."""

    name: str
    directory: Path
    config: mc.ModelConfig
    versions: dict[int, Path]  # version -> model file, as selected by the version policy
    missing_versions: tuple[int, ...] = ()  # asked for by a `specific` policy but absent
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # output name -> labels


def read_config(path: Path) -> mc.ModelConfig:
    """Parse a text-format ModelConfig file."""
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ModelLoadError(f"{path.name}: {exc}") from exc


def select_versions(available: list[int], policy: mc.ModelVersionPolicy) -> list[int]:
    """Versions to serve under a version policy (default: the latest one)."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return sorted(available)
    if choice == "specific":
        return sorted(set(policy.specific.versions))
    count = policy.latest.num_versions if choice == "latest" else 1
    return sorted(available)[-max(count, 1) :]


def read_model(directory: Path) -> ModelSpec:
    """Read one model's folder; raises ModelLoadError with the reason when it is unusable."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(f"no {CONFIG_FILE} in {directory.name}/")
    config = read_config(config_path)
    if not config.name:
        config.name = directory.name
    elif config.name != directory.name:
        raise ModelLoadError(
            f"{CONFIG_FILE} names the model '{config.name}' but its folder is '{directory.name}'"
        )
    filename = config.default_model_filename or DEFAULT_MODEL_FILE
    available = sorted(
        int(p.name)
        for p in directory.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / filename).is_file()
    )
    chosen = select_versions(available, config.version_policy)
    versions = {v: directory / str(v) / filename for v in chosen if v in available}
    missing = tuple(v for v in chosen if v not in available)
    if not versions:
        raise ModelLoadError(
            f"no loadable version: no <version>/{filename} matching the version policy"
            + (f" (missing: {', '.join(map(str, missing))})" if missing else "")
        )
    labels: dict[str, tuple[str, ...]] = {}
    for output in config.output:
        if output.label_filename:
            label_path = directory / output.label_filename
            try:
                lines = label_path.read_text().splitlines()
            except OSError as exc:
                raise ModelLoadError(f"output '{output.name}': labels: {exc}") from exc
            labels[output.name] = tuple(line.strip() for line in lines if line.strip())
    return ModelSpec(config.name, directory, config, versions, missing, labels)


class LoadedVersion(Protocol):
    """A version that serves requests; the repository only needs to stop it."""

    async def close(self) -> None: ...


@dataclass
class ModelEntry:
    """One model's state: READY, UNAVAILABLE (with reason), LOADING or UNLOADING."""

    name: str
    state: str = UNAVAILABLE
    reason: str = ""
    spec: ModelSpec | None = None
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


VersionLoader = Callable[[ModelSpec, int], Awaitable[LoadedVersion]]


class ModelRepository:
    """Loads, serves and unloads the models under one repository folder."""

    def __init__(
        self,
        root: Path,
        loader: VersionLoader,
        on_state: Callable[[ModelEntry], None] | None = None,
    ) -> None:
        self.root = root
        self._loader = loader
        self._on_state = on_state
        self._entries: dict[str, ModelEntry] = {}

    def model_names(self) -> list[str]:
        """Model folders in the repository now (hidden folders skipped)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    async def load_all(self) -> None:
        """Load every model found in the repository (failures are recorded, not raised)."""
        if not self.root.is_dir():
            raise ModelLoadError(f"model repository {self.root} is not a folder")
        for name in self.model_names():
            with contextlib.suppress(ModelLoadError):
                await self.load(name)

    async def load(self, name: str) -> ModelEntry:
        """(Re)load one model; on failure it is left UNAVAILABLE (or keeps its old versions)."""
        if name not in self.model_names():
            raise ModelNotFound(f"no model '{name}' in the repository")
        entry = self._entries.setdefault(name, ModelEntry(name))
        async with entry.lock:
            previous = dict(entry.versions)
            if not previous:
                self._set(entry, LOADING, "")
            try:
                spec = await asyncio.to_thread(read_model, self.root / name)
                loaded: dict[int, LoadedVersion] = {}
                failed = {v: "version folder or model file missing" for v in spec.missing_versions}
                for version in spec.versions:
                    try:
                        loaded[version] = await self._loader(spec, version)
                    except Exception as exc:
                        if version in previous:  # a changed file that fails: the old one stays
                            loaded[version] = previous[version]
                            log.warning(
                                "model %s version %d failed to reload, the loaded one keeps "
                                "serving: %s", name, version, _reason(exc),
                            )  # fmt: skip
                            continue
                        failed[version] = _reason(exc)
                        log.warning(
                            "model %s version %d failed to load: %s", name, version, failed[version]
                        )
                if not loaded:
                    raise ModelLoadError("; ".join(f"version {v}: {r}" for v, r in failed.items()))
            except Exception as exc:
                reason = _reason(exc)
                log.error("model %s is unavailable: %s", name, reason)
                if not previous:
                    entry.failed = {}
                    self._set(entry, UNAVAILABLE, reason)
                raise ModelLoadError(f"failed to load '{name}': {reason}") from exc
            entry.spec, entry.versions, entry.failed = spec, loaded, failed
            self._set(entry, READY, "")
            log.info("model %s ready, versions %s", name, sorted(loaded))
        for version, old in previous.items():
            if loaded.get(version) is not old:
                await old.close()
        return entry

    async def unload(self, name: str) -> None:
        """Stop serving one model: new requests are refused, accepted ones finish."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model '{name}'")
        async with entry.lock:
            versions = entry.versions
            entry.versions = {}
            self._set(entry, UNLOADING, "")
            for version in versions.values():
                await version.close()
            self._set(entry, UNAVAILABLE, "unloaded")

    async def close(self) -> None:
        """Unload every model (used at shutdown, after the server stopped taking requests)."""
        for name in list(self._entries):
            await self.unload(name)

    def get(self, name: str, version: str = "") -> tuple[int, LoadedVersion]:
        """The serving version for a request: the newest one, or the one named."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model '{name}'")
        if not entry.versions:
            detail = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(f"model '{name}' is {entry.state.lower()}{detail}")
        if not version:
            number = max(entry.versions)
            return number, entry.versions[number]
        if not version.isdigit():
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        number = int(version)
        loaded = entry.versions.get(number)
        if loaded is None:
            if number in entry.failed:
                raise ModelNotReady(f"model '{name}' version {number}: {entry.failed[number]}")
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        return number, loaded

    def entry(self, name: str) -> ModelEntry:
        """The entry of a known model."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model '{name}'")
        return entry

    def entries(self) -> Iterator[ModelEntry]:
        """Every model the repository has seen, by name."""
        for name in sorted(self._entries):
            yield self._entries[name]

    def _set(self, entry: ModelEntry, state: str, reason: str) -> None:
        entry.state, entry.reason = state, reason
        if self._on_state is not None:
            self._on_state(entry)


def _reason(exc: BaseException) -> str:
    """A one-line reason for the index; ONNX Runtime's messages can be long."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ModelLoadError):
        return text[:500]
    return f"{type(exc).__name__}: {text}"[:500]
