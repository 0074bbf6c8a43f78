"""The `bench` check: `loom bench --device cuda` (the `gpu` section) within the time left, its report
kept as $OUT/bench.md. The check proves the benchmark runs; its verdicts are results, not failures."""

from __future__ import annotations

from tests.gpu.common import Context, Result, loom_args, run_command


def bench(ctx: Context) -> Result:
    result = Result(ctx.name)
    report = ctx.out / "bench.md"
    report.unlink(missing_ok=True)
    limit = max(30.0, ctx.seconds_left() - 40)  # start-up, report and shut-down fit in the rest
    args = ["bench", "--device", "cuda", "--time-limit", f"{limit:.0f}", "--out", str(report), "--silent"]
    run = run_command(ctx, loom_args(*args, *(["--dry-run"] if ctx.dry else [])))
    if run.returncode != 0 or not report.is_file():
        return result.fail(f"loom bench exited {run.returncode}: {run.error_line()}")
    text = report.read_text()
    verdicts = [line for line in text.splitlines() if line.startswith("| ") and ("met (" in line or "missed" in line)]
    rows = [  # the configurations table: a measured row names its peak memory, the others why it has none
        line
        for line in text.splitlines()
        if line.startswith("| ") and (" GiB |" in line or "skipped (time limit)" in line or "failed:" in line)
    ]
    result.details.update(verdicts=verdicts, rows=rows, time_limit_s=limit)
    skipped = sum("skipped (time limit)" in line for line in rows)
    failed = [line.split("|")[1].strip() for line in rows if "failed:" in line]
    if failed:
        return result.fail(f"configurations failed: {', '.join(failed)} (see bench.md)")
    met = sum("met (" in v for v in verdicts)
    result.summary = (
        f"{len(rows) - skipped} configurations measured, {skipped} skipped (time limit {limit:.0f} s); "
        f"targets met {met}/{len(verdicts)} (bench.md)"
    )
    return result
