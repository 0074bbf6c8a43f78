"""The launcher tests' prerequisites: in CI a missing tool is installed or the test fails (never a silent
skip); elsewhere the skip names each missing tool and its Debian package."""

from __future__ import annotations

import subprocess

import pytest

from tests.launch import conftest


@pytest.fixture
def machine(monkeypatch):
    """A root machine with apt-get where only the tools in `present` exist; records apt-get installs."""
    state = {"present": {"apt-get"}, "installs": [], "apt_installs_them": True}

    def which(tool):
        return f"/usr/bin/{tool}" if tool in state["present"] else None

    def apt_install(packages):
        state["installs"].append(list(packages))
        if state["apt_installs_them"]:
            state["present"].update(t for t, pkg in conftest.PACKAGES.items() if pkg in packages)
        return subprocess.CompletedProcess(["apt-get"], 0 if state["apt_installs_them"] else 100, "", "E: no network")

    monkeypatch.setattr(conftest.shutil, "which", which)
    monkeypatch.setattr(conftest.os, "access", lambda path, mode: path in state["present"])
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 0)
    monkeypatch.setattr(conftest, "apt_install", apt_install)
    monkeypatch.delenv("CI", raising=False)
    return state


def outcome(check, *args, **kwargs) -> tuple[str, str]:
    """("pass" | "skip" | "fail", message) of a prerequisite check; a skip or failure raised inside the
    test itself would otherwise decide the test's own outcome."""
    try:
        check(*args, **kwargs)
    except pytest.skip.Exception as exc:
        return "skip", str(exc)
    except pytest.fail.Exception as exc:
        return "fail", str(exc)
    return "pass", ""


def test_outside_ci_a_skip_names_each_missing_tool_and_package(machine):
    machine["present"].add("unshare")
    kind, message = outcome(conftest.require_tools, *conftest.NETNS_TOOLS)
    assert kind == "skip"
    assert message == "missing ip (Debian package iproute2), nsenter (Debian package util-linux)"
    assert machine["installs"] == []


def test_in_ci_missing_tools_are_installed(machine, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert outcome(conftest.require_tools, *conftest.NETNS_TOOLS) == ("pass", "")
    assert machine["installs"] == [["iproute2", "util-linux"]]


def test_in_ci_a_failed_install_fails_the_test(machine, monkeypatch):
    monkeypatch.setenv("CI", "true")
    machine["apt_installs_them"] = False
    kind, message = outcome(conftest.require_tools, "ip")
    assert kind == "fail" and message.startswith("CI=true: missing ip (Debian package iproute2)"), message
    assert message.endswith("apt-get install iproute2 exited 100: E: no network")


@pytest.mark.parametrize("ci", ["", "true"])
def test_tools_a_project_script_installs_itself_are_left_to_it(machine, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    assert outcome(conftest.require_tools, *conftest.SLURM_TOOLS, installed_by_script=True) == ("pass", "")
    assert machine["installs"] == []  # local_slurm.sh up installs them


def test_without_root_ci_fails_and_elsewhere_skips(machine, monkeypatch):
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 1000)
    assert outcome(conftest.require_root)[0] == "skip"
    # without root the script cannot apt-get either
    missing_sbatch = "missing sbatch (Debian package slurm-client)"
    assert outcome(conftest.require_tools, "sbatch", installed_by_script=True) == ("skip", missing_sbatch)
    monkeypatch.setenv("CI", "true")
    kind, message = outcome(conftest.require_root)
    assert kind == "fail" and message.startswith("CI=true: needs root"), message
    assert outcome(conftest.require_tools, "sbatch", installed_by_script=True) == ("fail", f"CI=true: {missing_sbatch}")


def test_every_tool_has_a_package():
    for tool in (*conftest.NETNS_TOOLS, *conftest.SLURM_TOOLS, *conftest.SSH_TOOLS):
        assert tool in conftest.PACKAGES
