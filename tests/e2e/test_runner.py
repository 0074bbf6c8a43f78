"""The end-to-end helpers themselves: a whole-job kill reaches processes in sessions of their own."""

import os
import subprocess
import sys
import time

import psutil

from tests.e2e.runner import kill_process_tree

# a launcher that starts a worker in a new session, as torchrun does, prints the worker's pid, then waits
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(worker.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_process_tree_reaches_workers_in_their_own_session():
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    worker = None
    try:
        worker = int(launcher.stdout.readline())
        assert os.getpgid(worker) != os.getpgid(launcher.pid)  # out of reach of killpg(launcher)
        assert kill_process_tree(launcher.pid) is True
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker), "the worker in its own session survived"
        assert kill_process_tree(launcher.pid) is False  # nothing left alive
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
        if worker is not None and not _gone(worker):  # a failing test leaves it running: by pid, if still ours
            try:
                survivor = psutil.Process(worker)
                if "time.sleep(600)" in " ".join(survivor.cmdline()):
                    survivor.kill()
            except psutil.NoSuchProcess:
                pass
        launcher.stdout.close()
