"""docker/e2e.sh's preflight: before building anything it names what the machine lacks and how to get it.

Each case runs ``docker/e2e.sh --preflight`` with a PATH made for it: every program of the real
PATH except those named ``docker*``, plus, where a case needs one, a fake ``docker`` script that
answers the few commands the preflight asks (its version, ``buildx version``, ``compose
version``, ``image inspect``) the way a given installation would. No Docker engine is needed.
Also here: docker/e2e_check.py tells a check it could not run (exit 3) from a failed one (exit 1),
so e2e.sh never reports a broken interpreter or an empty ``docker save`` as a leak of pip settings.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "docker" / "e2e.sh"
E2E_CHECK = REPO / "docker" / "e2e_check.py"


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(scope="module")
def no_docker_bin(tmp_path_factory) -> Path:
    """A folder of links to every program on PATH except docker, docker-compose, dockerd and kin."""
    folder = tmp_path_factory.mktemp("bin")
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = folder / entry.name
            if entry.name.startswith("docker") or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return folder


def fake_docker(folder: Path, version: str, *, buildx: bool = False, engine: bool = True,
                compose: bool = True, base_image: bool = True) -> Path:
    """A ``docker`` script answering as a CLI of ``version`` with or without buildx and compose would."""
    folder.mkdir(parents=True, exist_ok=True)
    buildx_answer = ('echo "github.com/docker/buildx v0.21.2"; exit 0' if buildx else
                     'echo "docker: unknown command: docker buildx" >&2; exit 1')
    server = (f'echo "{version}"' if engine else
              'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1')
    compose_answer = ('echo "Docker Compose version v2.35.1"' if compose else
                      'echo "docker: unknown command: docker compose" >&2; exit 1')
    return executable(folder / "docker", f"""#!/bin/sh
case "$1" in
    buildx) {buildx_answer} ;;
    version) case "$*" in *Server*) {server} ;; *) echo "{version}" ;; esac ;;
    compose) {compose_answer} ;;
    image) exit {0 if base_image else 1} ;;
    *) echo "fake docker: $*: not expected in a preflight" >&2; exit 1 ;;
esac
""")


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """Stands in for the project's Python where a case is about docker (the real one imports torch)."""
    return executable(tmp_path / "python", '#!/bin/sh\necho "fake python: imports what the checks need"\n')


def preflight(path: list[Path], python: Path | str, *args: str, out: Path) -> subprocess.CompletedProcess:
    """``docker/e2e.sh --preflight ARGS`` with exactly this PATH; stdout and stderr together."""
    env = {"PATH": os.pathsep.join(map(str, path)), "HOME": str(out.parent), "PYTHON": str(python),
           "OUT": str(out), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(E2E), "--preflight", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def lines(run: subprocess.CompletedProcess, kind: str) -> list[str]:
    return [line for line in run.stdout.splitlines() if line.startswith(f"preflight: {kind}: ")]


def test_without_docker_it_names_docker_and_compose_and_how_to_get_them(no_docker_bin, fake_python, tmp_path):
    run = preflight([no_docker_bin], fake_python, "colm-base:bookworm", out=tmp_path / "out")
    assert run.returncode == 1, run.stdout
    missing = lines(run, "MISSING")
    assert len(missing) == 2, run.stdout
    assert "no docker CLI on PATH" in missing[0] and "apt-get install docker.io" in missing[0]
    assert missing[1].startswith("preflight: MISSING: compose:") and "docker-compose" in missing[1]
    assert "apt-get install docker-compose" in missing[1]
    assert lines(run, "ok") == ["preflight: ok: python: fake python: imports what the checks need"]
    assert "nothing was built or started" in run.stdout
    assert not (tmp_path / "out").exists(), "the preflight starts nothing: not even the output folder"


def test_docker_without_buildx_names_buildx_and_how_to_get_it(no_docker_bin, fake_python, tmp_path):
    fake_docker(tmp_path / "fake", "28.2.2", buildx=False)
    run = preflight([tmp_path / "fake", no_docker_bin], fake_python, out=tmp_path / "out")
    assert run.returncode == 1, run.stdout
    [line] = lines(run, "MISSING")
    assert line.startswith("preflight: MISSING: BuildKit:") and "28.2.2" in line and "no buildx" in line
    assert "apt-get install docker-buildx" in line, "how to get it on Debian"
    assert "DOCKER_BUILDKIT=0" in line and "RUN --mount" in line, "why the classic builder is no way out"
    assert "RUN --mount" in (REPO / "docker" / "Dockerfile").read_text(), "the reason given still holds"
    assert not (tmp_path / "out").exists()


def test_a_later_docker_on_path_with_buildkit_built_in_is_taken(no_docker_bin, fake_python, tmp_path):
    first = fake_docker(tmp_path / "first", "28.2.2", buildx=False, compose=False)
    second = fake_docker(tmp_path / "second", "20.10.24+dfsg1", buildx=False, compose=False)
    (tmp_path / "compose").mkdir()
    compose = executable(tmp_path / "compose" / "docker-compose", "#!/bin/sh\necho 1.29.2\n")
    run = preflight([first.parent, second.parent, compose.parent, no_docker_bin], fake_python,
                    "colm-base:bookworm", out=tmp_path / "out")
    assert run.returncode == 0, run.stdout
    docker, engine, compose_line, python, base = lines(run, "ok")
    assert docker.startswith(f"preflight: ok: docker: {second} 20.10.24+dfsg1, BuildKit built in")
    assert f"the first docker on PATH, {first} (28.2.2), has no buildx" in docker
    assert compose_line == "preflight: ok: compose: docker-compose 1.29.2", "v1 where there is no plugin"
    assert base == "preflight: ok: base image: colm-base:bookworm"
    assert run.stdout.splitlines()[-1] == "preflight: all found"


def test_unreachable_engine_and_missing_base_image_are_named(no_docker_bin, fake_python, tmp_path):
    fake_docker(tmp_path / "down", "28.2.2", buildx=True, engine=False)
    run = preflight([tmp_path / "down", no_docker_bin], fake_python, "colm-base:bookworm", out=tmp_path / "o")
    [line] = lines(run, "MISSING")
    assert run.returncode == 1 and "reaches no Docker engine (Cannot connect" in line
    assert "systemctl start docker" in line and "docker group" in line
    assert "base image colm-base:bookworm not looked for: no engine to ask" in run.stdout

    fake_docker(tmp_path / "up", "28.2.2", buildx=True, base_image=False)
    run = preflight([tmp_path / "up", no_docker_bin], fake_python, "colm-base:bookworm", out=tmp_path / "o")
    [line] = lines(run, "MISSING")
    assert run.returncode == 1 and "colm-base:bookworm is not on this engine" in line
    assert "docker/debian-base.sh colm-base:bookworm" in line


@pytest.mark.parametrize("python", ["absent", "bare"])
def test_a_missing_or_bare_python_is_named_as_such_with_make_venv(no_docker_bin, tmp_path, python):
    fake_docker(tmp_path / "fake", "28.2.2", buildx=True)
    if python == "absent":
        interpreter, said = tmp_path / ".venv" / "bin" / "python", "no project Python at"
    else:  # a Python without the project: this one with its site-packages turned off
        interpreter = executable(tmp_path / "python", f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
        said = "cannot import colm_server.service.journal (ModuleNotFoundError"
    run = preflight([tmp_path / "fake", no_docker_bin], interpreter, out=tmp_path / "out")
    assert run.returncode == 1, run.stdout
    [line] = lines(run, "MISSING")
    assert line.startswith("preflight: MISSING: python: ") and str(interpreter) in line and said in line
    assert "run `make venv`" in line and "pip" not in line.split("(")[0], "a missing Python, not a pip matter"


def test_with_buildx_compose_and_the_project_python_all_is_found(no_docker_bin, tmp_path):
    fake_docker(tmp_path / "fake", "28.2.2", buildx=True)
    run = preflight([tmp_path / "fake", no_docker_bin], sys.executable, "colm-base:bookworm",
                    out=tmp_path / "out")
    assert run.returncode == 0, run.stdout
    assert not lines(run, "MISSING")
    docker, _, compose, python, _ = lines(run, "ok")
    assert "BuildKit the buildx plugin (github.com/docker/buildx" in docker
    fake = tmp_path / "fake" / "docker"
    assert compose.startswith(f"preflight: ok: compose: {fake} compose (Docker Compose")
    assert python.endswith("imports what the checks need")
    assert run.stdout.splitlines()[-1] == "preflight: all found"


def test_e2e_check_says_it_could_not_check_rather_than_failing_the_check(tmp_path):
    """An empty ``docker save`` stream is exit 3 (not checked), not exit 1 (pip settings found)."""
    run = subprocess.run([sys.executable, str(E2E_CHECK), "layers", "--context", str(tmp_path)],
                         input=b"", capture_output=True, timeout=60)
    assert run.returncode == 3 and run.stdout == b""
    assert b"e2e_check layers: could not check: ReadError" in run.stderr.splitlines()[-1]


def test_e2e_looks_for_the_trainer_module_that_compose_runs():
    """e2e.sh finds the trainer rank to kill by its ``-m`` module: the one compose.e2e.yaml starts."""
    compose = yaml.safe_load((REPO / "docker" / "compose.e2e.yaml").read_text())
    command = compose["services"]["trainer"]["command"]
    module = command[command.index("-m") + 1]
    assert f"TRAIN_MODULE={module} " in E2E.read_text()
