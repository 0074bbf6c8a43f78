"""`loom generate` on a consolidated folder and on exported Hugging Face folders (remote code and plain
Llama, read from safetensors + JSON): the same continuations; sampling options; one `error:` line for bad
input."""

from __future__ import annotations

import copy

import pytest

from loom.launch.convert.hf_export import remote_code_techniques, to_hf
from loom.launch.generate.load import techniques_from_hf
from loom.launch.generate.run import GenerateRequest
from loom.launch.generate.sampling import Sampling
from tests.generate.common import CONFIGS, model_config, write_model_folder_fn
from tests.harness import run_distributed

PROMPTS = ["the quick brown", "line 12: the lazy dog\nline 13:", "fox"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    from loom.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("generate")
    text = root / "text.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)))
    tokenizer = str(train_tokenizer([str(text)], root / "small", vocab_size=300))
    out = {}
    for name in ("all five", "baseline"):
        slug = name.replace(" ", "_")
        out[name] = run_distributed(
            write_model_folder_fn, 1, str(root / slug), model_config(), CONFIGS[name], tokenizer
        )[0]
    out["remote code"] = str(to_hf(out["all five"], root / "remote_hf", remote_code=True))
    out["llama"] = str(to_hf(out["baseline"], root / "llama_hf"))
    return out


def _generate_fn(rank, world, request: GenerateRequest) -> dict:
    from loom.launch.generate.run import generate
    from tests.generate.common import one_process_grid

    result = generate(request, one_process_grid())
    return {"texts": result.texts, "ids": result.decoded.ids}


def _run(model: str, **knobs) -> dict:
    return run_distributed(_generate_fn, 1, GenerateRequest(model=model, prompts=PROMPTS, **knobs))[0]


def test_every_kind_of_folder_gives_the_same_continuation(folders):
    greedy = dict(max_new_tokens=24, stop_at_eos=False)
    consolidated = _run(folders["all five"], **greedy)
    assert [len(row) for row in consolidated["ids"]] == [24, 24, 24]
    assert _run(folders["remote code"], **greedy)["ids"] == consolidated["ids"]
    assert _run(folders["llama"], **greedy)["ids"] == _run(folders["baseline"], **greedy)["ids"]
    assert _run(folders["all five"], use_cache=False, **greedy)["ids"] == consolidated["ids"]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(folders):
    def sampled(seed, **knobs):
        return _run(folders["all five"], max_new_tokens=12, sampling=Sampling(temperature=1.0, seed=seed, **knobs))

    first = sampled(1)
    assert sampled(1)["ids"] == first["ids"] and sampled(2)["ids"] != first["ids"]
    assert sampled(5, top_k=1)["ids"] == _run(folders["all five"], max_new_tokens=12)["ids"]


def test_the_command_prints_each_continuation_and_the_rate(folders, tmp_path):
    from tests.e2e.runner import run_loom

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("fox\n\nline 3:\\nline 4:\n")
    proc = run_loom(
        ["generate", folders["remote code"], "--prompt", "the quick", "--prompts-file", str(prompts_file)]
        + ["--max-new-tokens", "8", "--temperature", "0.8", "--top-p", "0.9", "--seed", "7"]
    )
    out = proc.stdout
    assert "--- 1/3 ---\nthe quick" in out and "--- 2/3 ---\nfox" in out and "--- 3/3 ---\nline 3:\nline 4:" in out
    assert "tokens/s (KV cache, batch 3, sampled, seed 7)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give a prompt"),
        (["--prompt", "x", "--temperature", "-1", "--top-p", "0"], "--temperature must be >= 0"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompts-file", "/nonexistent/prompts.txt"], "no such file"),
    ],
)
def test_bad_input_is_one_error_line(folders, capsys, args, message):
    from loom.launch.cli import main

    assert main(["generate", folders["all five"], *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert main(["generate", "/nonexistent/model", "--prompt", "x"]) == 2
    assert "no such checkpoint or model folder" in capsys.readouterr().err


def test_export_techniques_map_back_and_stage_local_pipelines_are_refused():
    from loom.model.technique_plan import TechniquePlan

    cfg = model_config()
    for name in ("all five", "all five, other knobs", "lcm", "cmr"):
        tech = CONFIGS[name]
        back = techniques_from_hf(remote_code_techniques(tech, cfg, source_pp=1))
        mine, theirs = TechniquePlan.from_config(tech, 4), TechniquePlan.from_config(back, 4)
        assert (mine.lcm_blocks, mine.scr_blocks, mine.cmr_sources, mine.cmr_targets) == (
            theirs.lcm_blocks,
            theirs.scr_blocks,
            theirs.cmr_sources,
            theirs.cmr_targets,
        )
        knobs = {"lcm": ("K", "beta", "a_max", "n_iter", "gate", "clamp", "placement"), "scr": ("rank", "gamma")}
        knobs["scr"] += ("decay", "placement")
        for part, keys in knobs.items():
            if getattr(tech, part).enabled:
                assert [getattr(getattr(back, part), k) for k in keys] == [
                    getattr(getattr(tech, part), k) for k in keys
                ]
    local = copy.deepcopy(CONFIGS["cmr"])
    local.cmr.stage_local = True
    with pytest.raises(ValueError, match="stage-local over the 2 pipeline stages"):
        techniques_from_hf(remote_code_techniques(local, cfg, source_pp=2))
