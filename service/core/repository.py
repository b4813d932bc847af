"""The model repository (Triton layout): configs, versions, labels, and each model's life cycle.

`<root>/<model>/config.pbtxt` is a text-format ModelConfig; `<root>/<model>/<version>/model.onnx`
holds each version. A model that fails to load is kept as UNAVAILABLE with its reason while the
others serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf import text_format

import modelrepo
from pb import model_config_pb2 as mc

from .errors import ModelLoadError, ModelNotFound, ModelNotReady, shorten

log = logging.getLogger(__name__)

CONFIG_FILE = modelrepo.CONFIG_FILE
DEFAULT_MODEL_FILE = modelrepo.MODEL_FILE

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"
STATES = (READY, UNAVAILABLE, LOADING, UNLOADING)
_VERSION = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²".isdigit() is true), int64-sized


@dataclass(frozen=True)
class ModelFolder:
    """What the repository says about one model: its config, chosen versions and labels."""

    name: str
    directory: Path
    config: mc.ModelConfig
    versions: dict[int, Path]  # version -> model file, as selected by the version policy
    missing_versions: tuple[int, ...] = ()  # asked for by a `specific` policy but absent
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # output name -> labels


def read_config(directory: Path) -> mc.ModelConfig:
    """Parse a model folder's config.pbtxt; raises ModelLoadError saying what is wrong."""
    try:
        return modelrepo.read_config(directory)
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ModelLoadError(f"{CONFIG_FILE}: {exc}") from exc


def select_versions(available: list[int], policy: mc.ModelVersionPolicy) -> list[int]:
    """Versions to serve under a version policy (default: the latest one)."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return sorted(available)
    if choice == "specific":
        return sorted(set(policy.specific.versions))
    count = policy.latest.num_versions if choice == "latest" else 1
    return sorted(available)[-max(count, 1) :]


def read_model(directory: Path) -> ModelFolder:
    """Read one model's folder; raises ModelLoadError with the reason when it is unusable."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(f"no {CONFIG_FILE} in {directory.name}/")
    config = read_config(directory)
    if not config.name:
        config.name = directory.name
    elif config.name != directory.name:
        raise ModelLoadError(
            f"{CONFIG_FILE} names the model '{config.name}' but its folder is '{directory.name}'"
        )
    filename = config.default_model_filename or DEFAULT_MODEL_FILE
    available = sorted(
        v
        for v, folder in modelrepo.version_folders(directory).items()
        if (folder / filename).is_file()
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
    return ModelFolder(config.name, directory, config, versions, missing, labels)


class LoadedVersion(Protocol):
    """A version that serves requests; the repository only needs to stop it."""

    async def close(self) -> None: ...


V = TypeVar("V", bound=LoadedVersion)


@dataclass
class ModelEntry(Generic[V]):
    """One model's state: READY, UNAVAILABLE (with reason), LOADING or UNLOADING."""

    name: str
    state: str = UNAVAILABLE
    reason: str = ""
    spec: ModelFolder | None = None
    versions: dict[int, V] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


@dataclass(frozen=True)
class IndexRow:
    """One line of the repository index: a model (or one of its versions) and its state."""

    name: str
    version: str
    state: str
    reason: str = ""


class ModelRepository(Generic[V]):
    """Loads, serves and unloads the models under one repository folder.

    Typed by what its loader makes (`ModelRepository[ServedModel]` in the server), so callers
    get that type back from `get` without downcasts.
    """

    def __init__(
        self,
        root: Path,
        loader: Callable[[ModelFolder, int], Awaitable[V]],
        on_state: Callable[[ModelEntry[V]], None] | None = None,
    ) -> None:
        self.root = root
        self._loader = loader
        self._on_state = on_state
        self._entries: dict[str, ModelEntry[V]] = {}
        self._control: set[asyncio.Future[None]] = set()

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

    async def load(self, name: str) -> ModelEntry[V]:
        """(Re)load one model; on failure it is left UNAVAILABLE (or keeps its old versions).

        Loads and unloads of one model run one at a time, each in a task of its own: a caller
        that stops waiting (a cancelled RPC) does not stop it, so it always ends in a defined
        state.
        """
        if name not in self.model_names():
            raise ModelNotFound(f"no model '{shorten(name)}' in the repository")
        entry = self._entries.setdefault(name, ModelEntry[V](name))
        await self._in_own_task(self._load(entry))
        return entry

    async def unload(self, name: str) -> None:
        """Stop serving one model: new requests are refused, accepted ones finish."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model '{shorten(name)}'")
        await self._in_own_task(self._unload(entry))

    async def _in_own_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._control.add(task)
        task.add_done_callback(self._control.discard)
        await asyncio.shield(task)

    async def _load(self, entry: ModelEntry[V]) -> None:
        name = entry.name
        async with entry.lock:
            previous = dict(entry.versions)
            if not previous:
                self._set(entry, LOADING, "")
            loaded: dict[int, V] = {}
            try:
                spec = await asyncio.to_thread(read_model, self.root / name)
                failed = {v: "version folder or model file missing" for v in spec.missing_versions}
                for version in spec.versions:
                    try:
                        loaded[version] = await self._loader(spec, version)
                    except Exception as exc:
                        if version in previous:  # a changed file that fails: the old one stays
                            loaded[version] = previous[version]
                            log.warning(
                                "model %s version %d failed to reload, the loaded one keeps "
                                "serving: %s", name, version, self._reason(exc),
                            )  # fmt: skip
                            continue
                        failed[version] = self._reason(exc)
                        log.warning(
                            "model %s version %d failed to load: %s", name, version, failed[version]
                        )
                if not loaded:
                    raise ModelLoadError("; ".join(f"version {v}: {r}" for v, r in failed.items()))
            except BaseException as exc:
                for version, half_open in loaded.items():  # a load cut short keeps nothing
                    if previous.get(version) is not half_open:  # half-open (old ones serve on)
                        await half_open.close()
                cancelled = not isinstance(exc, Exception)
                reason = "load cancelled" if cancelled else self._reason(exc)
                log.error("model %s: %s", name, reason if cancelled else f"unavailable: {reason}")
                if not previous:
                    entry.failed = {}
                    self._set(entry, UNAVAILABLE, reason)
                if cancelled:
                    raise
                raise ModelLoadError(f"failed to load '{name}': {reason}") from exc
            entry.spec, entry.versions, entry.failed = spec, loaded, failed
            self._set(entry, READY, "")
            log.info("model %s ready, versions %s", name, sorted(loaded))
        for version, old in previous.items():
            if loaded.get(version) is not old:
                await old.close()

    async def _unload(self, entry: ModelEntry[V]) -> None:
        async with entry.lock:
            versions = entry.versions
            entry.versions = {}
            self._set(entry, UNLOADING, "")
            try:
                for version in versions.values():
                    await version.close()
            finally:
                self._set(entry, UNAVAILABLE, "unloaded")

    async def close(self) -> None:
        """Unload every model (used at shutdown, after the server stopped taking requests)."""
        if self._control:  # let loads and unloads in progress finish first
            await asyncio.gather(*self._control, return_exceptions=True)
        for name in list(self._entries):
            await self.unload(name)

    def _reason(self, exc: BaseException) -> str:
        """A one-line reason for the index, naming files relative to the repository."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for root in {str(self.root.resolve()), str(self.root)}:
            text = text.replace(root.rstrip("/") + "/", "")
        if isinstance(exc, ModelLoadError):
            return text[:500]
        return f"{type(exc).__name__}: {text}"[:500]

    def get(self, name: str, version: str = "") -> tuple[int, V]:
        """The serving version for a request: the newest one, or the one named."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model '{shorten(name)}'")
        if not entry.versions:
            detail = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(f"model '{name}' is {entry.state.lower()}{detail}")
        if not version:
            number = max(entry.versions)
            return number, entry.versions[number]
        if not _VERSION.fullmatch(version):
            raise ModelNotFound(f"model '{name}' has no version '{shorten(version)}'")
        number = int(version)
        loaded = entry.versions.get(number)
        if loaded is None:
            if number in entry.failed:
                raise ModelNotReady(f"model '{name}' version {number}: {entry.failed[number]}")
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        return number, loaded

    def entry(self, name: str) -> ModelEntry[V]:
        """The entry of a known model."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model '{shorten(name)}'")
        return entry

    def entries(self) -> Iterator[ModelEntry[V]]:
        """Every model the repository has seen, by name."""
        for name in sorted(self._entries):
            yield self._entries[name]

    def serving(self, name: str = "", version: str = "") -> list[V]:
        """The loaded versions: of every model, of one model, or the one version named."""
        if name and version:
            return [self.get(name, version)[1]]
        entries = [self.entry(name)] if name else list(self.entries())
        return [e.versions[v] for e in entries for v in sorted(e.versions)]

    def index(self, ready_only: bool = False) -> list[IndexRow]:
        """Every model and version with its state; folders never loaded show as UNAVAILABLE."""
        rows: list[IndexRow] = []
        for entry in self.entries():
            rows.extend(IndexRow(entry.name, str(v), READY) for v in sorted(entry.versions))
            if ready_only:
                continue
            rows.extend(
                IndexRow(entry.name, str(v), UNAVAILABLE, reason)
                for v, reason in sorted(entry.failed.items())
            )
            if not entry.versions and not entry.failed:
                rows.append(IndexRow(entry.name, "", entry.state, entry.reason))
        if not ready_only:
            rows.extend(
                IndexRow(name, "", UNAVAILABLE, "not loaded")
                for name in self.model_names()
                if name not in self._entries
            )
        return rows

    def ready(self) -> bool:
        """Whether at least one model is serving."""
        return any(e.state == READY for e in self._entries.values())

    def _set(self, entry: ModelEntry[V], state: str, reason: str) -> None:
        entry.state, entry.reason = state, reason
        if self._on_state is not None:
            self._on_state(entry)
