"""The Ollama stand-in's scheduler (real Ollama's sched.go): one runner per loaded model,
started by the first request naming it, kept as long as the last request asked, stopped at
expiry, on unload or at shutdown; a load belongs to the request that started it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from reconciler.engines.demo import llama_server
from reconciler.engines.demo.ollama_log import log
from reconciler.engines.demo.ollama_models import LoadedModel, PulledModel
from reconciler.engines.demo.ollama_settings import OllamaSettings
from reconciler.engines.demo.options import READY_AFTER_S, EngineOptions
from reconciler.engines.demo.serving import set_after
from reconciler.engines.demo.worker_link import WorkerLink, first_set
from reconciler.kit import clock
from reconciler.kit.freeport import free_port

RUNNER_HOST = "127.0.0.1"  # serve always talks to its runners over loopback


class LoadError(Exception):
    """A runner died before it finished loading."""


class Scheduler:
    """The runners of ``ollama serve``: which models are loaded, loading, and for how long."""

    def __init__(self, opts: EngineOptions, settings: OllamaSettings, hang: asyncio.Event) -> None:
        self.opts = opts
        self.settings = settings
        self.hang = hang  # set soon after a load, under --fail hang-ready
        self.loaded: dict[str, LoadedModel] = {}
        self.starting: dict[str, LoadedModel] = {}  # runner started, model not loaded yet
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._links: list[WorkerLink] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ensure_loaded(self, model: PulledModel) -> LoadedModel:
        """Load ``model`` unless loaded; concurrent callers share one load.

        The load belongs to the request that started it: when that client hangs up, its
        handler is cancelled and so is the load (the runner is killed), as in Ollama. The
        other requests waiting on it then start a load of their own.
        """
        while True:
            current = self.loaded.get(model.name)
            if current is not None and not current.link.dead.is_set():
                return current
            task = self._loading.get(model.name)
            if task is None:
                task = asyncio.create_task(self._load(model))
                self._loading[model.name] = task
                task.add_done_callback(functools.partial(self._load_done, model.name))
                return await task  # cancelling this request cancels the load
            try:
                return await asyncio.shield(task)  # a waiter that leaves does not abort it
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # this request's own client left
                # else the load's own client left and it was aborted: load again for ours

    def _load_done(self, name: str, task: asyncio.Task[LoadedModel]) -> None:
        if self._loading.get(name) is task:
            del self._loading[name]
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not reported twice

    def _runner_settings(self, ready_fd: int) -> dict[str, Any]:
        opts = self.opts
        return {
            "ready_fd": ready_fd,
            "vram_mb": opts.vram_mb,
            "load_seconds": opts.boot_seconds,
            "fail": opts.fail,
            "escape": opts.worker_escapes,
        }

    async def _load(self, model: PulledModel) -> LoadedModel:
        port = free_port()
        shown = llama_server.shown_argv(self.settings.prefix, model.blob(self.settings.models), port, RUNNER_HOST)
        log(f"starting llama server: cmd={' '.join(shown)}", source="server.go:1")
        began = clock.monotonic()
        argv = llama_server.boot_argv(shown)
        link = WorkerLink.spawn(
            lambda _: argv,
            env_for=lambda ready_fd: llama_server.environment(shown, self._runner_settings(ready_fd)),
            escape=self.opts.worker_escapes,
        )
        self._links.append(link)
        self.starting[model.name] = LoadedModel(model, link, port)
        try:
            await first_set(link.ready, link.dead)
        except asyncio.CancelledError:
            log(
                f"load of {model.name} aborted: context canceled (the client went away)",
                level="WARN",
                source="sched.go:1",
            )
            await link.kill()
            raise
        finally:
            loaded = self.starting.pop(model.name)
        if not link.ready.is_set():
            code = await link.exit_code()
            message = f"llama runner process has terminated: exit status {code}"
            log(message, level="ERROR", source="sched.go:1")
            raise LoadError(message)
        log(f"llama runner started in {clock.monotonic() - began:.2f} seconds", source="server.go:1")
        self.loaded[model.name] = loaded
        self._background(self._watch(loaded))
        if self.opts.fail == "hang-ready":
            self._background(set_after(self.hang, READY_AFTER_S))
        return loaded

    @contextlib.asynccontextmanager
    async def using(self, model: PulledModel, keep: float | None) -> AsyncIterator[LoadedModel]:
        """Hold ``model`` loaded for one request; then keep it ``keep`` seconds (None: forever)."""
        loaded = await self.ensure_loaded(model)  # raises LoadError
        loaded.users += 1
        try:
            yield loaded
        finally:
            loaded.users -= 1
            self.set_expiry(loaded, keep)

    def set_expiry(self, loaded: LoadedModel, keep: float | None) -> None:
        """Set the expiry as the last request asked; once nobody uses it, unload at expiry."""
        loaded.keep(keep)
        if loaded.expiry is not None:
            loaded.expiry.cancel()
            loaded.expiry = None
        if keep is None or loaded.users:
            return
        loaded.expiry = asyncio.get_running_loop().call_later(
            clock.real_seconds(keep), lambda: self._background(self._expire(loaded))
        )

    async def _expire(self, loaded: LoadedModel) -> None:
        if loaded.users == 0 and self.loaded.get(loaded.pulled.name) is loaded:
            await self.unload(loaded.pulled.name)

    async def _watch(self, loaded: LoadedModel) -> None:
        """Forget a model whose runner died on its own (an unload removes it first)."""
        await loaded.link.dead.wait()
        code = await loaded.link.exit_code()
        if self.loaded.get(loaded.pulled.name) is loaded:
            del self.loaded[loaded.pulled.name]
            log(
                f"llama runner for {loaded.pulled.name} terminated: exit status {code}",
                level="ERROR",
                source="sched.go:1",
            )

    async def unload(self, name: str) -> None:
        loaded = self.loaded.pop(name, None)
        if loaded is not None:
            log(f"unloading {name}", source="sched.go:1")
            await loaded.link.stop()

    async def shutdown(self) -> None:
        """Stop loads and runners; escaped runners shrug off the SIGTERM and stay."""
        for task in [*self._loading.values(), *self._tasks]:
            task.cancel()
        await asyncio.gather(*(link.stop() for link in self._links))

    async def listed(self) -> list[LoadedModel]:
        """What /api/ps lists: loaded models; before 0.32.4 also those whose runner is still loading."""
        if self.settings.ps_waits_for_loads:
            loads = list(self._loading.values())
            if loads:
                await asyncio.wait(loads)  # waits for them without cancelling them
            return list(self.loaded.values())
        return [*self.loaded.values(), *self.starting.values()]
