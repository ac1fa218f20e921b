"""One Java process per game jar, shared by every environment object of this process.

TextWorldExpress and ScienceWorld are Java programs driven over py4j. Their own Python classes
start one JVM per environment object (0.3 s and ~100 MB each); the trainer makes a batch of
environments every step, so here all of them share one JVM and each gets its own game object
(``PythonInterface``) inside it. Game objects are pooled per (jar, game settings) and handed
to the next environment when theirs is garbage-collected, so a training step reuses warm ones.

A call that hangs cannot be interrupted from Python. ``retire()`` takes the JVM out of service:
new environments get a fresh one, and the old process is killed once the last environment still
using it lets go, which also ends the hung call's blocked socket read.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

_LOCK = threading.Lock()
_CURRENT: dict[str, Jvm] = {}


class Jvm:
    """A py4j gateway to a JVM running ``jar``; counted users, killed when retired and unused."""

    def __init__(self, jar: str, cwd: str):
        from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway

        port, self.proc = launch_gateway(classpath=jar, die_on_exit=True, cwd=cwd, return_proc=True,
                                         javaopts=["-Xverify:none"])
        self.gateway = JavaGateway(gateway_parameters=GatewayParameters(auto_field=True, port=port),
                                   java_process=self.proc)
        self.jar, self.users, self.retired = jar, 0, False
        self.pool: dict[Any, list[Any]] = {}

    def release(self, key: Any = None, server: Any = None) -> None:
        with _LOCK:
            self.users -= 1
            if server is not None and not self.retired:
                self.pool.setdefault(key, []).append(server)
            dead = self.retired and self.users == 0
        if dead:
            self.shutdown()

    def retire(self) -> None:
        with _LOCK:
            self.retired = True
            if _CURRENT.get(self.jar) is self:
                del _CURRENT[self.jar]
            dead = self.users == 0
        if dead:
            self.shutdown()

    def shutdown(self) -> None:
        try:
            self.gateway.shutdown()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


class GameHandle:
    """One environment's game object in the shared JVM; gives it back to the pool when collected."""

    def __init__(self, owner: Any, jar: str, cwd: str, key: Any, new_server: Callable[[Any], Any]):
        with _LOCK:
            jvm = _CURRENT.get(jar)
            if jvm is None or jvm.proc.poll() is not None:
                jvm = _CURRENT[jar] = Jvm(jar, cwd)
            jvm.users += 1
            pooled = jvm.pool.get(key)
            server = pooled.pop() if pooled else None
        if server is None:
            try:
                server = new_server(jvm.gateway.jvm)
            except BaseException:
                jvm.release()
                raise
        self.jvm, self.server, self.busy = jvm, server, False
        self._finalizer = weakref.finalize(owner, jvm.release, key, server)

    def call(self, method: str, *args) -> Any:
        self.busy = True
        try:
            result = getattr(self.server, method)(*args)
        finally:
            self.busy = False
        return result

    def close(self) -> None:
        """Let go of the game object; during a call (a hang) the JVM is retired instead of reused."""
        if self._finalizer.detach() is None:
            return
        if self.busy:
            self.jvm.retire()
        self.jvm.release()
