"""`loom eval` pieces on a real stage (single rank), and `loom eval` end to end."""

import json
import math

import numpy as np
import pytest
import torch

from loom.launch.eval.attention import attention_maps
from loom.launch.eval.data import split_docs
from loom.launch.eval.settings import FAMILIES, parse_families, parse_lengths, parse_settings, profile_overrides
from tests.e2e.runner import TINY, read_scalars, run_loom
from tests.harness import run_distributed


def _tiny_stage():
    from loom.model.config import ModelConfig
    from loom.model.parallel.config import ParallelConfig
    from loom.model.parallel.groups import init_parallel_groups
    from loom.model.parallel.parallelize import build_stage
    from loom.techniques.config import TechniquesConfig

    layout = init_parallel_groups(ParallelConfig())
    cfg = ModelConfig(
        vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64, seq_length=12
    )
    return build_stage(cfg, TechniquesConfig(), layout, seed=3, device=torch.device("cpu"))


def _attention_maps_reproduce_the_module(rank, world):
    stage = _tiny_stage()
    torch.manual_seed(0)
    mod = stage.layers["1"].attention
    s, b = 12, 2
    x = torch.randn(s, b, 32)
    cos, sin = stage.rope.cos_sin(s, x.device, x.dtype)
    with torch.no_grad():
        probs = attention_maps(mod, x, cos, sin, torch.arange(s))  # [b, h, s, s]
        qkv, _ = mod.qkv(x)
        v = qkv.view(s, b, mod.kv_groups, mod.q_per_group + 2, mod.head_dim)[:, :, :, -1]  # [s, b, g, e]
        v = v.repeat_interleave(mod.q_per_group, dim=2).permute(1, 2, 0, 3)  # [b, h, s, e]
        mixed = (probs @ v).permute(2, 0, 1, 3).reshape(s, b, -1)
        mine, _ = mod.proj(mixed)
        ref = mod(x, cos, sin)
    return float((mine - ref).abs().max()), float(probs.sum(-1).sub(1).abs().max())


def test_attention_maps_reproduce_the_attention_output():
    """The eagerly recomputed probabilities (fused QKV layout, RoPE, GQA) give the module's output."""
    err, norm = run_distributed(_attention_maps_reproduce_the_module, 1)[0]
    assert err < 1e-5 and norm < 1e-5


def test_settings_and_families_parse():
    s = parse_settings(["gen_tokens=512", "fgsm_eps=0.02", "kv_lengths=500,2x"])
    assert (s.gen_tokens, s.fgsm_eps, s.kv_lengths) == (512, 0.02, "500,2x")
    assert parse_lengths("500,2x,0.5x", 256) == [500, 512, 128]
    assert parse_families(None) == list(FAMILIES)
    with pytest.raises(ValueError, match="unknown metric"):
        parse_families("loss,nope")
    with pytest.raises(ValueError, match="unknown eval setting"):
        parse_settings(["nope=1"])


def test_profiles_spec_by_default_quick_on_request_and_set_on_top():
    spec = parse_settings([])
    assert spec.profile == "spec" and (spec.gen_tokens, spec.kv_samples, spec.rare_gap) == (512, 500, 256)
    assert spec.min_doc_tokens >= 2048 and parse_lengths(spec.kv_lengths, 256) == [
        500,
        1000,
        1500,
        2000,
        2500,
        512,
        1024,
    ]
    assert parse_lengths(spec.num_lengths, 256) == [500, 1000, 1500, 2000, 2500]
    quick = parse_settings([], "quick")  # the CPU sizes tests and small runs use
    assert (quick.profile, quick.gen_tokens, quick.kv_samples, quick.max_doc_tokens) == ("quick", 64, 8, 1024)
    tuned = parse_settings(["gen_tokens=16", "reference=/ckpt"], "quick")
    assert tuned.gen_tokens == 16 and tuned.kv_samples == 8 and tuned.profile == "quick"
    assert profile_overrides(tuned) == {"gen_tokens": 16, "reference": "/ckpt"} and profile_overrides(quick) == {}
    with pytest.raises(ValueError, match="unknown eval profile"):
        parse_settings([], "huge")


def test_the_knn_reference_is_named():
    """Without --set reference the kNN overlap compares with the run's own random step-0 table, and says so."""
    from loom.launch.config import RunConfig
    from loom.launch.eval.checkpoint import before_alignment_table

    cfg = RunConfig()
    cfg.model.vocab_size, cfg.model.hidden_size, cfg.train.seed = 64, 32, 5
    table, what = before_alignment_table("", cfg, tp=1)
    assert table.shape == (64, 32) and what == "the run's own step-0 table (random init, seed 5)"


def test_document_splitting_keeps_a_cut_tail():
    stream = np.array([5, 6, 3, 7, 8, 9, 3, 10, 11])
    docs = split_docs(stream, 3, complete_tail=True)
    assert [d.tolist() for d in docs] == [[5, 6], [7, 8, 9], [10, 11]]


# ------------------------------------------------------------------------------------ end to end
SMALL = [
    "max_docs=4",
    "doc_segments=8",
    "kv_lengths=200",
    "kv_samples=4",
    "num_samples=3",
    "multiturn_ks=2,4",
    "gen_prompts=4",
    "gen_tokens=8",
    "heldout_samples=16",
    "robust_rows=4",
    "ahd_rows=2",
]


@pytest.mark.slow
def test_loom_eval_writes_every_metric_and_tensorboard_scalars(tmp_path):
    run = tmp_path / "run"
    run_loom(
        [
            "train",
            TINY,
            f"output_dir={run}",
            "train.max_steps=2",
            "train.log_every=1",
            "train.eval_every=0",
            "checkpoint.every=0",
        ]
    )
    out = tmp_path / "eval.json"
    proc = run_loom(["eval", str(run), "--out", str(out), "--profile", "quick", "--set", *SMALL])
    assert "eval:" in proc.stdout and "profile: quick with --set" in proc.stdout
    assert "kNN overlap reference: the run's own step-0 table" in proc.stdout
    result = json.loads(out.read_text())
    assert result["step"] == 2 and result["layout"] == {"dp": 1, "pp": 1, "tp": 1}
    assert result["profile"] == "quick" and result["overrides"]["max_docs"] == 4
    assert result["knn_reference"].startswith("the run's own step-0 table")
    assert any("kNN@10 overlap is against the run's own step-0 table" in note for note in result["notes"])
    metrics = result["metrics"]
    families = {k.split("/")[0] for k in metrics}
    assert families == set(FAMILIES), set(FAMILIES) - families
    for key in (
        "loss/heldout_nll",
        "ppl_f/ppl_f",
        "ppl_f/ppl_cv",
        "entropy/hbar_mean",
        "entropy/hbar_var",
        "generation/ev",
        "generation/li",
        "generation/rep4",
        "generation/distinct2",
        "drift/latent_drift",
        "repvar/layer4",
        "ahd/layer1",
        "ahd/dispersion_layer1",
        "persistence/gain_1x",
        "kv_recall/N200/exact_match",
        "kv_recall/N200/teacher_forced",
        "rare_recall/all/top1",
        "numerical/N500/accuracy",
        "numerical/N500/consistency",
        "multiturn/k2/gain",
        "coherence/last/coh",
        "coherence/sca_layer/coh",
        "collapse/erank_layer4",
        "collapse/anisotropy_layer4",
        "rare_words/nll_rare",
        "retrieval/logit/all/top1",
        "retrieval/cosine/all/top10",
        "robustness/token_delta_nll",
        "robustness/token_top1_agreement",
        "robustness/fgsm_drop",
        "geometry/silhouette_fine",
        "geometry/knn10_overlap",
        "geometry/low_density_fraction",
        "smoothness/grad_norm_cv",
        "overhead/inference_ms_per_token",
        "overhead/train_tokens_per_s",
    ):
        assert key in metrics and metrics[key] is not None and math.isfinite(metrics[key]), key
    assert metrics["loss/perplexity"] == pytest.approx(math.exp(metrics["loss/heldout_nll"]), rel=1e-6)
    scalars = read_scalars(run / "tensorboard")
    assert scalars["evaluate/loss/heldout_nll"][2] == pytest.approx(metrics["loss/heldout_nll"], rel=1e-6)
    assert "evaluate/kv_recall/N200/teacher_forced" in scalars


@pytest.mark.slow
def test_eval_agrees_across_tensor_pipeline_and_data_parallel_layouts(tmp_path):
    """A TP=2 and a PP=2 checkpoint of (numerically) the same weights, and data-parallel evaluation,
    give the single-process metrics: the vocab-parallel reductions, hooks on the owning stage and
    the gather to rank 0 are exact up to float rounding."""
    common = ["train.max_steps=1", "optim.lr=1e-12", "optim.min_lr=0", "checkpoint.every=0", "train.eval_every=0"]
    runs = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        runs[(tp, pp)] = tmp_path / f"t{tp}p{pp}"
        run_loom(
            [
                "train",
                TINY,
                f"output_dir={runs[(tp, pp)]}",
                f"parallel.tensor={tp}",
                f"parallel.pipeline={pp}",
                *common,
            ],
            nproc=tp * pp,
        )
    results = {}
    for name, (run, nproc) in {
        "single": (runs[(1, 1)], 1),
        "dp2": (runs[(1, 1)], 2),
        "tp2": (runs[(2, 1)], 2),
        "pp2": (runs[(1, 2)], 2),
    }.items():
        out = tmp_path / f"{name}.json"
        run_loom(["eval", str(run), "--out", str(out), "--profile", "quick", "--set", *SMALL], nproc=nproc)
        results[name] = json.loads(out.read_text())["metrics"]
    base = results["single"]
    for name in ("dp2", "tp2", "pp2"):
        got = results[name]
        assert set(got) == set(base), name
        for key, want in base.items():
            if key.startswith(("overhead/", "generation/ms", "kv_recall/N200/ms")) or want is None:
                continue
            assert got[key] == pytest.approx(want, rel=1e-4, abs=1e-6), (name, key)
