"""Helpers of the conversion tests: Loom's own logits and losses on consolidated weights, and
small training runs in forked gloo ranks that save real checkpoints (`launch.checkpoint.save`)."""

from __future__ import annotations

import copy

import torch

from tests.e2e.runner import TINY

MICRO_BATCH = 2
SEQ = 16
# the tiny CLI model (vocab 2048 matches the shakespeare tokenizer) with 4 key/value heads, so TP=4 works
HARNESS_OVERRIDES = ["model.num_kv_heads=4", f"model.seq_length={SEQ}"]
TECHNIQUES = [
    "techniques.lcm.enabled=true",
    "techniques.lcm.K=4",
    "techniques.scr.enabled=true",
    "techniques.scr.rank=8",
    "techniques.cmr.enabled=true",
    "techniques.cmr.rank=8",
    "techniques.sca.enabled=true",
    "techniques.sca.rank=8",
    "techniques.sca.window=8",
    "techniques.hcma.enabled=true",
    "techniques.hcma.K1=4",
    "techniques.hcma.K2=8",
    "techniques.hcma.proj_dim=16",
    "techniques.hcma.knn=4",
    "techniques.hcma.refresh_every=2",
]


def sample_tokens(batch: int = 2, length: int = 40, vocab: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (batch, length), generator=g)
    tokens[0, length // 4] = 3  # EOS: packed documents, so LCM/SCR see document starts
    tokens[-1, length // 2] = 3
    return tokens


def fixed_batches(n: int, vocab: int = 2048, seed: int = 11) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(4, vocab, (MICRO_BATCH, SEQ + 1), generator=g)
        t[0, 5] = 3
        out.append(t)
    return out


def _init(rank: int, tp: int, pp: int):
    import deepspeed

    from tests.parallel.common import init_layout

    layout = init_layout(rank, tp, pp)
    deepspeed.init_distributed(dist_backend="gloo")  # ZeRO-3's zero.Init reads the DP size through it
    return layout


def loom_logits_fn(rank, world_size, source: str, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V] of Loom's own TP=1, PP=1 model with the consolidated weights of `source`."""
    from loom.launch.checkpoint.reader import load
    from loom.launch.checkpoint.start_point import load_into_stage
    from loom.model.parallel.parallelize import build_stage

    layout = _init(rank, 1, 1)
    data = load(source)
    stage = build_stage(data.model, data.techniques, layout, seed=0)
    load_into_stage(stage, data.weights)
    stage.eval()
    with torch.no_grad():
        logits = stage(torch.cat([tokens, tokens[:, :1]], 1), return_logits=True)  # last column: unused label
    return logits.transpose(0, 1)[..., : data.model.vocab_size].contiguous()


def run_config(overrides: list[str]):
    from loom.launch.config import load_config

    return load_config(TINY, overrides, check_files=False)


def layout_run_fn(
    rank,
    world_size,
    overrides: list[str],
    tp: int,
    pp: int,
    zero: int,
    batches: list,
    start: str | None = None,
    save_dir: str | None = None,
    tokenizer: str | None = None,
    train_steps: int = 0,
    then_steps: int = 0,
    seed: int = 0,
    precision: str = "fp32",
    virtual_stages: int = 1,
    microbatches: int = 1,
) -> dict:
    """At TP×PP (DP = world / (TP×PP)), `virtual_stages` model chunks per pipeline rank and `microbatches`
    per step and DP rank: optionally load a start point, train `train_steps`, save a checkpoint, measure
    the loss on batches[0], then train `then_steps` more. Returns the eval loss, the losses of the `then`
    steps and the full weights afterwards (rank 0 of each result)."""
    from loom.launch.checkpoint import store as checkpoint
    from loom.launch.checkpoint.start_point import load_start_point
    from loom.launch.config import to_dict
    from loom.launch.train.resume import saved_layout_entry
    from loom.launch.train.train_module import TrainModule
    from loom.model.parallel.config import ParallelConfig
    from loom.model.parallel.consolidate import full_state_dict
    from loom.model.parallel.parallelize import parallelize
    from tests.parallel.common import OPTIM

    layout = _init(rank, tp, pp)
    cfg = run_config(
        overrides
        + [
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            f"parallel.zero_stage={zero}",
            f"parallel.microbatches={microbatches}",
            f"parallel.virtual_stages={virtual_stages}",
            f"train.micro_batch_size={MICRO_BATCH}",
        ]
    )
    parallel = ParallelConfig(
        tensor=tp, pipeline=pp, zero_stage=zero, microbatches=microbatches, virtual_stages=virtual_stages
    )
    sharded = parallelize(
        cfg.model,
        cfg.techniques,
        layout,
        parallel,
        optim=copy.copy(OPTIM),
        micro_batch_size=MICRO_BATCH,
        seed=seed,
        precision=precision,
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    step = 0
    if start is not None:
        meta = load_start_point(sharded, start, cfg.model, optimizer=True)
        step = int(meta["state"].get("step", 0))
    module = TrainModule(sharded, layout, MICRO_BATCH, cfg.model.seq_length, dtype, torch.device("cpu"))

    def one_step():
        nonlocal step
        first = (step * layout.dp + layout.dp_rank) * microbatches
        mine = [batches[(first + j) % len(batches)] for j in range(microbatches)]
        out = module.train_batch(mine, step, OPTIM.lr)
        step += 1
        return out["train/loss"]

    for _ in range(train_steps):
        one_step()
    if save_dir is not None:
        meta = {
            "state": {"step": step, "consumed_tokens": 0, "skipped_steps": 0, "consecutive_nonfinite": 0},
            "world_size": world_size,
            "config": to_dict(cfg),
            "layout": saved_layout_entry(layout, parallel),
        }
        checkpoint.save(sharded.engine, save_dir, step, {}, meta, tokenizer, keep_last=1)
    eval_loss = module.evaluate([batches[0]])["eval/loss"]
    then = [one_step() for _ in range(then_steps)]
    weights = full_state_dict(sharded.module)
    masters = {}
    if precision == "bf16" and layout.tp == 1 and layout.pp == 1:
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {n: safe_get_full_fp32_param(p).clone() for n, p in sharded.module.named_parameters()}
    sharded.engine.destroy()
    if rank != 0:
        return None
    return {"eval_loss": eval_loss, "then": then, "weights": weights, "step": step, "masters": masters}


def assert_weights_close(ref: dict, got: dict, vocab: int, rel: float = 1e-4, what: str = "") -> None:
    assert set(ref) == set(got), f"{what} names differ: {sorted(set(ref) ^ set(got))[:5]}"
    for name, a in ref.items():
        b = got[name]
        if name in ("embedding.weight", "output_layer.weight"):
            a, b = a[:vocab], b[:vocab]
        assert a.shape == b.shape, f"{what} {name}: {tuple(a.shape)} != {tuple(b.shape)}"
        err = (a.float() - b.float()).abs().max().item()
        scale = a.float().abs().max().item() + 1e-6
        assert err <= rel * scale + 1e-6, f"{what} {name} differs by {err:.3g} (scale {scale:.3g})"
