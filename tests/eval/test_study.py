"""`loom study`: config handling, statistics and the report (fast, on synthetic results), and a
minuscule study end to end (slow)."""

import json
import math

import pytest

from loom.launch.config import ConfigError
from loom.launch.study import config as study
from loom.launch.study import report as study_report
from tests.e2e.runner import TINY, run_loom


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_study_config_needs_enough_seeds_and_a_baseline(tmp_path):
    cfg_file = _write(tmp_path / "s.yaml", f"base_config: {TINY}\nseeds: [1, 2]\n")
    with pytest.raises(ConfigError, match="at least 3"):
        study.load_study_config(cfg_file, [])
    cfg = study.load_study_config(cfg_file, ["min_seeds=2", "only=[lcm]"])
    assert study.arms_of(cfg) == ["baseline", "lcm"]
    with pytest.raises(ConfigError, match="unknown arms"):
        study.load_study_config(cfg_file, ["min_seeds=2", "only=[nope]"])


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
    assert len(specs) == 7 * 3
    for spec in specs:
        assert "train.max_steps=7" in spec.overrides and "model.hidden_size=32" in spec.overrides
        assert f"train.seed={spec.seed}" in spec.overrides and f"data.seed={spec.seed}" in spec.overrides
        assert "techniques.lcm.K=4" in spec.overrides
    all_arm = [s for s in specs if s.arm == "all"][0]
    assert sum(o.endswith(".enabled=true") for o in all_arm.overrides) == 5


def test_statistics():
    assert study_report.summarise([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert study_report.summarise([4.0]) == (4.0, 0.0, 1)
    from scipy import stats

    a, b = [1.0, 2.0, 3.5], [4.0, 5.5, 6.0]
    assert study_report.welch(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert study_report.welch([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert math.isnan(study_report.welch([1.0], [2.0, 3.0]))


def test_paired_test_matches_seeds():
    from scipy import stats

    a, b = {1: 5.0, 2: 6.1, 3: 7.3, 4: 9.9}, {1: 4.9, 2: 5.9, 3: 7.0, 5: 0.0}  # seeds 4 and 5 are unmatched
    assert study_report.paired(a, b) == pytest.approx(stats.ttest_rel([5.0, 6.1, 7.3], [4.9, 5.9, 7.0]).pvalue)
    # a consistent small shift across very different seeds: significant paired, not unpaired
    a, b = {s: 10.0 * s + 0.1 + 0.01 * (s % 2) for s in range(1, 5)}, {s: 10.0 * s for s in range(1, 5)}
    assert study_report.paired(a, b) < 0.01 < study_report.welch(list(a.values()), list(b.values()))
    assert math.isnan(study_report.paired({1: 1.0}, {1: 2.0}))
    assert math.isnan(study_report.paired({1: 1.0, 2: 2.0}, {1: 0.5, 2: 1.5}))  # constant difference: undefined
    assert study_report.paired({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0}) == 1.0


def test_report_from_synthetic_results(tmp_path):
    cfg = study.load_study_config(
        _write(
            tmp_path / "s.yaml",
            f"""
base_config: {TINY}
output_dir: {tmp_path / "out"}
only: [lcm]
""",
        ),
        [],
    )
    for spec in study.plan_runs(cfg):
        spec.folder.mkdir(parents=True)
        shift = 1.0 if spec.arm == "lcm" else 0.0
        metrics = {
            "loss/heldout_nll": 5.0 + shift + 0.01 * spec.seed,
            "ppl_f/ppl_f": 0.2 + 0.001 * spec.seed,
            "kv_recall/N500/teacher_forced": 0.1 * spec.seed,
            "retrieval/logit/0-10/top10": 0.05,
            "generation/sentence_len_std": None,
        }
        (spec.folder / "eval.json").write_text(json.dumps({"step": 3, "metrics": metrics, "notes": ["a note"]}))
    report = study_report.write_report(cfg, "loom study s.yaml", "name: study\n")
    text = report.read_text()
    assert "| `loss/heldout_nll` |" in text and "p=" in text and "*" in text  # a shift of 1 with tiny spread
    assert "a note" in text and "Study config" in text
    for png in ("key_metrics.png", "kv_recall.png", "retrieval.png"):
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
    text = (out / "report.md").read_text()
    assert "| baseline | lcm | sca |" in text and "loss/heldout_nll" in text and "p=" in text
    for png in ("loss_curves.png", "key_metrics.png", "kv_recall.png"):
        assert (out / png).stat().st_size > 1000
    again = run_loom(["study", config], timeout=240)
    assert again.stdout.count("skipping") >= 12  # 6 runs × (training, evaluation)
