"""The GPU check's coordinator: every check in its own process with its own time limit, all within one
wall-clock budget; results as JSON and markdown under $OUT, and a summary table on stdout.

    python -m tests.gpu.check [--dry-run] [--budget SECONDS] [--jobs N] [--only a,b] [--data DIR]

Phase 1 runs the correctness checks side by side (`--jobs` at a time: they are small, the GPU has
room for all of them); phase 2 runs the benchmark alone, with whatever time is left. A check that
fails, crashes or times out is recorded and the others go on. `--dry-run` runs everything on the CPU
at tiny shapes (gloo, the same wiring), in a few minutes. See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.gpu.common import REPO, Context, Result, child_env


@dataclass(frozen=True)
class Check:
    name: str
    target: str
    """module:function taking a Context and returning a Result."""
    timeout: float
    """Seconds on the GPU (the dry run allows 3× as much: two shared CPU cores)."""
    alone: bool = False
    """Runs after the others, by itself (timing)."""
    what: str = ""


CHECKS = [
    Check("environment", "tests.gpu.checks_env:environment", 120, what="device, versions, every import"),
    *(
        Check(f"train-zero{z}", f"tests.gpu.checks_train:train_zero{z}", 300, what=f"bf16 ZeRO-{z} + resume")
        for z in range(4)
    ),
    Check("to-hf", "tests.gpu.checks_train:to_hf", 300, what="export, load on device, logits vs Loom"),
    Check("gloo-cuda-collectives", "tests.gpu.checks_layouts:collectives", 240, what="gloo ops on CUDA tensors"),
    Check("tp2-one-gpu", "tests.gpu.checks_layouts:tp2", 300, what="TP=2, 2 ranks on 1 GPU"),
    Check("pp2-one-gpu", "tests.gpu.checks_layouts:pp2", 300, what="PP=2, 2 ranks on 1 GPU"),
    Check("bench", "tests.gpu.checks_bench:bench", 330, alone=True, what="loom bench --device cuda"),
]
BENCH_RESERVE_S = 200
"""Budget kept for the benchmark while phase 1 runs (phase-1 checks are cut to leave it)."""


def _prepare_data(args, work: Path) -> dict:
    from tests.gpu.gpu_data import load_info, prepare

    if args.data:
        return load_info(args.data)
    carried = REPO / ".gpu-data"
    if not args.dry_run and (carried / "info.json").is_file():
        return load_info(carried)
    # no carried data (or a dry run): a generated corpus, small and quick (its ~100 words allow a small vocabulary)
    seq, documents = (64, 400) if args.dry_run else (512, 3000)
    return prepare(work / "data", synthetic=True, vocab_size=384, seq_length=seq, documents=documents)


def _dry_precision() -> str:
    """bf16 where this CPU trains in it (AVX-512: torch's CPU attention backward), else fp32."""
    code = "import sys; from loom.launch.bench.workloads_gpu import bf16_attention_backward_works as ok; "
    code += "sys.exit(not ok())"
    works = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env()).returncode == 0
    return "bf16" if works else "fp32"


def _run_check(check: Check, args, out: Path, data_json: Path, deadline: float) -> Result:
    """`check` in a child process (`--one`), killed at its deadline; its Result file is read back."""
    import psutil

    result_file = out / "checks" / f"{check.name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "tests.gpu.check",
        "--one",
        check.name,
        "--out",
        str(out),
        "--data-json",
        str(data_json),
    ]
    cmd += ["--deadline-in", f"{deadline - time.monotonic():.1f}", "--work", args.work]
    cmd += ["--dry-run"] if args.dry_run else []
    start = time.monotonic()
    log = (out / "logs" / f"{check.name}.log").open("a")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()) + 15)  # the child stops itself first
        timed_out = False
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait()
        timed_out = True
    log.close()
    seconds = time.monotonic() - start
    if result_file.is_file():
        result = Result.read(result_file)
    elif timed_out:
        result = Result(check.name, "timeout", f"killed after {seconds:.0f} s (its time limit)")
    else:
        tail = (out / "logs" / f"{check.name}.log").read_text(errors="replace").strip().splitlines()[-1:]
        result = Result(check.name, "fail", f"exited {proc.returncode} without a result: {' '.join(tail)[:300]}")
    result.seconds = seconds
    return result


def run_one(name: str, out: Path, data: dict, dry: bool, seconds: float, work: Path) -> int:
    """Child side: run one check, always leave a Result file."""
    check = next(c for c in CHECKS if c.name == name)
    ctx = Context(name, out, dry, data, time.monotonic() + seconds, work)
    module, function = check.target.split(":")
    start = time.monotonic()
    try:
        result = getattr(importlib.import_module(module), function)(ctx)
    except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, and the others go on
        import traceback

        ctx.log(traceback.format_exc())
        result = Result(name, "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400])
    result.seconds = time.monotonic() - start
    result.write(out / "checks" / f"{name}.json")
    return 0


def _summary(results: list[Result], args, started: str, elapsed: float, data: dict) -> str:
    mode = "dry run (CPU, tiny shapes)" if args.dry_run else "GPU"
    lines = [
        f"# Loom GPU check — {mode}",
        "",
        f"Started {started}; {elapsed:.0f} s of a {args.budget:.0f} s budget; data: {data['source']} "
        f"(vocab {data['vocab_size']}, seq {data['seq_length']}).",
        "",
        "| check | status | seconds | result |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.summary.replace('|', chr(92) + '|')} |")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "xfail", "fail", "timeout", "skip")}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
    bench = Path(args.out) / "bench.md"
    if bench.is_file():
        lines += ["## Benchmark (`loom bench --device cuda`)", "", bench.read_text(), ""]
    return "\n".join(lines) + "\n"


def _bundle_logs(out: Path) -> None:
    """logs/ and checks/ as one logs.tar.gz: the device tool brings back only a few files per run
    (results.json holds every check's result anyway)."""
    import tarfile

    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for sub in ("logs", "checks"):
            if (out / sub).is_dir():
                tar.add(out / sub, arcname=sub)
    for sub in ("logs", "checks"):
        shutil.rmtree(out / sub, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes (proves the wiring)")
    p.add_argument("--budget", type=float, default=480.0, help="wall-clock seconds for all checks (default 480)")
    p.add_argument("--jobs", type=int, default=None, help="phase-1 checks at a time (default 8 on GPU, 2 dry)")
    p.add_argument("--only", default=None, help="comma list of check names")
    p.add_argument("--data", default=None, help="a data folder written by tests.gpu.gpu_data (default .gpu-data)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-out")
    p.add_argument(
        "--work",
        default=os.environ.get("GPU_CHECK_WORK") or os.path.join(tempfile.gettempdir(), "loom-gpu-check"),
        help="scratch folder for runs, checkpoints and exports (kept out of --out, whose files travel back)",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline-in", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    args.work = str(Path(args.work).resolve())
    if args.one:
        data = json.loads(Path(args.data_json).read_text())
        return run_one(args.one, out, data, args.dry_run, args.deadline_in, Path(args.work))

    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    deadline = t0 + args.budget
    for sub in ("checks", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    chosen = [c for c in CHECKS if not args.only or c.name in args.only.split(",")]
    for name in [c.name for c in CHECKS] + ["data"]:  # a previous run's checkpoints would be resumed
        shutil.rmtree(Path(args.work) / name, ignore_errors=True)
    data = _prepare_data(args, Path(args.work))
    data["precision"] = _dry_precision() if args.dry_run else "bf16"
    Path(args.work).mkdir(parents=True, exist_ok=True)
    data_json = Path(args.work) / "data.json"
    data_json.write_text(json.dumps(data, indent=1))
    scale = 3.0 if args.dry_run else 1.0
    jobs = args.jobs or (2 if args.dry_run else 8)
    has_bench = any(c.alone for c in chosen)
    phase1_end = deadline - (BENCH_RESERVE_S if has_bench and not args.dry_run else 0)

    def launch(check: Check, end: float) -> Result:
        limit = min(time.monotonic() + check.timeout * scale, end)
        print(
            f"[{time.monotonic() - t0:5.0f}s] {check.name}: started (limit {limit - time.monotonic():.0f} s)",
            flush=True,
        )
        result = _run_check(check, args, out, data_json, limit)
        print(f"[{time.monotonic() - t0:5.0f}s] {check.name}: {result.status} — {result.summary}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        phase1 = list(pool.map(lambda c: launch(c, phase1_end), [c for c in chosen if not c.alone]))
    phase2 = [launch(c, deadline) for c in chosen if c.alone]
    results = phase1 + phase2
    elapsed = time.monotonic() - t0
    (out / "results.json").write_text(
        json.dumps(
            {
                "mode": "dry-run" if args.dry_run else "gpu",
                "started": started,
                "seconds": elapsed,
                "data": data,
                "checks": [r.__dict__ for r in results],
            },
            indent=1,
            default=str,
        )  # fmt: skip
    )
    summary = _summary(results, args, started, elapsed, data)
    (out / "summary.md").write_text(summary)
    _bundle_logs(out)
    print("\n" + summary.split("## Benchmark")[0], flush=True)
    print(f"results: {out / 'results.json'}, {out / 'summary.md'}, logs in {out / 'logs.tar.gz'}", flush=True)
    return 0 if all(r.status in ("pass", "xfail", "skip") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
