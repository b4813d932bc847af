"""Triton's model-control modes over the model repository: none, explicit and poll.

- `none` (the default): every model is loaded at start; load and unload over the API are refused
  with an error that names the flag, so no client can change what is served.
- `explicit`: load and unload over the API are allowed; `--load-model NAME` (repeatable, `*` for
  all) chooses what loads at start, nothing when not given.
- `poll`: every model is loaded at start, then the repository is scanned every
  `--repository-poll-secs`: a new model folder is loaded, a changed one (config, labels, a version
  folder added, changed or removed) reloaded, a removed one unloaded. A reload that fails leaves
  the versions that were serving in place. The API cannot load or unload, as in Triton.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ModelControlDisabled, ModelLoadError, ModelNotFound
from .repository import ModelEntry, ModelRepository

log = logging.getLogger(__name__)

NONE = "none"
EXPLICIT = "explicit"
POLL = "poll"
MODES = (NONE, EXPLICIT, POLL)
ALL_MODELS = "*"

# A model folder's state as the poller sees it: (relative path, mtime_ns, size) for each file in
# the folder and in its subfolders one level down (config, labels, <version>/model files).
Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(directory: Path) -> Fingerprint:
    """What the poller compares between scans for one model folder (empty if it vanished)."""
    found: list[tuple[str, int, int]] = []

    def scan(folder: Path, prefix: str, depth: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for item in entries:
            if item.name.startswith("."):
                continue
            try:
                if item.is_dir():
                    if depth > 0:
                        found.append((prefix + item.name + "/", 0, 0))
                        scan(Path(item.path), prefix + item.name + "/", depth - 1)
                    continue
                st = item.stat()
            except OSError:  # removed while we looked: the next scan sees the rest
                continue
            found.append((prefix + item.name, st.st_mtime_ns, st.st_size))

    scan(directory, "", 1)
    return tuple(sorted(found))


def snapshot(repository: ModelRepository[Any]) -> dict[str, Fingerprint]:
    """Fingerprints of every model folder in the repository now."""
    return {name: fingerprint(repository.root / name) for name in repository.model_names()}


class ModelControl:
    """Loads models at start and changes them afterwards as the mode allows."""

    def __init__(
        self,
        repository: ModelRepository[Any],
        mode: str = NONE,
        load_models: Sequence[str] = (),
        poll_secs: float = 15.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"model control mode must be one of {', '.join(MODES)}")
        if load_models and mode != EXPLICIT:
            raise ValueError("--load-model needs --model-control-mode explicit")
        self.repository = repository
        self.mode = mode
        self.load_models = tuple(load_models)
        self.poll_secs = poll_secs
        self._seen: dict[str, Fingerprint] = {}
        self._poller: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Load what the mode says to load at start; in poll mode, start watching.

        Raises ModelLoadError when the repository is not a folder or `--load-model` names a model
        the repository lacks; a model that fails to load is recorded as unavailable.
        """
        if self.mode == EXPLICIT:
            await self._load_chosen()
            return
        if self.mode == POLL:
            # before loading: a change made while loading is picked up by the first scan
            self._seen = await asyncio.to_thread(snapshot, self.repository)
        await self.repository.load_all()
        if self.mode == POLL:
            self._poller = asyncio.create_task(self._poll_forever(), name="repository-poller")

    async def _load_chosen(self) -> None:
        if not self.repository.root.is_dir():
            raise ModelLoadError(f"model repository {self.repository.root} is not a folder")
        available = self.repository.model_names()
        if ALL_MODELS in self.load_models:
            names = available
        else:
            missing = [n for n in self.load_models if n not in available]
            if missing:
                raise ModelLoadError(
                    f"--load-model names models the repository lacks: {', '.join(missing)}"
                )
            names = list(dict.fromkeys(self.load_models))
        if not names:
            log.info("model control explicit: no model loaded at start (see --load-model)")
        for name in names:
            with contextlib.suppress(ModelLoadError):
                await self.repository.load(name)

    def _refuse(self, action: str) -> None:
        if self.mode == EXPLICIT:
            return
        if self.mode == POLL:
            raise ModelControlDisabled(
                f"model {action} over the API is not allowed with --model-control-mode poll: "
                "the server follows the repository folder"
            )
        raise ModelControlDisabled(
            f"model {action} over the API is disabled (--model-control-mode none); start the "
            "server with --model-control-mode explicit to allow it"
        )

    async def load(self, name: str) -> ModelEntry[Any]:
        """RepositoryModelLoad: (re)load a model, if the mode allows it."""
        self._refuse("load")
        return await self.repository.load(name)

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: stop serving a model, if the mode allows it."""
        self._refuse("unload")
        await self.repository.unload(name)

    async def poll_once(self) -> None:
        """One scan: load new model folders, reload changed ones, unload removed ones."""
        now = await asyncio.to_thread(snapshot, self.repository)
        known = {entry.name for entry in self.repository.entries()}
        for name in sorted(set(self._seen) | set(now)):
            if self._stopping.is_set():
                return
            before, after = self._seen.get(name), now.get(name)
            if after is None:
                self._seen.pop(name, None)
                if name in known and self.repository.entry(name).versions:
                    log.info("poll: model %s was removed from the repository, unloading", name)
                    await self.repository.unload(name)
                continue
            if before == after and name in known:
                continue
            self._seen[name] = after  # a change that fails is not retried until it changes again
            log.info("poll: model %s is %s, loading", name, "new" if before is None else "changed")
            try:
                await self.repository.load(name)
            except (ModelLoadError, ModelNotFound) as exc:
                log.warning("poll: %s (the versions serving before stay)", exc)

    async def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.poll_secs)
            if self._stopping.is_set():
                return
            try:
                await self.poll_once()
            except Exception:
                log.exception("poll: repository scan failed; trying again next time")

    async def stop(self) -> None:
        """Stop polling; a load in progress finishes first so the repository stays consistent."""
        self._stopping.set()
        if self._poller is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None


__all__ = [
    "ALL_MODELS",
    "EXPLICIT",
    "MODES",
    "NONE",
    "POLL",
    "ModelControl",
    "fingerprint",
    "snapshot",
]
