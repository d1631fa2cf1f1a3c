"""Lost peers in a multi-process run: the survivors stop with one line instead of a C++ abort.

When a process of a `jax.distributed` run dies (SIGKILL, OOM, a lost host), the others block in their
next collective until the coordination service's heartbeat timeout, then the runtime aborts them with a
fatal log and a thread dump. So each process writes a counter into the coordination service's key-value
store every few seconds, and a watchdog thread ends this process (exit `EXIT_PEER_LOST`) with one line
when a peer's counter has not moved for `timeout_s` (half the runtime's heartbeat timeout, so the
watchdog always speaks first), or when the store itself (process 0) is unreachable. The thread only
reads and writes small keys; it never touches devices, so it works while the main thread is blocked.
"""

from __future__ import annotations

import os
import sys
import threading
import time

EXIT_PEER_LOST = 4
_KEY = "parcae_jax/alive/{}"
_DONE = "done"


class PeerWatch:
    """Started after `jax.distributed.initialize()` in a multi-process run; the farewell line names the
    newest checkpoint step in `workdir` (the one a rerun resumes from)."""

    def __init__(self, timeout_s: float, workdir: str):
        import jax
        from jax._src import distributed  # the runtime's own client: jax has no public handle on it

        self.client = distributed.global_state.client
        self.process, self.count = jax.process_index(), jax.process_count()
        self.timeout_s = float(timeout_s)
        self.interval_s = max(self.timeout_s / 6, 0.2)
        self.workdir = workdir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="parcae-peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        if self.client is not None and self.count > 1:
            self._thread.start()
        return self

    def settle(self) -> None:
        """Called when the run failed: give the watchdog time to find a lost peer (it then ends the
        process with its one line), so an error that is only the echo of a dead peer is not reported."""
        if self._thread.is_alive():
            self._thread.join(timeout=3 * self.timeout_s)

    def stop(self) -> None:
        """This process is done on purpose: tell the peers, so they do not take it for lost."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            try:
                self.client.key_value_set(_KEY.format(self.process), _DONE, allow_overwrite=True)
            except Exception:
                pass  # the coordinator already left: nobody is watching any more

    def _run(self) -> None:
        beat = 0
        seen = {p: (None, time.monotonic()) for p in range(self.count) if p != self.process}
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                self.client.key_value_set(_KEY.format(self.process), str(beat), allow_overwrite=True)
                values = {p: self._read(p) for p in seen}
            except Exception:  # the store lives in process 0: unreachable means process 0 is gone
                if self._stop.is_set():
                    return
                self._farewell("process 0 (the coordinator) is gone")
            now = time.monotonic()
            for p, value in values.items():
                last, since = seen[p]
                if value == _DONE:
                    continue  # finished on purpose
                if value != last:
                    seen[p] = (value, now)
                    continue
                # A peer that has not written yet may still be starting (imports, compilation).
                if now - since > (self.timeout_s if value is not None else 3 * self.timeout_s):
                    self._farewell(f"process {p} is gone (no sign of life for {now - since:.0f} s)")

    def _read(self, p: int) -> str | None:
        try:
            return self.client.key_value_try_get(_KEY.format(p))
        except Exception as e:  # not written yet
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def _farewell(self, what: str) -> None:
        if self._stop.is_set():
            return  # the run is ending on purpose; peers leave at different moments
        from parcae_jax.checkpointing import finished_steps

        steps = finished_steps(self.workdir)
        step = f"step {max(steps)}" if steps else "none"
        print(f"error: {what}; last checkpoint: {step}; rerun the same command on every process to resume "
              f"(exit {EXIT_PEER_LOST})", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)  # a clean exit would wait on collectives that can never finish
