"""The docker deployment: compose.yaml is valid and wired as intended, job.yaml is a valid selector config.

No Docker engine is needed. The compose checks run ``docker-compose config`` (skipped when it is not
installed); the rest reads the files and checks them against the project's own config loader, console
scripts and trainer arguments, so that a renamed key, script or flag breaks here and not at deploy time.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from colm_server.config import fingerprint, load_config
from colm_server.data.prepare import prepare
from colm_server.train import parse_args

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
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
    """``(torchrun options, colm_server.train arguments)`` of the trainer's torchrun command."""
    argv = words(command)
    assert argv[0] == "torchrun", argv
    m = argv.index("-m")
    assert argv[m + 1] == "colm_server.train", argv
    options = {}
    for word in argv[1:m]:
        name, _, value = word.partition("=")
        options[name.replace("_", "-")] = value
    return options, argv[m + 2:]


@pytest.fixture(scope="module")
def raw() -> dict:
    """compose.yaml as written (no docker-compose needed)."""
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    """compose.yaml as docker-compose resolves it: validated, paths absolute, defaults filled in."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package): "
                    "compose.yaml not validated")
    run = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"docker-compose config failed:\n{run.stderr}"
    return yaml.safe_load(run.stdout)


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
