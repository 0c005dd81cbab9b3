"""The container image (Dockerfile): hadolint finds nothing, the final stage runs as a non-root
user with what KubeRay's probes need, the chart's default image is the one it builds, and its
install steps, run as written into a fresh venv, give a working `eft` with the extras the
image serves with and without build-only tools (no Docker engine here: the steps, not a build)."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "style", str(path)], capture_output=True, text=True, timeout=60)


def final_stage() -> list[str]:
    lines = DOCKERFILE.read_text().splitlines()
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from:]


def test_hadolint_finds_nothing(tmp_path):
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl && pip install requests\n")
    result = hadolint(bad)  # the check can fail
    assert result.returncode == 1 and {"DL3006", "DL3008", "DL3013"} <= set(result.stdout.split()) | {w.strip(":") for w in result.stdout.split()}


def test_the_image_runs_as_non_root_with_what_kuberay_probes_need():
    stage = "\n".join(final_stage())
    users = [line.split()[1] for line in final_stage() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "install -y --no-install-recommends wget" in stage  # KubeRay < 1.6 probes: bash -c "wget ... | grep success"


def test_the_chart_defaults_to_the_image_the_dockerfile_builds():
    chart = yaml.safe_load((ROOT / "helm" / "eft-serve" / "Chart.yaml").read_text())
    image = yaml.safe_load((ROOT / "helm" / "eft-serve" / "values.yaml").read_text())["image"]
    assert f"docker build -t {image['repository']}:{image['tag']} ." in DOCKERFILE.read_text()
    assert image["tag"] == chart["appVersion"]


def install_command(venv: Path) -> list[str]:
    """The Dockerfile's `RUN make install ...`, aimed at ``venv``, with this interpreter and
    pip's own index for torch (no internet here: torch comes from the local wheel)."""
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("RUN make install")]
    words = shlex.split(line.removeprefix("RUN "))
    replaced = {"VENV": str(venv), "PYTHON": sys.executable, "TORCH_INDEX": ""}
    return [w if "=" not in w or w.split("=")[0] not in replaced else f"{w.split('=')[0]}={replaced[w.split('=')[0]]}" for w in words]


@pytest.mark.slow
def test_the_install_steps_give_a_working_eft_in_a_fresh_venv(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "src"
    for name in tracked:  # what `COPY . .` sends (.dockerignore keeps the rest out)
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    venv = tmp_path / "opt-eft"
    command = install_command(venv)
    assert command[:2] == ["make", "install"] and "EXTRAS=tp,plot" in command and "EDITABLE=" in command
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")} | {"PIP_NO_COMPILE": "1"}  # no .pyc: a quarter of the time, and not what is checked
    built = subprocess.run(command, cwd=source, capture_output=True, text=True, timeout=1200, env=env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    python = venv / "bin" / "python"
    probe = "import deepspeed, matplotlib, services, importlib.util as u; from services.pb.eft.v1 import eft_pb2; print(services.__file__); print(u.find_spec('grpc_tools'))"
    found = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert found.returncode == 0, found.stderr[-3000:]
    module_file, grpc_tools = found.stdout.split()[-2:]
    assert "site-packages" in module_file and grpc_tools == "None"  # a built wheel, stubs inside; no build-only tools
    helped = subprocess.run([str(venv / "bin" / "eft"), "serve", "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert helped.returncode == 0 and "--address" in helped.stdout
