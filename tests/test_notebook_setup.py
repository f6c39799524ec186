"""The notebooks' set-up (helpers.notebook.setup): what it installs on Colab, which torch it keeps, when it refuses to
go on, what it says elsewhere, and that it reads the committed locks. Offline: pip, nvidia-smi and the installed
packages are fakes here; scripts/check_colab_setup.py rehearses the real thing in a fresh environment."""

import platform
import re
import sys
import tomllib

import pytest
from packaging.specifiers import SpecifierSet

from helpers import notebook
from recipe import colab as installer

LINUX_X86 = sys.platform == "linux" and platform.machine() == "x86_64"  # the locks' GPU pins are for Linux x86_64
# A Colab GPU runtime as it starts: its own torch build and companions, older libraries, its Jupyter.
COLAB = {"torch": "2.10.0+cu128", "torchvision": "0.25.0+cu128", "triton": "3.5.1", "numpy": "2.0.2",
         "transformers": "4.57.1", "peft": "0.17.1", "accelerate": "1.10.1", "ipykernel": "6.17.1",
         "jupyterlab": "4.2.0", "sympy": "1.13.3", "nvidia-cublas-cu12": "12.8.4.1", "requests": "2.32.4"}


def names(requirements):
    return {re.split(r"[=<>!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


@pytest.fixture(scope="module")
def locks(repo):
    return {lock: installer.read_lock(repo / lock) for lock in ("requirements.lock", "requirements-cuda.lock")}


@pytest.fixture
def colab(monkeypatch, locks):
    """setup() on a forced Colab with fakes: returns the pip calls, the installed packages and the GPU to set."""
    state = {"have": dict(COLAB), "calls": [], "gpu": ("NVIDIA A100-SXM4-40GB", 39.5), "torch_needs": {}, "fail": set()}

    def pip_install(lock, names, *options):
        state["calls"].append((list(names), options))
        if state["fail"] & set(names):
            return "error: could not build wheels for mamba-ssm"
        state["have"].update({n: lock[n]["version"] for n in names})
        return ""

    monkeypatch.setenv("NOTEBOOK_SETUP", "colab")
    monkeypatch.setattr(installer, "pip_install", pip_install)
    monkeypatch.setattr(installer, "installed", lambda: dict(state["have"]))
    monkeypatch.setattr(installer, "gpu_info", lambda: state["gpu"])
    monkeypatch.setattr(installer, "torch_requirements", lambda names: {
        n: SpecifierSet(s) for n, s in state["torch_needs"].items() if n in names})
    monkeypatch.setattr(installer.metadata, "packages_distributions", lambda: {"numpy": ["numpy"]})
    return state


def test_read_lock_finds_every_pin_of_the_committed_locks(repo, locks):
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    for lock, direct in (("requirements.lock", project["dependencies"]),
                         ("requirements-cuda.lock", project["dependencies"] + extras)):
        pins = locks[lock]
        assert {n for n, pin in pins.items() if installer.DIRECT in pin["via"]} == names(direct), lock
        for name, version in (re.match(r"([\w.-]+)==([^;\s]+)", r).groups() for r in direct if "==" in r.split(";")[0]):
            assert pins[name.lower()]["version"] == version, (lock, name)  # pyproject's exact pins are the lock's
        assert all(pin["text"].count("--hash=sha256:") >= 1 for pin in pins.values()), lock
        assert "torch" in pins["accelerate"]["via"] or "accelerate" in pins["torch"]["via"]
    for pins in locks.values():  # one pin per Python version: this Python's
        assert pins["numpy"]["version"] == ("2.5.5" if sys.version_info >= (3, 12) else "2.4.6")
        assert "appnope" not in pins and "pywinpty" not in pins  # pins for macOS and Windows only


@pytest.mark.skipif(not LINUX_X86, reason="the locks' GPU pins are for Linux x86_64")
def test_plan_installs_what_the_notebooks_need_and_leaves_jupyter_and_torch(locks):
    todo, need, family = installer.plan(locks["requirements-cuda.lock"], COLAB)
    assert {"transformers", "trl", "peft", "datasets", "accelerate", "numpy", "unsloth", "mamba-ssm", "xformers",
            "bitsandbytes", "torch"} <= set(todo)
    assert not {"ipykernel", "jupyterlab", "papermill", "pytest", "nbclient", "tornado"} & need  # Colab's own
    assert {"torch", "torchvision", "triton", "nvidia-cublas", "sympy", "mpmath"} <= family
    assert not {"xformers", "transformers", "numpy", "filelock"} & family  # xformers: the runtime has none
    assert "requests" in todo and "sympy" in todo  # other versions than the lock's
    numpy = locks["requirements.lock"]["numpy"]["version"]
    cpu_todo, cpu_need, cpu_family = installer.plan(locks["requirements.lock"], {**COLAB, "numpy": numpy})
    assert not {"unsloth", "mamba-ssm", "causal-conv1d", "torchvision"} & cpu_need and "numpy" not in cpu_todo
    assert "torchvision" not in installer.plan(locks["requirements-cuda.lock"], {"torch": "2.10.0"})[2]


@pytest.mark.skipif(not LINUX_X86, reason="the locks' GPU pins are for Linux x86_64")
def test_setup_keeps_the_runtimes_torch_when_every_locked_package_accepts_it(colab, capsys):
    colab["torch_needs"] = {"peft": ">=1.13.0", "xformers": ">=2.10", "unsloth": "<2.15.0,>=2.4.0"}
    notebook.setup()
    out = capsys.readouterr().out
    first, (kernels, options) = colab["calls"][0][0], colab["calls"][-1]
    assert len(colab["calls"]) == 2 and {"transformers", "unsloth", "xformers", "numpy"} <= set(first)
    assert not {"torch", "torchvision", "triton", "nvidia-cublas", "mamba-ssm"} & set(first)
    assert sorted(kernels) == ["causal-conv1d", "mamba-ssm"] and options == ("--no-build-isolation",)
    assert colab["have"]["torch"] == "2.10.0+cu128" and colab["have"]["torchvision"] == "0.25.0+cu128"
    assert "20+ minutes" in out and "~10x slower" in out and "~1k tokens per step" in out
    assert "torch 2.10.0+cu128 (the runtime's own" in out and "GPU: NVIDIA A100-SXM4-40GB, 39.5 GiB" in out
    assert "transformers 5.17.0, trl 1.15.0, unsloth 2026.10.9" in out and "of their dependencies" in out
    assert "Restart the runtime" in out and "new numpy" in out  # imported before
    colab["calls"].clear()
    notebook.setup()  # run again: nothing left
    assert colab["calls"] == [] and "every locked package was already installed" in capsys.readouterr().out


@pytest.mark.skipif(not LINUX_X86, reason="the locks' GPU pins are for Linux x86_64")
def test_setup_installs_the_locked_torch_when_a_locked_package_refuses_the_runtimes(colab, capsys, monkeypatch):
    monkeypatch.setenv("INSTALL_KERNELS", "false")
    colab["torch_needs"] = {"peft": ">=1.13.0", "xformers": ">=2.10"}
    colab["have"]["torch"] = "2.9.1+cu126"
    notebook.setup()
    out = capsys.readouterr().out
    assert len(colab["calls"]) == 2 and {"torch", "triton", "torchvision", "nvidia-cublas"} <= set(colab["calls"][1][0])
    assert colab["have"]["torch"] == "2.11.0" and "mamba-ssm" not in colab["have"]
    assert "the lock's: xformers did not accept 2.9.1+cu126" in out and "new numpy, torch" in out
    assert "20+ minutes" not in out and "skipped (INSTALL_KERNELS=false)" in out and "~10x slower" in out


@pytest.mark.skipif(not LINUX_X86, reason="the locks' GPU pins are for Linux x86_64")
def test_a_failed_kernel_build_is_reported_and_the_set_up_goes_on(colab, capsys):
    colab["fail"] = {"mamba-ssm"}
    notebook.setup()
    out = capsys.readouterr().out
    assert "The Mamba kernels did not install (error: could not build wheels" in out and "~10x slower" in out
    assert "mamba-ssm" not in colab["have"] and "Set-up of" in out and "transformers 5.17.0" in out


def test_a_gpu_too_small_for_every_mode_stops_the_notebook_with_one_message(colab, monkeypatch):
    colab["gpu"] = ("Tesla T4", 14.7)
    for forced in ("colab", "no"):
        monkeypatch.setenv("NOTEBOOK_SETUP", forced)
        with pytest.raises(SystemExit) as stop:
            notebook.setup()
        message = str(stop.value)
        assert "Tesla T4, 14.7 GiB" in message and "22+ GiB" in message and "19.6 GiB" in message
        assert "MODEL_ID=outputs/tiny-nemotron" in message and "\n" not in message
    assert colab["calls"] == []
    colab["gpu"] = ("NVIDIA L4", 22.5)  # the smallest card that holds the 4-bit base
    monkeypatch.setenv("NOTEBOOK_SETUP", "colab")
    notebook.setup()
    assert colab["calls"]


def test_elsewhere_it_installs_nothing_and_says_what_differs_in_one_line(colab, locks, monkeypatch, capsys):
    monkeypatch.delenv("NOTEBOOK_SETUP")
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    colab["gpu"] = None
    colab["have"] = {n: pin["version"] for n, pin in locks["requirements.lock"].items()}
    notebook.setup()
    out = capsys.readouterr().out.splitlines()
    assert out == [out[0]] and "MODEL_ID=outputs/tiny-nemotron and DATA_SOURCE=data/sample" in out[0]
    colab["have"]["torch"] = "2.10.0"
    colab["have"].pop("transformers")
    notebook.setup()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 packages differ from the lock") and "torch 2.10.0, locked 2.11.0" in out[0]
    assert "transformers missing" in out[0] and "README" in out[0] and len(out) == 2
    assert colab["calls"] == []


def test_torch_requirements_come_from_the_installed_metadata():
    found = installer.torch_requirements(["peft", "transformers", "no-such-package"])
    assert set(found) == {"peft"}  # transformers asks for torch only through extras
    assert found["peft"].contains("2.11.0") and not found["peft"].contains("1.0")


def test_pip_install_uses_a_hash_checked_copy_of_the_lock_and_no_index(locks, monkeypatch, tmp_path):
    seen = {}

    def run(cmd, **kw):
        seen["cmd"], seen["file"] = cmd, open(cmd[cmd.index("-r") + 1]).read()
        return installer.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(installer.subprocess, "run", run)
    assert installer.pip_install(locks["requirements.lock"], ["peft", "trl"]) == ""
    assert {"--no-deps", "--require-hashes"} <= set(seen["cmd"]) and not any("index" in a for a in seen["cmd"])
    assert seen["file"] == locks["requirements.lock"]["peft"]["text"] + locks["requirements.lock"]["trl"]["text"]
    assert seen["file"].startswith("peft==0.21.2") and "--hash=sha256:" in seen["file"] and "://" not in seen["file"]


def test_resolve_path_finds_the_repository_from_any_folder(repo, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert notebook.resolve_path("data/sample") == str(repo / "data" / "sample")
    assert notebook.resolve_path("outputs/not-made-yet") == str(repo / "outputs" / "not-made-yet")  # made later
    assert notebook.resolve_path("nvidia/some-model") == "nvidia/some-model"  # a Hub id


def test_notebook_parameters_take_the_defaults_type_and_name_a_bad_value(monkeypatch):
    """Environment variables override the parameters cell in the default's type; a value that is not of that type
    is named with what was expected, not a bare int() or float() error."""
    for name, raw, default, expected in [("MAX_STEPS", "20", -1, 20), ("LEARNING_RATE", "1e-4", 2e-4, 1e-4),
                                         ("MERGE", "true", False, True), ("MERGE", "0", False, False),
                                         ("EVAL_LIMIT", "100", None, 100), ("EVAL_LIMIT", "none", None, None),
                                         ("REVISION", "main", None, "main"), ("MODEL_ID", "a/b", "x/y", "a/b")]:
        monkeypatch.setenv(name, raw)
        assert notebook.setting(name, default) == expected, (name, raw)
    monkeypatch.delenv("MAX_STEPS")
    assert notebook.setting("MAX_STEPS", -1) == -1
    for name, raw, default, words in [("MAX_STEPS", "abc", -1, "MAX_STEPS='abc': expected an integer"),
                                      ("LEARNING_RATE", "2e-4x", 2e-4, "LEARNING_RATE='2e-4x': expected a number"),
                                      ("MERGE", "maybe", False, "MERGE='maybe': expected true/false")]:
        monkeypatch.setenv(name, raw)
        with pytest.raises(ValueError, match=re.escape(words)):
            notebook.setting(name, default)
