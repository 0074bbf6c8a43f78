"""`loom bench`: Loom against its peers and against this machine's own limits, measured side by side.

Every number comes from one run on one machine. The machine may be shared and noisy, so:

* each configuration lives in its own forked worker process group (its own thread count, its own
  gloo world, its own memory) and waits on a pipe while the others run;
* configurations are measured in alternating rounds (A, B, C, then B, C, A, …) and the hardware
  probe (dense matmul FLOP/s, tensor-copy bandwidth) runs in every round too;
* step times are medians over all measured steps; ratios are medians of the per-round ratios, so a
  slow spell that hits one round hits both sides of its ratio;
* around every measurement the coordinator reads how much CPU the rest of the machine used
  (/proc/stat minus our workers' own time): rounds where nobody else ran are reported separately,
  and `--quiet-wait` makes rounds wait (and redo disturbed measurements) for such moments;
* the technique table carries an A/A control (two identical baseline processes) whose ratio is the
  noise floor of that run.

On two cores a two-threaded process that shares the machine with anything else slows down far
more than its share (every OpenMP barrier waits for a descheduled thread), so disturbed rounds are
several times slower, not a few percent. Absolute numbers mean something only next to the hardware
numbers of the same run; ratios are the result. Nothing here asserts a timing:
`tests/test_bench_smoke.py` only checks that the harness runs and prints its tables.

Sections (all in `run_bench`): hardware ceiling, peers (Loom vs Hugging Face `LlamaForCausalLM`
with SDPA vs megatron-core `GPTModel` with the local spec), technique overhead (time and memory),
parallel layouts (1 process vs DP2/TP2/PP2), ZeRO 0-3 per-rank bytes against theory, data path.

Modules: `shapes` (what is measured), `hardware` (the machine's limits and load), `workloads` and
`loom_workload` (what a worker runs), `memory` (byte accounting), `workers` (forked process groups),
`alternate` (rounds and paired ratios), `scaling_model` and `scaling_table` (the analytic data-parallel
model the `scaling` section extrapolates with), `options`, `section_*` (one table each, registered in
`sections`), `report` (markdown) and `run` (`run_bench`).
"""

import os

# set before any worker forks, so transformers never reaches for the network or floods stderr
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
