"""What every GPU check shares: its context (mode, folders, data), its result, subprocesses with a
time limit, TensorBoard scalars, and a one-rank process group for in-process model work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the checks fork worker processes that use CUDA: asking whether CUDA exists must not initialise it here
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
STATUSES = ("pass", "xfail", "fail", "timeout", "skip")
"""pass; xfail = a known limitation showed up as expected (the summary says which); fail; timeout; skip."""


@dataclass
class Result:
    name: str
    status: str = "pass"
    summary: str = ""
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    def fail(self, summary: str) -> "Result":
        self.status, self.summary = "fail", summary
        return self

    @classmethod
    def read(cls, path: Path) -> "Result":
        return cls(**json.loads(path.read_text()))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1, default=str))


@dataclass
class Context:
    """One check's view of the run: `dry` (CPU, tiny shapes) or the GPU machine."""

    name: str
    out: Path
    dry: bool
    data: dict
    deadline: float
    """time.monotonic() by which the check must be done (its own timeout, within the run's budget)."""
    work_root: Path
    """Scratch space (runs, checkpoints, exports): outside $OUT, whose files travel back from the GPU."""

    @property
    def work(self) -> Path:
        path = self.work_root / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def log_path(self) -> Path:
        return self.out / "logs" / f"{self.name}.log"

    @property
    def device_type(self) -> str:
        return "cpu" if self.dry else "cuda"

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, line: str) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


@dataclass
class Run:
    returncode: int
    seconds: float
    output: str
    timed_out: bool = False
    hung_after_error: bool = False
    """It printed a traceback, then neither exited nor printed anything for HUNG_AFTER_ERROR_S."""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])

    def error_line(self) -> str:
        """The most telling line of a failed run: the last `error:`/exception line."""
        lines = [x.strip() for x in self.output.splitlines() if x.strip()]
        for line in reversed(lines):
            if line.startswith("error:") or "Error:" in line or "Exception:" in line:
                return line[:400] + (" (then hung at exit)" if self.hung_after_error else "")
        return (lines[-1] if lines else "no output")[:400]


HUNG_AFTER_ERROR_S = 30.0


def _kill_tree(pid: int) -> None:
    """SIGKILL the process group the command leads (its own session): it, and children that outlived it."""
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_command(ctx: Context, args: list[str], timeout: float | None = None, env: dict | None = None) -> Run:
    """Run `args`, its output streamed into the check's log; killed (with its children) at the deadline,
    or when it printed a traceback and then went silent without exiting (a process that hangs at exit
    after an error, e.g. joining a data-loader worker, would otherwise hold the check until its limit)."""
    limit = max(5.0, min(timeout or 1e9, ctx.seconds_left() - 5))
    ctx.log("$ " + " ".join(args))
    start = time.monotonic()
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    last_output = [time.monotonic()]

    def read() -> None:
        with open(ctx.log_path, "a") as log:
            for line in proc.stdout:
                lines.append(line)
                last_output[0] = time.monotonic()
                log.write(line)
                log.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = hung = False
    while proc.poll() is None:
        time.sleep(0.5)
        if time.monotonic() - start > limit:
            timed_out = True
        elif any("Traceback (most recent call last)" in x for x in lines[-400:]):
            hung = time.monotonic() - last_output[0] > HUNG_AFTER_ERROR_S
        if timed_out or hung:
            _kill_tree(proc.pid)
            break
    proc.wait()
    reader.join(timeout=10)
    if reader.is_alive():  # a leftover child still holds the pipe
        _kill_tree(proc.pid)
        reader.join(timeout=5)
    run = Run(proc.returncode, time.monotonic() - start, "".join(lines), timed_out, hung)
    what = " (killed: time limit)" if timed_out else (" (killed: hung after an error)" if hung else "")
    ctx.log(f"exit {run.returncode} after {run.seconds:.1f}s{what}")
    return run


def loom_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "loom.launch.cli", *args]


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def single_rank_grid(dry: bool):
    """A world of one (NCCL on the GPU, gloo in the dry run) with megatron-core's grid on it."""
    import torch.distributed as dist

    from loom.launch.runtime.fork import free_port
    from loom.model.parallel import cpu_compat
    from loom.model.parallel.config import ParallelConfig
    from loom.model.parallel.groups import init_parallel_groups

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        if not dry:
            import torch

            torch.cuda.set_device(0)
        dist.init_process_group("gloo" if dry else "nccl", rank=0, world_size=1)
    cpu_compat.apply()
    return init_parallel_groups(ParallelConfig())
