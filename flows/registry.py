"""Which flows the engine runs: one loaded version (offline) or a watched directory.

A ``LoadedFlows`` is one version of a flows directory: its domain, the understander built
for it, and ``version``, a hash of the files' content (the same files give the same
version, on every machine). The engine asks its ``FlowSource`` for ``current()`` when a
conversation starts a flow, and for ``get(version)`` while that flow runs, so a conversation
finishes a flow on the version it started it with.

``FlowRegistry`` loads a directory and, once ``start()``-ed, watches it (watchfiles): a
changed file is loaded in a worker thread, validated (flows/validate.py) and, only if the
whole directory is valid, made current in one assignment: no turn ever sees half of a
change. A directory with errors is rejected: the errors are logged (file:line:column) and
the old version stays current. So is a file that had content and is now empty: a save in
progress (editors truncate before they write), not a version. Old versions stay in memory
(the last ``keep``, least recently used dropped first) for the conversations still running
them; after a restart an unknown version falls back to ``current()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from watchfiles import Change, awatch

from flows.dsl import Domain
from flows.nlu import build_understander
from flows.ports import Understander
from flows.validate import FLOW_SUFFIXES, flow_files, load_flows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedFlows:
    version: str  # content hash of the files
    domain: Domain
    understander: Understander
    empty: frozenset[str] = frozenset()  # names of the files that were empty


class FlowSource(Protocol):
    def current(self) -> LoadedFlows: ...

    def get(self, version: str) -> LoadedFlows | None: ...


class FlowLoadError(ValueError):
    """A flows directory that does not load; ``problems`` are ``file:line:col: message``."""

    def __init__(self, directory: Path, problems: list[str]) -> None:
        self.directory = directory
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"the flows in {directory} have errors:\n  {shown}{more}")


def content_version(directory: Path) -> str:
    """A hash of the flow files' names and bytes (what ``load_flows`` reads)."""
    return _snapshot(directory)[0]


def _snapshot(directory: Path) -> tuple[str, frozenset[str]]:
    """The content version, and the names of the files that are empty (or only spaces)."""
    digest = hashlib.sha256()
    empty = set()
    for path in flow_files(directory):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0")
        digest.update(data)
        digest.update(b"\0")
        if not data.strip():
            empty.add(path.name)
    return digest.hexdigest()[:16], frozenset(empty)


# Loading the same content twice (every test's gateway, a reload that changed nothing)
# reuses the first result: a domain and its understander are immutable.
_CACHE: OrderedDict[tuple[str, str, frozenset[str] | None], LoadedFlows] = OrderedDict()
_CACHE_SIZE = 8
_CACHE_LOCK = threading.Lock()


def load_directory(directory: Path, actions: set[str] | None = None) -> LoadedFlows:
    """Load, validate and version a flows directory; raise FlowLoadError on any error.

    The version is the hash of the bytes the loader read: if a file changes while it is
    being loaded, the load is done again, so a version never names content it did not load.
    """
    directory = Path(directory)
    for _ in range(5):
        try:
            before, empty = _snapshot(directory)
        except OSError as exc:
            raise FlowLoadError(directory, [f"{directory}: {exc}"]) from None
        key = (str(directory.resolve()), before, frozenset(actions) if actions else None)
        with _CACHE_LOCK:
            cached = _CACHE.get(key)
            if cached is not None:
                _CACHE.move_to_end(key)
                return cached
        result = load_flows(directory, actions)
        if result.domain is None:
            raise FlowLoadError(directory, [str(p) for p in result.errors])
        with contextlib.suppress(OSError):
            if content_version(directory) != before:
                continue  # changed under us: load what is there now
        loaded = LoadedFlows(before, result.domain, build_understander(result.domain), empty)
        with _CACHE_LOCK:
            _CACHE[key] = loaded
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return loaded
    raise FlowLoadError(directory, [f"{directory}: the files kept changing while loading"])


class StaticFlows:
    """One version, for offline runs (stories, tests)."""

    def __init__(self, flows: LoadedFlows) -> None:
        self.flows = flows

    @classmethod
    def from_domain(cls, domain: Domain, version: str = "static") -> StaticFlows:
        return cls(LoadedFlows(version, domain, build_understander(domain)))

    @classmethod
    def from_dir(cls, directory: Path, actions: set[str] | None = None) -> StaticFlows:
        return cls(load_directory(directory, actions))

    def current(self) -> LoadedFlows:
        return self.flows

    def get(self, version: str) -> LoadedFlows | None:
        return self.flows if version == self.flows.version else None


class FlowRegistry:
    """A flows directory, loaded now (FlowLoadError if it has errors) and reloaded when its
    files change while the watcher runs (``start()`` / ``stop()``)."""

    def __init__(
        self,
        directory: Path,
        *,
        actions: set[str] | None = None,
        keep: int = 8,
        debounce_ms: int = 50,
    ) -> None:
        self.directory = Path(directory)
        self.actions = actions
        self.keep = max(1, keep)
        self.debounce_ms = debounce_ms
        first = load_directory(self.directory, actions)
        self._current = first
        self._versions: OrderedDict[str, LoadedFlows] = OrderedDict({first.version: first})
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.reloads = 0  # versions installed after the first
        self.rejected = 0  # loads that failed (the old version was kept)
        self.last_errors: list[str] = []

    # ------------------------------------------------------------------ source

    def current(self) -> LoadedFlows:
        return self._current

    def get(self, version: str) -> LoadedFlows | None:
        flows = self._versions.get(version)
        if flows is not None:
            self._versions.move_to_end(version)
        return flows

    @property
    def versions(self) -> list[str]:
        """The versions in memory, least recently used first."""
        return list(self._versions)

    # ------------------------------------------------------------------ reload

    def _install(self, flows: LoadedFlows) -> bool:
        if flows.version == self._current.version:
            return False
        self._current = flows
        self._versions[flows.version] = flows
        self._versions.move_to_end(flows.version)
        while len(self._versions) > self.keep:
            self._versions.popitem(last=False)
        self.reloads += 1
        log.info("flows: version %s of %s is live", flows.version, self.directory)
        return True

    async def reload(self) -> bool:
        """Load the directory again; True if a new version became current.

        On errors the current version stays, and every error is logged.
        """
        async with self._lock:  # one load at a time, installed in the order they ran
            try:
                flows = await asyncio.to_thread(load_directory, self.directory, self.actions)
                # An editor saving in place truncates the file first: valid YAML with no
                # flows in it, and a half-written change. (Delete a file to drop its flows.)
                if emptied := sorted(flows.empty - self._current.empty):
                    raise FlowLoadError(self.directory, [
                        f"{self.directory / name}:1:1: the file is empty (still being "
                        "written?); delete it to remove its flows" for name in emptied])
            except FlowLoadError as exc:
                self.rejected += 1
                self.last_errors = exc.problems
                log.error("flows: change rejected, version %s stays live; %s",
                          self._current.version, exc)
                return False
            self.last_errors = []
            return self._install(flows)

    # ----------------------------------------------------------------- watcher

    async def start(self) -> None:
        """Watch the directory; returns once the watcher runs (raises if it cannot)."""
        if self._task is not None:
            return
        self._stop = asyncio.Event()
        ready = asyncio.Event()
        self._task = task = asyncio.create_task(self._watch(ready), name="flows-watch")
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            self._task = None  # not running: a later start() tries again
            task.result()  # the watcher could not start: say why

    async def stop(self) -> None:
        """Stop watching (the watcher ends within ~50 ms; cancelled after 5 s)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        if not (await asyncio.wait({task}, timeout=5.0))[0]:
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled() and (failure := task.exception()) is not None:
            log.error("flows: watching %s had failed: %r", self.directory, failure)

    async def _watch(self, ready: asyncio.Event) -> None:
        """Reload on every batch of changes. The directory at the path is watched: if it is
        replaced (a deploy, ``git checkout``), the watch moves to the new one."""
        while not self._stop.is_set():
            where = _identity(self.directory)
            if where is None and ready.is_set():  # gone for now: wait for it to come back
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.1)
                continue
            await self._watch_one(ready, where)

    async def _watch_one(self, ready: asyncio.Event, where: tuple[int, int] | None) -> None:
        def wanted(_: Change, path: str) -> bool:
            name = Path(path).name
            return name.endswith(FLOW_SUFFIXES) and not name.startswith((".", "~"))

        # The first (empty) batch comes after one rust_timeout: the watcher is live then.
        watcher = awatch(
            self.directory, watch_filter=wanted, debounce=self.debounce_ms, step=20,
            stop_event=self._stop, recursive=False, yield_on_timeout=True, rust_timeout=50,
        )
        fresh = True
        async for changes in watcher:
            ready.set()
            replaced = _identity(self.directory) != where
            if fresh or replaced:  # what changed before the watch began, or a new directory
                changes = {(Change.modified, str(self.directory))}  # noqa: PLW2901
                fresh = False
            if changes:
                try:
                    await self.reload()
                except Exception:  # a bug here must not end hot reload for good
                    log.exception("flows: reloading %s failed", self.directory)
            if replaced:
                return  # watch the directory that is there now


def _identity(directory: Path) -> tuple[int, int] | None:
    """Which directory is at this path now (device, inode); None if there is none."""
    try:
        status = directory.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino
