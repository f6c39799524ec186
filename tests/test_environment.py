"""The installed environment is exactly the committed lock's, `./run` keeps it so, and nothing committed that installs
packages names a registry or a download address."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import Specifier
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion

REPO = Path(__file__).resolve().parents[1]
MAIN_LOCK = REPO / "requirements.lock"
CUDA_LOCK = REPO / "requirements-cuda.lock"
# What `uv pip sync` leaves in a venv that was created with them, though no lock lists them.
SEED_PACKAGES = {"pip", "setuptools", "wheel"}
# The GPU machine, and Colab, run Python 3.12 on Linux x86_64; CI and most laptops 3.11.
LINUX = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
         "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PYTHONS = {"3.11": LINUX | {"python_version": "3.11", "python_full_version": "3.11.7"},
           "3.12": LINUX | {"python_version": "3.12", "python_full_version": "3.12.12"}}


def lock_pins(text: str, environment: dict | None = None) -> dict[str, str]:
    """`{name: version}` from a hash-pinned lock's `name==version [; marker]` lines, keeping those whose marker holds
    for `environment` (this interpreter where not given; keys given override its values)."""
    env = default_environment() | (environment or {})
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith((" ", "#", "-")):
            continue
        req = Requirement(line.rstrip(" \\"))
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(f"line {number} does not pin one version: {line!r}")
        if req.marker is None or req.marker.evaluate(env):
            pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def installed_versions() -> dict[str, str]:
    """`{name: version}` of the distributions this interpreter imports (the first of a name on sys.path)."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def drift(pins: dict[str, str], installed: dict[str, str], lock_name: str = "the lock") -> list[str]:
    """One line per difference between the lock's pins and what is installed: missing, another version, or installed
    but not in the lock (seed packages aside). Empty when they agree."""
    problems = []
    for name, version in sorted(pins.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}: not installed ({lock_name} pins {version})")
            continue
        try:
            same = Specifier(f"=={version}").contains(have, prereleases=True)  # 2.11.0+cu130 is 2.11.0
        except InvalidVersion:
            same = False
        if not same:
            problems.append(f"{name}: {have} installed, {lock_name} pins {version}")
    for name in sorted(installed.keys() - pins.keys() - SEED_PACKAGES):
        problems.append(f"{name}: {installed[name]} installed, not in {lock_name}")
    return problems


def gpu_packages() -> set[str]:
    """The direct requirements of pyproject's GPU extras (kernels, unsloth)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {canonicalize_name(Requirement(r).name) for extra in ("kernels", "unsloth") for r in extras[extra]}


def expected_lock(installed: dict[str, str]) -> Path:
    """The lock this environment should match: the CUDA lock once any of the GPU extras is installed, else the main
    one (`LOCK=requirements-cuda.lock ./run ...` installs all of the former)."""
    return CUDA_LOCK if gpu_packages() & installed.keys() else MAIN_LOCK


# --- the installed environment ---------------------------------------------------------------------------------------

def test_installed_environment_is_exactly_the_lock():
    installed = installed_versions()
    lock = expected_lock(installed)
    problems = drift(lock_pins(lock.read_text()), installed, lock.name)
    assert not problems, (f"this environment differs from {lock.name} in {len(problems)} package(s); `./run ...` "
                          "syncs .venv to the lock:\n  " + "\n  ".join(problems))


def test_drift_names_each_package_that_is_off():
    text = MAIN_LOCK.read_text()
    pins = lock_pins(text)
    assert pins["torch"] == "2.11.0" and "pytest" in pins and "bitsandbytes" in pins
    installed = dict(pins)
    assert drift(pins, installed) == []
    assert drift(pins, installed | {"torch": "2.11.0+cu130", "pip": "26.0"}) == []   # local label; seed package

    # One version edited in the lock text, one package added to it, one that this platform's markers exclude.
    doctored = text.replace("\ntorch==2.11.0 \\", "\ntorch==2.10.0 \\")
    doctored += "\nmade-up-package==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    doctored += "other-platform-only==1.0 ; sys_platform == 'no-such-platform' \\\n    --hash=sha256:" + "1" * 64 + "\n"
    assert drift(lock_pins(doctored), installed, "doctored.lock") == [
        "made-up-package: not installed (doctored.lock pins 1.0)",
        "torch: 2.11.0 installed, doctored.lock pins 2.10.0",
    ]
    # And from the environment's side: a package missing, one upgraded, one that no lock asked for.
    off = dict(installed)
    del off["pytest"]
    off["babel"] = "9.9.9"
    off["something-else"] = "1.0"
    assert drift(pins, off, "requirements.lock") == [
        f"babel: 9.9.9 installed, requirements.lock pins {pins['babel']}",
        f"pytest: not installed (requirements.lock pins {pins['pytest']})",
        "something-else: 1.0 installed, not in requirements.lock",
    ]


def test_lock_pins_follow_the_markers():
    text = MAIN_LOCK.read_text()
    # numpy is pinned once for Python < 3.12 and once for 3.12+: each interpreter gets one of them.
    assert lock_pins(text, PYTHONS["3.11"])["numpy"] != lock_pins(text, PYTHONS["3.12"])["numpy"]
    assert "nvidia-cublas" in lock_pins(text, PYTHONS["3.11"])
    assert "nvidia-cublas" not in lock_pins(text, {"sys_platform": "darwin", "platform_system": "Darwin"})
    with pytest.raises(ValueError, match="does not pin one version"):
        lock_pins("torch>=2.0 \\\n    --hash=sha256:" + "0" * 64 + "\n")


def test_the_gpu_extras_select_the_cuda_lock():
    assert gpu_packages() == {"mamba-ssm", "causal-conv1d", "unsloth", "unsloth-zoo"}
    assert expected_lock({"torch": "2.11.0"}) == MAIN_LOCK
    assert expected_lock({"torch": "2.11.0", "unsloth": "2026.10.9"}) == CUDA_LOCK


# --- the committed locks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("python", sorted(PYTHONS))
def test_locks_pin_what_pyproject_asks_for(python):
    """Both locks were regenerated after pyproject.toml's last change: each requirement is pinned, at a version it
    accepts."""
    env = PYTHONS[python]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    everywhere = pyproject["project"]["dependencies"] + pyproject["dependency-groups"]["dev"]
    extras = pyproject["project"]["optional-dependencies"]
    main, cuda = lock_pins(MAIN_LOCK.read_text(), env), lock_pins(CUDA_LOCK.read_text(), env)
    wanted = [(MAIN_LOCK.name, main, r) for r in everywhere]
    wanted += [(CUDA_LOCK.name, cuda, r) for r in everywhere + extras["kernels"] + extras["unsloth"]]
    for lock_name, pins, text in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(default_environment() | env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock_name} lacks {req.name} (Python {python}): regenerate it (scripts/lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock_name} pins {name}=={pins[name]}, pyproject.toml asks for {req} (Python {python}): scripts/lock")
    assert not gpu_packages() & main.keys(), "the GPU extras belong in requirements-cuda.lock only"


@pytest.mark.parametrize("python", sorted(PYTHONS))
def test_cuda_lock_is_the_main_lock_plus_the_gpu_stack(python):
    """The GPU machine and Colab train with the same versions as CI: every package both locks pin, they pin alike."""
    env = PYTHONS[python]
    main, cuda = lock_pins(MAIN_LOCK.read_text(), env), lock_pins(CUDA_LOCK.read_text(), env)
    assert main.keys() <= cuda.keys(), f"only in {MAIN_LOCK.name}: {sorted(main.keys() - cuda.keys())}"
    assert {n: cuda[n] for n in main} == main
    assert gpu_packages() <= cuda.keys()


# --- no addresses ----------------------------------------------------------------------------------------------------

SCHEME = "://"
ADDRESS = re.compile(
    r"[a-z][a-z0-9+.-]*" + re.escape(SCHEME)                       # any URL
    + r"|\bfile:"                                                  # a local path as a URL
    + r"|--(?:extra-)?index-url\b|--find-links\b|--trusted-host\b"  # index options, with or without a value
    + r"|^\s*-[ifr]\s"                                             # their short forms
    + r"|\b(?:[a-z0-9-]+\.)+(?:org|com|net|io|dev|ai|co|cloud|app|sh|edu|gov)\b",  # a host name
    re.IGNORECASE | re.MULTILINE)


def addresses(text: str) -> list[str]:
    """The lines of `text` that name a URL, an index or a host."""
    return [line for line in text.splitlines() if ADDRESS.search(line)]


def test_address_check_finds_urls_indexes_and_hosts():
    lock = MAIN_LOCK.read_text()
    assert addresses(lock) == []
    for added in ("--index-url " + "mirror.example.org", "--extra-index-url=x", "-f /opt/wheels", "--trusted-host x",
                  "torch @ https" + SCHEME + "example.invalid/torch.whl", "torch @ file" + SCHEME + "/tmp/torch.whl",
                  "    # from mirror.example.org"):
        assert addresses(lock + added + "\n") == [added], added


@pytest.mark.parametrize("name", ["requirements.lock", "requirements-cuda.lock", "pyproject.toml", "run", ".ci/run",
                                  "scripts/lock"])
def test_install_files_name_no_address(name):
    found = addresses((REPO / name).read_text())
    assert not found, f"{name} names a URL, index or host (locks are hash-pinned and address-free): {found[:3]}"


# --- the launcher and plain `uv run` ---------------------------------------------------------------------------------

BASH = shutil.which("bash") or "/bin/bash"


def launcher(args, cwd, env_changes=None, timeout=300):
    """`bash run ARGS` in `cwd`, outside any activated venv, with `env_changes`."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "LOCK", "UV_PYTHON")}
    env.update(env_changes or {})
    return subprocess.run([BASH, str(cwd / "run"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def lock_block(text: str, name: str) -> str:
    """One package's lines (pin, hashes, comments) from a lock's text."""
    match = re.search(rf"^{re.escape(name)}==.*?(?=^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{name} is not in the lock"
    return match.group(0)


@pytest.fixture
def scratch_project(tmp_path):
    """A copy of the launcher and pyproject.toml, with one-package locks cut from requirements.lock (bad.lock: packaging
    with its hashes reversed)."""
    for name in ("run", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    text = MAIN_LOCK.read_text()
    (tmp_path / "one.lock").write_text(lock_block(text, "packaging"))
    (tmp_path / "other.lock").write_text(lock_block(text, "six"))
    bad = re.sub(r"sha256:([0-9a-f]{64})", lambda m: "sha256:" + m.group(1)[::-1], lock_block(text, "packaging"))
    (tmp_path / "bad.lock").write_text(bad)
    return tmp_path


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH")
def test_launcher_syncs_the_venv_to_the_lock(scratch_project):
    p = scratch_project
    py = {"UV_PYTHON": sys.executable}
    where = "import sys, importlib.metadata as m; print(sys.prefix, sorted(d.metadata['Name'] for d in m.distributions()))"

    r = launcher(["python", "-c", where], p, py | {"LOCK": "one.lock"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(" ", 1) == [str(p / ".venv"), "['packaging']\n"]
    assert (p / ".venv" / "locked-from").read_text().strip() == "one.lock"

    # .venv keeps following one.lock; a package installed by hand is removed again, and the launcher says so.
    subprocess.run(["uv", "pip", "install", "--quiet", "--python", str(p / ".venv/bin/python"),
                    "--no-deps", "--require-hashes", "-r", str(p / "other.lock")], check=True, cwd=p)
    r = launcher(["python", "-c", where], p, py)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("['packaging']\n")
    assert " - six==" in r.stderr

    # Another lock replaces the set; a lock whose hashes do not match what it installs fails, and runs nothing.
    r = launcher(["python", "-c", where], p, py | {"LOCK": "other.lock"})
    assert r.returncode == 0 and r.stdout.endswith("['six']\n"), r.stderr
    r = launcher(["python", "-c", "print('ran')"], p, py | {"LOCK": "bad.lock"})
    assert r.returncode != 0 and "ran" not in r.stdout
    assert "hash mismatch" in r.stderr.lower()
    assert (p / ".venv" / "locked-from").read_text().strip() == "other.lock"


def test_launcher_mistakes_get_one_clear_message(scratch_project, tmp_path_factory):
    p = scratch_project
    bin_dir = tmp_path_factory.mktemp("bin")   # a PATH without uv
    for tool in ("dirname", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    results = {
        "usage: ./run COMMAND": launcher([], p),
        "run: no lock file 'requirements-gpu.lock'": launcher(["python", "-V"], p, {"LOCK": "requirements-gpu.lock"}),
        "run: uv is not installed": launcher(["python", "-V"], p, {"PATH": str(bin_dir)}),
    }
    for message, r in results.items():
        assert r.returncode == 2 and r.stderr.startswith(message), r.stderr
        assert len(r.stderr.splitlines()) <= 2 and "Traceback" not in r.stderr
    assert not (p / ".venv").exists(), "a refused command still set up .venv"


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH")
def test_plain_uv_run_leaves_the_environment_alone(tmp_path):
    """After set-up, `uv run ...` runs in .venv as it is: no re-resolving pyproject.toml, no uv.lock written."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "README.md").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_NO_SYNC", "UV_FROZEN", "UV_LOCKED",
                                                             "UV_PROJECT_ENVIRONMENT", "UV_PYTHON")}
    subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(tmp_path / ".venv")], check=True,
                   env=env)
    r = subprocess.run(["uv", "run", "--offline", "python", "-c", "import sys; print(sys.prefix)"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    listed = subprocess.run(["uv", "pip", "freeze", "--python", str(tmp_path / ".venv/bin/python")], env=env,
                            capture_output=True, text=True, check=True).stdout
    assert not (tmp_path / "uv.lock").exists(), "uv run resolved pyproject.toml and wrote a uv.lock"
    assert listed == "", f"uv run installed packages:\n{listed[:500]}"
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / ".venv"), r.stderr


# --- CI and the README -----------------------------------------------------------------------------------------------

def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in quick_start.strip().splitlines()]
    assert len(commands) == 2, f"the quick start is two commands: {commands}"
    assert commands[0].endswith("train.py --preset smoke") and commands[1].endswith("pytest")
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == commands[1]
    for name in ("run", ".ci/run", "scripts/lock"):   # committed with the executable bit, as `./run` needs
        assert os.access(REPO / name, os.X_OK), f"{name} is not executable: chmod +x {name}"
