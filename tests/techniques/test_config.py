import ast
import dataclasses
import inspect

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from loom.techniques import config as C
from loom.techniques.config import (
    CMRConfig,
    HCMAConfig,
    LCMConfig,
    SCAConfig,
    SCRConfig,
    TechniquesConfig,
    parse_relevance_noise,
    resolve_layers,
)


def test_spec_defaults():
    cfg = TechniquesConfig()
    assert not any(getattr(cfg, n).enabled for n in ("lcm", "scr", "cmr", "sca", "hcma"))
    assert (
        cfg.lcm.layers,
        cfg.lcm.K,
        cfg.lcm.beta,
        cfg.lcm.a_max,
        cfg.lcm.n_iter,
        cfg.lcm.gate,
        cfg.lcm.placement,
        cfg.lcm.aux_smooth_weight,
    ) == ("all", 16, 0.8, 0.5, 1, True, "post_mlp", 0.0)
    assert (cfg.scr.layers, cfg.scr.rank, cfg.scr.gamma, cfg.scr.decay, cfg.scr.relevance_noise, cfg.scr.placement) == (
        "every_k:2",
        64,
        0.5,
        1.0,
        "none",
        "post_attn",
    )
    assert (
        cfg.cmr.rank,
        cfg.cmr.include_embedding,
        cfg.cmr.rec_loss_weight,
        cfg.cmr.cross_position.window,
        cfg.cmr.cross_position.topk,
        cfg.cmr.stage_local,
    ) == (128, True, 0.0, 0, 0, False)
    assert (
        cfg.sca.rank,
        cfg.sca.lambda_field,
        cfg.sca.lambda_coh,
        cfg.sca.lambda_vc,
        cfg.sca.ema_beta,
        cfg.sca.window,
        cfg.sca.tau,
        cfg.sca.buffer_sync_every,
        cfg.sca.warmup_steps,
    ) == (128, 0.02, 0.02, 0.01, 0.99, 64, 0.1, 100, 1000)
    h = cfg.hcma
    assert (
        h.mode,
        h.refresh_every,
        h.K1,
        h.K2,
        h.proj_dim,
        h.knn,
        h.gamma,
        h.pi_max,
        h.w,
        h.lambda_anchor,
        h.lambda_hcma,
        h.offline.eta,
        h.offline.iters,
        h.apply_to_output_embedding,
        h.apply_to_hidden_layer,
    ) == ("regularizer", 500, 64, 1024, 256, 16, 0.5, 4.0, [0.5, 1.0], 1.0, 1e-3, 0.1, 10, "tied", None)


def test_omegaconf_structured_round_trip():
    base = OmegaConf.structured(TechniquesConfig)
    override = OmegaConf.create(
        {
            "lcm": {"enabled": True, "layers": "every_k:3"},
            "cmr": {"source_layers": [2, 4], "cross_position": {"window": 0}},
            "hcma": {"w": [1.0, 2.0], "offline": {"iters": 3}},
        }
    )
    merged = OmegaConf.merge(base, override)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, TechniquesConfig) and isinstance(cfg.hcma.offline, C.HCMAOfflineConfig)
    assert cfg.lcm.layers == "every_k:3" and cfg.cmr.source_layers == [2, 4] and cfg.hcma.w == [1.0, 2.0]
    with pytest.raises(ValidationError):
        OmegaConf.merge(base, {"lcm": {"K": "many"}})


def test_every_field_has_an_attribute_docstring():
    tree = ast.parse(inspect.getsource(C))
    missing = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for i, item in enumerate(body):
                if isinstance(item, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    if not (
                        isinstance(nxt, ast.Expr)
                        and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)
                    ):
                        missing.append(f"{node.name}.{item.target.id}")
    assert not missing
    for cls in (LCMConfig, SCRConfig, CMRConfig, SCAConfig, HCMAConfig, TechniquesConfig):
        assert dataclasses.is_dataclass(cls)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ("every_k:2", [1, 3, 5]),
        ("every_k=3", [2, 5]),
        ("every_k:1", list(range(6))),
        ("every_k:7", []),
        ("0,3,5", [0, 3, 5]),
        ("5, 0", [0, 5]),
        ("2", [2]),
    ],
)
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 6) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0,6", "outside 0..5"),
        ("-1", "outside"),
        ("1,1", "repeats"),
        ("every_k:0", "every_k"),
        ("every_k:x", "every_k"),
        ("some", "comma list"),
        ("", "empty"),
    ],
)
def test_resolve_layers_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layers(spec, 6)


def test_relevance_noise_parsing():
    assert parse_relevance_noise("none") is None
    assert parse_relevance_noise("concrete(0.5)") == 0.5
    for bad in ("concrete(0)", "concrete()", "gumbel(1)", "concrete(-1)"):
        with pytest.raises(ValueError):
            parse_relevance_noise(bad)


def test_cmr_and_sca_default_layers():
    cmr = CMRConfig()
    assert cmr.sources(32) == [0, 8, 16, 20] and cmr.targets(32) == [24, 32]
    assert cmr.slot_of(16, 32) == 2
    assert cmr.available_slots(24, 32) == [0, 1, 2, 3] and cmr.available_slots(8, 32) == [0]
    assert CMRConfig(include_embedding=False).sources(32) == [8, 16, 20]
    assert CMRConfig(source_layers=[3, 1]).sources(8) == [0, 1, 3]
    assert SCAConfig().resolved_layers(32) == [16]
    assert CMRConfig().validate(32) == [] and SCAConfig().validate(32) == []


def test_validate_reports_problems():
    assert TechniquesConfig().validate(4) == []  # everything disabled
    lcm = LCMConfig(enabled=True, a_max=0.7, layers="0,9", K=0)
    problems = lcm.validate(4)
    assert any("a_max" in p for p in problems) and any("outside" in p for p in problems)
    assert any("K=0" in p for p in problems)
    assert any("halo" in p for p in LCMConfig(K=8).validate(4, sequence_shard=4))
    assert LCMConfig(K=4).validate(4, sequence_shard=4) == []
    assert any("rank" in p for p in SCRConfig(rank=0).validate(4))
    assert any("relevance_noise" in p for p in SCRConfig(relevance_noise="concrete(x)").validate(4))
    bad_cmr = CMRConfig(cross_position=C.CMRCrossPositionConfig(window=8), target_layers=[0, 5], rank=-1)
    problems = bad_cmr.validate(4)
    assert any("not implemented" in p for p in problems) and any("outside 1..4" in p for p in problems)
    assert any("rank" in p for p in problems)
    assert any(
        "no source before it" in p
        for p in CMRConfig(include_embedding=False, source_layers=[3], target_layers=[2, 4]).validate(4)
    )
    assert any("outside 1..4" in p for p in SCAConfig(layers=[0]).validate(4))
    assert any("multiple of K1" in p for p in HCMAConfig(K1=3, K2=10).validate(4))
    assert any("not implemented" in p for p in HCMAConfig(apply_to_hidden_layer=2).validate(4))
    whole = TechniquesConfig(lcm=lcm, hcma=HCMAConfig(enabled=True, mode="magic"))
    problems = whole.validate(4)
    assert any(p.startswith("lcm: ") for p in problems) and any(p.startswith("hcma: mode") for p in problems)
