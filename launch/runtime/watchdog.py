"""Name the rank that went missing when a collective fails or times out.

Gloo and NCCL report a dead or hung peer only as a closed connection or a timeout, without saying
which rank it was. Every rank therefore stamps a heartbeat into the job's key-value store (the one
torchrun / the rendezvous already runs) from a background thread; when a collective fails, the
survivors read the stamps and name the ranks that went quiet first.
"""

from __future__ import annotations

import threading
import time

import torch.distributed as dist

PERIOD_S = 2.0


class Heartbeat:
    def __init__(self):
        self.store = dist.distributed_c10d._get_default_store()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="loom-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.set(f"loom/heartbeat/{self.rank}", repr(time.time()))
            except Exception:  # the store host itself is gone; nothing left to report to
                return
            self._stop.wait(PERIOD_S)

    def stop(self) -> None:
        self._stop.set()

    def silent_ranks(self, quiet_for_s: float = 4 * PERIOD_S) -> dict[int, float]:
        """{rank: seconds since its last heartbeat} for ranks quiet longer than `quiet_for_s`."""
        now, silent = time.time(), {}
        for rank in range(self.world):
            key = f"loom/heartbeat/{rank}"
            try:
                stamp = float(self.store.get(key)) if self.store.check([key]) else 0.0
            except Exception:
                stamp = 0.0
            if now - stamp > quiet_for_s:
                silent[rank] = now - stamp if stamp else float("inf")
        return silent

    def explain(self, exc: BaseException, wait_s: float = 5 * PERIOD_S) -> str:
        """A dead peer breaks the connection at once, before its heartbeat is stale: wait a little."""
        deadline = time.time() + wait_s
        silent = self.silent_ranks()
        while not silent and time.time() < deadline:
            time.sleep(PERIOD_S / 2)
            silent = {r: s for r, s in self.silent_ranks().items() if r != self.rank}
        if not silent:
            return f"a collective failed ({str(exc).splitlines()[0][:200]})"
        names = ", ".join(
            f"rank {r} (silent for {s:.0f} s)" if s != float("inf") else f"rank {r} (never seen)"
            for r, s in sorted(silent.items())
        )
        return (
            f"lost contact with {names}: it died, hung or was cut off; the collective failed with: "
            f"{str(exc).splitlines()[0][:200]}"
        )
