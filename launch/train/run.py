"""`loom train`: config → process grid → data → parallel model → Trainer.fit."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from loom.launch.checkpoint.layout import checkpoint_root
from loom.launch.config import RunConfig, load_config, to_yaml
from loom.launch.runtime.env import init_distributed, read_dist_env
from loom.launch.runtime.run_lock import acquire_run_lock, discard_if_unused
from loom.launch.runtime.watchdog import Heartbeat
from loom.launch.train.callbacks import CheckpointCallback, EvalCallback, MonitorCallback, SampleCallback
from loom.launch.train.prepare_data import prepare_data
from loom.launch.train.resume import make_saver, restore
from loom.launch.train.run_data import make_eval_batches, make_train_loader, unigram_baseline
from loom.launch.train.tensorboard import MetricsWriter, flops_per_token, measure_peak_tflops
from loom.launch.train.train_module import TrainModule
from loom.launch.train.trainer import Trainer

log = logging.getLogger(__name__)


def train_from_cli(config_path: str, overrides: list[str], resume: str | None = None) -> int:
    denv = read_dist_env()
    overrides = list(overrides) + ([f"checkpoint.resume={resume}"] if resume else [])
    cfg = load_config(config_path, overrides, world_size=denv.world_size)  # fails before any process group
    fresh_run_dir = not os.path.exists(cfg.output_dir)
    if cfg.parallel.sequence_parallel:
        # megatron's sequence-parallel layers launch each all-gather just before the GEMM that waits for it;
        # with one hardware queue per device the GPU runs them in that order (set before CUDA starts)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    backend = init_distributed(denv, cfg.parallel.timeout_s)
    heartbeat = Heartbeat() if denv.world_size > 1 else None
    try:
        log.info(f"loom: {cfg.name} · {denv.world_size} process(es) via {denv.launcher} · backend {backend}")
        return run(cfg)
    except dist.DistError as exc:  # includes DistBackendError / DistNetworkError from gloo and NCCL
        if heartbeat is None:
            raise
        log.error(f"rank {denv.rank}: {heartbeat.explain(exc)}")
        return 1
    except RuntimeError as exc:
        if heartbeat is None or not _looks_like_lost_peer(exc):
            raise
        log.error(f"rank {denv.rank}: {heartbeat.explain(exc)}")
        return 1
    finally:
        if fresh_run_dir:
            discard_if_unused(cfg.output_dir)  # bad input stopped the run in set-up: leave no folder behind
        if heartbeat is not None:
            heartbeat.stop()
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _looks_like_lost_peer(exc: BaseException) -> bool:
    text = str(exc)
    return any(
        s in text
        for s in (
            "Connection closed by peer",
            "Connection reset by peer",
            "Timed out waiting",
            "timed out",
            "Broken pipe",
            "NCCL communicator was aborted",
        )
    )


def _compile_cache(cfg: RunConfig) -> str:
    """Inductor's cache beside the data cache, shared by runs (TORCHINDUCTOR_CACHE_DIR wins). One folder per
    CPU kernel level: inductor's keys do not include it, so a cache shared by nodes with different CPUs
    (or a run under another ATEN_CPU_CAPABILITY) would load kernels built for the wrong instructions."""
    from loom.data.corpora import default_cache_dir

    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir().parent
    return str(root / "inductor" / torch.backends.cpu.get_cpu_capability().lower())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: RunConfig) -> int:
    from loom.data.tokenizer import Tokenizer
    from loom.model.parallel import cpu_compat
    from loom.model.parallel.groups import describe_grid, init_parallel_groups
    from loom.model.parallel.parallelize import default_device, parallelize, resolve_dtype

    cpu_compat.apply()
    layout = init_parallel_groups(cfg.parallel)
    grid = describe_grid()
    chunks = f" ({cfg.parallel.virtual_stages} chunks per rank)" if cfg.parallel.virtual_stages > 1 else ""
    zero = cfg.parallel.zero_stage
    log.info(f"layout: DP {layout.dp} × PP {layout.pp}{chunks} × TP {layout.tp}, ZeRO-{zero}\n{grid}")
    _seed_everything(cfg.train.seed)
    run_dir = Path(cfg.output_dir)
    acquire_run_lock(cfg.output_dir)
    if dist.get_rank() == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    data = prepare_data(cfg.data, cfg.model.seq_length, cfg.model.vocab_size)
    tokenizer = Tokenizer(data.tokenizer)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {data.tokenizer} has {tokenizer.vocab_size} pieces but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}"
        )
    if tokenizer.eos_id != cfg.model.eos_id:
        raise ValueError(f"tokenizer EOS id {tokenizer.eos_id} != model.eos_id {cfg.model.eos_id}")

    device, dtype = default_device(), resolve_dtype(cfg.train.precision)
    overlay = json.loads(Path(cfg.deepspeed_json).read_text()) if cfg.deepspeed_json else None
    sharded = parallelize(
        cfg.model,
        cfg.techniques,
        layout,
        cfg.parallel,
        optim=cfg.optim,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.train.seed,
        precision=cfg.train.precision,
        deepspeed_overlay=overlay,
        compile=cfg.train.compile,
        compile_cache=_compile_cache(cfg),
    )
    module = TrainModule(sharded, layout, cfg.train.micro_batch_size, cfg.model.seq_length, dtype, device)
    loader = make_train_loader(cfg, data, layout.dp_rank, layout.dp, tokenizer.sha256)
    try:
        state = restore(cfg, sharded, loader, tokenizer.sha256)

        tokens_per_step = cfg.train.micro_batch_size * cfg.parallel.microbatches * layout.dp * cfg.model.seq_length
        peak = cfg.train.mfu_peak_tflops or measure_peak_tflops(dtype, device)
        writer = MetricsWriter(str(run_dir / "tensorboard"), enabled=dist.get_rank() == 0)
        writer.text("config", "```\n" + to_yaml(cfg) + "\n```")
        writer.text("layout", "```\n" + grid + "\n```")

        save = make_saver(cfg, layout, sharded, loader, data.tokenizer)
        callbacks = [
            MonitorCallback(
                writer,
                cfg.train.log_every,
                flops_per_token(cfg.model, cfg.model.seq_length) * tokens_per_step,
                peak,
                layout.world_size,
                device,
                progress=dist.get_rank() == 0 and os.isatty(2),
            )
        ]
        evaluator = None
        if data.eval:
            evaluator = EvalCallback(
                make_eval_batches(cfg, data, layout.dp_rank, layout.dp, tokenizer.sha256),
                cfg.train.eval_every,
                writer,
            )
            callbacks.append(evaluator)
        callbacks.append(
            SampleCallback(
                cfg.train.sample_prompt,
                tokenizer,
                cfg.train.sample_tokens,
                dtype,
                device,
                baseline_fn=unigram_baseline(data, cfg.model.vocab_size),
                eval_callback=evaluator,
                writer=writer,
            )
        )
        callbacks.append(CheckpointCallback(cfg.checkpoint.every, save, cfg.checkpoint.on_save_error == "stop"))
        trainer = Trainer(cfg, module, loader, state, callbacks, tokens_per_step)
        try:
            code = trainer.fit()
        finally:
            writer.close()
        log.info(
            f"finished at step {state.step} (exit code {code}) · run directory {run_dir.resolve()}\n"
            f"  checkpoints: {checkpoint_root(run_dir).resolve()}\n"
            f"  TensorBoard: tensorboard --logdir {(run_dir / 'tensorboard').resolve()}"
        )
        return code
    finally:
        # An exception's traceback keeps the loader alive past interpreter exit, where multiprocessing
        # joins its workers while they wait for the loader: a run that raised would hang instead of exiting
        loader.shutdown()
