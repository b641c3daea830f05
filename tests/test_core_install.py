"""The core distribution alone (`pip install fusion`, no extra) validates, runs the
workflows' test cases (model steps mocked), lists step types and runs a workflow, with none
of MLX, transformers, numba, scipy or the server installed; a command that needs an extra
says which one (docs/ci.md)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from engine.cli.extras import MODULE_EXTRAS
from tests.cli_helpers import fusion

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What the core must not bring: the model stack, the heavy numeric libraries, the server.
ABSENT = ("mlx", "mlx_lm", "mlx_vlm", "transformers", "numba", "scipy", "numpy", "litestar")
# A cold install downloads ~12 MB; pip's own cache makes a repeated run take seconds.
INSTALL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the core distribution installed from this work tree; its bin/."""
    root = tmp_path_factory.mktemp("core-install")
    # pip builds a local directory in place (build/, *.egg-info): a copy of what the wheel
    # is made of keeps the work tree untouched.
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("engine", "server"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    return venv / "bin"


def run(core: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd is never the work tree for `python`: its '' path entry would import the
    # repository's engine/ instead of the installed one.
    return subprocess.run(
        [str(core / args[0]), *map(str, args[1:])],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.e2e
def test_core_install_lacks_the_model_stack_and_the_server(core: Path, tmp_path: Path) -> None:
    probe = "import importlib, sys\nfor name in sys.argv[1:]:\n"
    probe += "    try:\n        importlib.import_module(name)\n"
    probe += "    except ModuleNotFoundError:\n        continue\n    print(name)\n"
    result = run(core, "python", "-c", probe, *ABSENT, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
    assert run(core, "python", "-m", "pip", "check", cwd=tmp_path).returncode == 0


@pytest.mark.e2e
def test_core_validates_the_predefined_workflows(core: Path, tmp_path: Path) -> None:
    result = run(core, "fusion", "validate", REPO / "workflows", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b[1-9]\d* file\(s\) checked, 0 error\(s\)", result.stderr)
    # The same verdict as the full install of the work tree gives.
    full = fusion("validate", REPO / "workflows", cwd=tmp_path)
    assert (result.stdout, result.stderr) == (full.stdout, full.stderr)


@pytest.mark.e2e
def test_core_runs_the_workflow_tests_with_mocked_models(core: Path, tmp_path: Path) -> None:
    result = run(core, "fusion", "test", REPO / "workflows", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b[1-9]\d* passed, 0 failed", result.stdout + result.stderr)


@pytest.mark.e2e
def test_core_lists_every_step_type(core: Path, tmp_path: Path) -> None:
    result = run(core, "fusion", "steps", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # A step module that imported an extra would be skipped with this log line.
    assert "step_plugin_load_failed" not in result.stdout + result.stderr
    listed = set(re.findall(r"^(\w+):", result.stdout, re.MULTILINE))
    assert listed == set(PYPROJECT["project"]["entry-points"]["fusion.steps"])


@pytest.mark.e2e
def test_core_runs_a_workflow_in_process(core: Path, tmp_path: Path) -> None:
    workflow = tmp_path / "greet.yaml"
    workflow.write_text(
        "id: greet\n"
        "input_schema:\n  type: object\n  properties:\n    name: {type: string}\n"
        "steps:\n"
        '  - step_id: hello\n    type: template\n    value: "hello {{ input.name }}"\n'
        'output: "{{ steps.hello.output }}"\n'
    )
    result = run(core, "fusion", "run", workflow, "--input", "name=ci", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_json = json.loads(result.stdout)
    assert run_json["status"] == "completed"
    assert "hello ci" in run_json.values()


@pytest.mark.e2e
def test_a_command_needing_an_extra_names_it(core: Path, tmp_path: Path) -> None:
    result = run(core, "fusion", "serve", "--data-dir", tmp_path / "data", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: fusion serve needs the server and models extras: pip install 'fusion[server,models"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.unit
def test_each_module_of_the_extras_table_is_installed_by_that_extra() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = {
        extra: {canonical(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]) for req in reqs}
        for extra, reqs in extras.items()
    }
    distributions = importlib.metadata.packages_distributions()
    for module, extra in MODULE_EXTRAS.items():
        owners = {canonical(dist) for dist in distributions.get(module, [])}
        assert owners & declared[extra], f"{module} ({owners}) is not in the {extra} extra"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
