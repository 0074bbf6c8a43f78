"""`loom study`: config handling, statistics and the report (fast, on synthetic results), and a
minuscule study end to end (slow)."""

import json
import math
from pathlib import Path

import pytest

from loom.launch.config import ConfigError
from loom.launch.study import config as study
from loom.launch.study import report as study_report
from loom.launch.study import stats as study_stats
from tests.e2e.runner import TINY, run_loom


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_study_config_needs_enough_seeds_and_a_baseline(tmp_path):
    cfg_file = _write(tmp_path / "s.yaml", f"base_config: {TINY}\nseeds: [1, 2, 3]\n")
    with pytest.raises(ConfigError, match="at least 5"):
        study.load_study_config(cfg_file, [])
    cfg = study.load_study_config(cfg_file, ["min_seeds=2", "only=[lcm]"])
    assert study.arms_of(cfg) == ["baseline", "lcm"]
    with pytest.raises(ConfigError, match="unknown arms"):
        study.load_study_config(cfg_file, ["min_seeds=2", "only=[nope]"])
    with pytest.raises(ConfigError, match="eval_profile"):
        study.load_study_config(cfg_file, ["min_seeds=2", "eval_profile=huge"])
    with pytest.raises(ConfigError, match="reference"):
        study.load_study_config(cfg_file, ["min_seeds=2", "eval_settings=[reference=/x]"])
    assert study.load_study_config(cfg_file, ["min_seeds=2"]).eval_profile == "spec"


def test_every_arm_gets_the_same_seeds_data_and_run_settings(tmp_path):
    cfg = study.load_study_config(
        _write(
            tmp_path / "s.yaml",
            f"""
base_config: {TINY}
output_dir: {tmp_path / "out"}
run: {{train: {{max_steps: 7}}, model: {{hidden_size: 32}}}}
technique_settings: [techniques.lcm.K=4]
""",
        ),
        [],
    )
    specs = study.plan_runs(cfg)
    assert len(specs) == 7 * 5
    for spec in specs:
        assert "train.max_steps=7" in spec.overrides and "model.hidden_size=32" in spec.overrides
        assert f"train.seed={spec.seed}" in spec.overrides and f"data.seed={spec.seed}" in spec.overrides
        assert "techniques.lcm.K=4" in spec.overrides
    all_arm = [s for s in specs if s.arm == "all"][0]
    assert sum(o.endswith(".enabled=true") for o in all_arm.overrides) == 5


def test_every_run_is_evaluated_against_its_seeds_baseline(tmp_path, monkeypatch):
    """`loom study` evaluates with its profile and passes each run the same seed's baseline as the kNN
    overlap's reference, waiting for that baseline when runs go in parallel (training faked here)."""
    import threading
    import time

    from loom.launch.study import execute

    cfg_file = _write(
        tmp_path / "s.yaml",
        f"base_config: {TINY}\noutput_dir: {tmp_path / 'out'}\nonly: [lcm, sca]\nseeds: [1, 2]\nmin_seeds: 2\n"
        "parallel_runs: 4\neval_profile: quick\neval_settings: [gen_tokens=4]\n",
    )
    cfg = study.load_study_config(cfg_file, [])
    trained, commands, lock = set(), [], threading.Lock()

    def fake_run(cmd, log_file, timeout):
        folder = log_file.parent
        if "train" in cmd:
            time.sleep(0.3 if "baseline" in str(folder) else 0.0)  # the baselines finish last
            with lock:
                trained.add(folder)
        else:
            with lock:
                commands.append((folder, cmd, set(trained)))
            out = cmd[cmd.index("--out") + 1]
            Path(out).write_text(json.dumps({"step": 10**9, "profile": "quick", "metrics": {}}))
        return 0, 0.0

    monkeypatch.setattr(execute, "_run_logged", fake_run)
    monkeypatch.setattr(execute, "_final_step", lambda folder: 10**9 if folder in trained else None)
    execute.execute(cfg)
    assert len(commands) == 6
    for folder, cmd, trained_then in commands:
        baseline = folder.parent.parent / "baseline" / folder.name
        assert cmd[cmd.index("--profile") + 1] == "quick"
        settings = cmd[cmd.index("--set") + 1 :]
        assert settings == ["gen_tokens=4", f"reference={baseline}"], settings
        assert baseline in trained_then, f"{folder} was evaluated before its baseline had trained"


def test_statistics():
    assert study_stats.summarise([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert study_stats.summarise([4.0]) == (4.0, 0.0, 1)
    from scipy import stats

    a, b = [1.0, 2.0, 3.5], [4.0, 5.5, 6.0]
    assert study_stats.welch(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert study_stats.welch([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert math.isnan(study_stats.welch([1.0], [2.0, 3.0]))


def test_paired_test_matches_seeds():
    from scipy import stats

    a, b = {1: 5.0, 2: 6.1, 3: 7.3, 4: 9.9}, {1: 4.9, 2: 5.9, 3: 7.0, 5: 0.0}  # seeds 4 and 5 are unmatched
    assert study_stats.paired(a, b) == pytest.approx(stats.ttest_rel([5.0, 6.1, 7.3], [4.9, 5.9, 7.0]).pvalue)
    # a consistent small shift across very different seeds: significant paired, not unpaired
    a, b = {s: 10.0 * s + 0.1 + 0.01 * (s % 2) for s in range(1, 5)}, {s: 10.0 * s for s in range(1, 5)}
    assert study_stats.paired(a, b) < 0.01 < study_stats.welch(list(a.values()), list(b.values()))
    assert math.isnan(study_stats.paired({1: 1.0}, {1: 2.0}))
    assert math.isnan(study_stats.paired({1: 1.0, 2: 2.0}, {1: 0.5, 2: 1.5}))  # constant difference: undefined
    assert study_stats.paired({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0}) == 1.0


def test_paired_difference_and_its_interval():
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 dof) = 4.302653 -> half width 4.302653 / sqrt(3)
    mean, low, high, n = study_stats.paired_difference({1: 2.0, 2: 4.0, 3: 6.0, 9: 0.0}, {1: 1.0, 2: 2.0, 3: 3.0})
    assert (mean, n) == (2.0, 3)
    assert low == pytest.approx(2.0 - 2.484138, abs=1e-6) and high == pytest.approx(2.0 + 2.484138, abs=1e-6)
    mean, low, high, n = study_stats.paired_difference({1: 2.0}, {1: 1.0})
    assert mean == 1.0 and n == 1 and math.isnan(low) and math.isnan(high)


# Benjamini & Hochberg (1995), section 4: fifteen p-values of a clinical trial; at level 0.05 their procedure
# rejects four hypotheses, Bonferroni-Holm three
BH_1995 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719,
           0.6528, 0.7590, 1.000]  # fmt: skip


def test_holm_correction_known_answers():
    assert study_stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = study_stats.holm([0.01, float("nan"), 0.04])  # NaN is no test: m = 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert sum(p < 0.05 for p in study_stats.holm(BH_1995)) == 3
    assert study_stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_benjamini_hochberg_known_answers():
    from scipy import stats

    assert study_stats.benjamini_hochberg([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert sum(q < 0.05 for q in study_stats.benjamini_hochberg(BH_1995)) == 4
    assert study_stats.benjamini_hochberg(BH_1995) == pytest.approx(list(stats.false_discovery_control(BH_1995)))
    adjusted = study_stats.benjamini_hochberg([0.2, float("nan")])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1])


def test_verdicts():
    assert study_stats.verdict(-0.3, 0.01, "lower", 0.05) == "helps"
    assert study_stats.verdict(-0.3, 0.01, "higher", 0.05) == "hurts"
    assert study_stats.verdict(0.3, 0.01, "higher", 0.05) == "helps"
    assert study_stats.verdict(0.3, 0.2, "higher", 0.05) == "no effect"
    assert study_stats.verdict(0.3, 0.01, "context", 0.05) == "differs"
    assert study_stats.verdict(0.3, float("nan"), "lower", 0.05) == "untested"


def test_report_from_synthetic_results(tmp_path):
    cfg = study.load_study_config(
        _write(
            tmp_path / "s.yaml",
            f"""
base_config: {TINY}
output_dir: {tmp_path / "out"}
only: [lcm, scr]
""",
        ),
        [],
    )
    noise = {1: 0.013, 2: -0.021, 3: 0.008, 4: 0.017, 5: -0.011}
    for spec in study.plan_runs(cfg):
        spec.folder.mkdir(parents=True)
        shift = {"lcm": 0.5, "scr": 0.0}.get(spec.arm, 0.0)
        metrics = {
            "loss/heldout_nll": 5.0 + shift + noise[spec.seed] * (spec.arm != "baseline") + 0.1 * spec.seed,
            "ppl_f/ppl_f": 0.2 + 0.001 * spec.seed,
            "kv_recall/N500/teacher_forced": 0.1 * spec.seed,
            "retrieval/logit/0-10/top10": 0.05,
            "generation/sentence_len_std": None,
        }
        result = {"step": 3, "metrics": metrics, "notes": ["a note"], "profile": "quick"}
        result["overrides"] = {"kv_samples": 12, "reference": str(spec.folder.parent / "baseline")}
        (spec.folder / "eval.json").write_text(json.dumps(result))
    report = study_report.write_report(cfg, "loom study s.yaml", "name: study\n")
    text = report.read_text()
    assert "Evaluation profile: quick with kv_samples=12" in text and "same seed's baseline" in text
    assert "Holm" in text and "m = 3 tests" in text  # held-out loss for lcm and scr, PPL-F for lcm
    rows = [
        line for line in text.splitlines() if line.startswith("| lower perplexity fluctuation") or "heldout" in line
    ]
    lcm_loss = next(line for line in rows if "`loss/heldout_nll`" in line and "| lcm |" in line)
    scr_loss = next(line for line in rows if "`loss/heldout_nll`" in line and "| scr |" in line)
    assert lcm_loss.endswith("| **hurts** |")  # +0.5 nats in every seed: worse, significant after Holm
    assert scr_loss.endswith("| no effect |")  # seed noise only
    assert "a note" in text and "Study config" in text and "## All metrics (uncorrected)" in text
    for png in ("paired_differences.png", "kv_recall.png", "retrieval.png"):
        assert (report.parent / png).is_file() and (report.parent / png).stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(1800)  # its own budget, above setup.cfg's 900 s; the two runs below stay inside it
def test_loom_study_end_to_end_on_a_minuscule_config(tmp_path):
    """Baseline + two techniques × 2 seeds (min_seeds lowered for the test), 3 steps each: every run
    is trained and evaluated, report.md and the PNGs are written, and a second call skips it all."""
    out = tmp_path / "study"
    config = _write(
        tmp_path / "mini.yaml",
        f"""
name: mini
output_dir: {out}
base_config: {TINY}
run:
  train: {{max_steps: 3, log_every: 1, eval_every: 3}}
  checkpoint: {{every: 0}}
technique_settings: [techniques.lcm.K=4, techniques.sca.rank=8, techniques.sca.window=16,
                     techniques.sca.warmup_steps=1]
only: [lcm, sca]
seeds: [1, 2]
min_seeds: 2
eval_profile: quick
eval_settings: [max_docs=2, doc_segments=4, kv_lengths=200, kv_samples=2, num_samples=3, multiturn_ks=2,
                gen_prompts=2, gen_tokens=8, heldout_samples=8, robust_rows=2, ahd_rows=2, persistence_multiples=1]
""",
    )
    proc = run_loom(["study", config], timeout=1500)
    assert "report:" in proc.stdout
    for arm in ("baseline", "lcm", "sca"):
        for seed in (1, 2):
            result = json.loads((out / "runs" / arm / f"seed{seed}" / "eval.json").read_text())
            assert result["step"] == 3 and result["metrics"]["loss/heldout_nll"] is not None
    lcm = json.loads((out / "runs" / "lcm" / "seed2" / "eval.json").read_text())
    assert lcm["profile"] == "quick" and lcm["overrides"]["reference"] == str(out / "runs" / "baseline" / "seed2")
    assert lcm["knn_reference"].startswith("checkpoint ") and "baseline/seed2" in lcm["knn_reference"]
    baseline = json.loads((out / "runs" / "baseline" / "seed1" / "eval.json").read_text())
    assert baseline["metrics"]["geometry/knn10_overlap"] == 1.0  # compared with itself
    text = (out / "report.md").read_text()
    assert "| baseline | lcm | sca |" in text and "loss/heldout_nll" in text and "p=" in text
    assert "Evaluation profile: quick with" in text and "Holm" in text
    for png in ("loss_curves.png", "paired_differences.png", "kv_recall.png"):
        assert (out / png).stat().st_size > 1000
    again = run_loom(["study", config], timeout=240)
    assert again.stdout.count("skipping") >= 12  # 6 runs × (training, evaluation)
