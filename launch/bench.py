"""`loom bench`'s public names in one place; the code lives in the `launch.benchmark` package
(its docstring explains how the measurements are made)."""
from launch.benchmark.alternate import Series, alternate, paired_ratio, quiet_paired_ratio
from launch.benchmark.hardware import QUIET_CORES, CpuMeter, Hardware, Probe, copy_bandwidth, matmul_flops
from launch.benchmark.memory import SavedTensorMeter, tensor_bytes
from launch.benchmark.options import BenchOptions
from launch.benchmark.report import Report
from launch.benchmark.run import run_bench
from launch.benchmark.sections import (SECTIONS, section_data, section_layouts, section_peers, section_techniques,
                                       section_zero, technique_configs)
from launch.benchmark.shapes import EOS, SHAPES, Shape, flops_per_token, model_config, token_batch
from launch.benchmark.trainer import LoomTrainer
from launch.benchmark.workers import BenchError, WorkerGroup, preimport, worker_groups
from launch.benchmark.workloads import (DataPath, PlainLoop, Workload, build_hf_llama, build_loom_plain,
                                        build_megatron_gpt, init_grid)

__all__ = [
    "BenchError", "BenchOptions", "CpuMeter", "DataPath", "EOS", "Hardware", "LoomTrainer", "PlainLoop", "Probe",
    "QUIET_CORES", "Report", "SECTIONS", "SHAPES", "SavedTensorMeter", "Series", "Shape", "WorkerGroup", "Workload",
    "alternate", "build_hf_llama", "build_loom_plain", "build_megatron_gpt", "copy_bandwidth", "flops_per_token",
    "init_grid", "matmul_flops", "model_config", "paired_ratio", "preimport", "quiet_paired_ratio", "run_bench",
    "section_data", "section_layouts", "section_peers", "section_techniques", "section_zero", "technique_configs",
    "tensor_bytes", "token_batch", "worker_groups",
]
