"""Admission of RPCs to the engine: closed until the model is ready, closed again while draining,
and the RPCs inside, so that a graceful shutdown can wait for them and, once its grace period
is over, cut them short with a status that says why.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gpt2_service.api.status import DrainingError, NotReadyError
from gpt2_service.engine.frontend import Engine

DRAINING_CUT_MESSAGE = "the server's grace period for shutting down ended before this call finished; retry elsewhere"


class ServingGate:
    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._draining = False
        self._num_active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def open(self, engine: Engine) -> None:
        """The engine is started and warmed up: let RPCs in."""
        self._engine = engine

    def close(self) -> None:
        """Draining: new RPCs are refused with UNAVAILABLE; those inside go on."""
        self._draining = True
        if self._engine is not None:
            self._engine.stop_accepting()

    @property
    def num_active(self) -> int:
        return self._num_active

    def cut_active(self) -> None:
        """The grace period is over: every generation still running ends with DrainingError, so
        its RPC ends UNAVAILABLE with the DRAINING reason (a client knows to retry elsewhere)."""
        if self._engine is not None:
            self._engine.abort_all(DrainingError(DRAINING_CUT_MESSAGE))

    async def wait_idle(self) -> None:
        """Return once no RPC is inside."""
        await self._idle.wait()

    @asynccontextmanager
    async def enter(self) -> AsyncIterator[Engine]:
        """Hold a place for one RPC; raises DrainingError / NotReadyError when closed."""
        if self._draining:
            raise DrainingError("the server is shutting down; retry on another replica")
        if self._engine is None:
            raise NotReadyError("the model is still loading; retry shortly")
        self._num_active += 1
        self._idle.clear()
        try:
            yield self._engine
        finally:
            self._num_active -= 1
            if self._num_active == 0:
                self._idle.set()
