"""The selector's configuration: one typed dataclass per section, from YAML and ``--set`` overrides.

YAML keys, CLI help and the README's table all come from the fields below (help in field metadata).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from colm_server.data.shards import ShardConfig, expand_urls
from colm_server.select.config import SelectorConfig
from colm_server.typed import check_types, hints, show, typed

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The frozen base model and the LoRA adapter the selector scores with."""

    source: str = _field("tiny:llama", "HF model folder, .gguf file, 'smollm2', or 'tiny:<arch>' (random); "
                         "trainers' --model must be the same text")
    num_layers: int | None = _field(None, "keep only the first n decoder layers (smoke tests); null = all")
    device: str = _field("auto", "'auto' (cuda when available), 'cuda', 'cuda:N' or 'cpu'")
    dtype: str = _field("auto", f"one of {DTYPES}; auto = bfloat16 on cuda, float32 on cpu")
    lora_r: int = _field(8, "LoRA rank")
    lora_alpha: float = _field(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _field(0.0, "LoRA dropout of the trainers' adapter (off while scoring)")
    lora_targets: list[str] | None = _field(
        None, "modules LoRA wraps, e.g. [q_proj, v_proj]; null = the attention projections")
    adapter: str | None = _field(None, "peft adapter folder to start from (its r/alpha/targets then rule)")

    def __post_init__(self) -> None:
        check_types(self, "model.")
        _check(self.source.strip() != "", "model.source", "must not be empty")
        _check(self.num_layers is None or self.num_layers >= 1, "model.num_layers",
               f"must be >= 1 or null, got {self.num_layers}")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "model.device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.lora_r >= 1, "model.lora_r", f"must be >= 1, got {self.lora_r}")
        _check(self.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1, "model.lora_dropout",
               f"must be in [0, 1), got {self.lora_dropout}")
        _check(self.lora_targets is None or (len(self.lora_targets) > 0 and all(self.lora_targets)),
               "model.lora_targets", f"must be a non-empty list of names or null, got {self.lora_targets}")
        _check(self.adapter != "", "model.adapter", "must be a folder or null")

    def resolve(self, cuda_available: bool) -> tuple[str, str]:
        """``(device, dtype)`` with ``auto`` decided: cuda when available; bfloat16 on cuda, else float32."""
        device = ("cuda" if cuda_available else "cpu") if self.device == "auto" else self.device
        auto = "bfloat16" if device.startswith("cuda") else "float32"
        return device, auto if self.dtype == "auto" else self.dtype


@dataclass(kw_only=True, slots=True)
class TokenizeConfig:
    """How records become token rows."""

    max_length: int = _field(512, "tokens per sample; longer samples are truncated")
    chat_template: bool = _field(True, "wrap prompts in the tokenizer's chat template when it has one")
    min_prompt_fraction: float = _field(0.25, "share of max_length kept for the prompt's head if truncating")

    def __post_init__(self) -> None:
        check_types(self, "tokenize.")
        _check(self.max_length >= 2, "tokenize.max_length", f"must be >= 2, got {self.max_length}")
        _check(0.0 <= self.min_prompt_fraction <= 1.0, "tokenize.min_prompt_fraction",
               f"must be in [0, 1], got {self.min_prompt_fraction}")


@dataclass(kw_only=True, slots=True)
class ServiceConfig:
    """The gRPC service: where it listens, the job's ranks, flow control, and the journal."""

    job_id: str = _field("default", "the training job this selector serves; trainers join with it")
    host: str = _field("127.0.0.1", "address to listen on")
    port: int = _field(50051, "port to listen on; 0 = pick a free port")
    world_size: int = _field(1, "W: trainer ranks of the job")
    prefetch: int = _field(2, "steps selected ahead of the slowest rank (staleness bound)")
    max_inflight: int = _field(4, "unacknowledged batches per rank")
    max_message_mb: int = _field(64, "largest gRPC message, in MiB")
    max_adapter_mb: int = _field(1024, "largest adapter push, in MiB")
    work_dir: str = _field("./colm-work", "journal, cursor and normalisation state live here")
    journal_retention: int = _field(1000, "journaled steps kept for trainer restarts; older ones are pruned")
    auth_token_file: str = _field(
        "", "file holding the shared token every RPC but health checks must carry; '' = no token")
    tls_cert: str = _field("", "PEM certificate (chain) to serve TLS with, set with tls_key; '' = plaintext")
    tls_key: str = _field("", "PEM private key of tls_cert")
    metrics_port: int | None = _field(
        None, "serve Prometheus metrics at http://host:port/metrics; 0 = a free port; null = off")
    first_message_timeout: float = _field(
        10.0, "seconds a call may take to send its first message (a stream's Join, a push's first chunk); "
        "then it is ended with DEADLINE_EXCEEDED")
    chunk_timeout: float = _field(
        30.0, "seconds an adapter push may pause between two chunks, or wait for a push slot; "
        "then it is ended (DEADLINE_EXCEEDED, or RESOURCE_EXHAUSTED without a slot)")
    max_pushes: int = _field(
        2, "adapter pushes received at once (each holds at most the adapter's bytes); more wait for a slot")

    def __post_init__(self) -> None:
        check_types(self, "service.")
        for name in ("job_id", "host", "work_dir"):
            _check(getattr(self, name).strip() != "", f"service.{name}", "must not be empty")
        _check(0 <= self.port <= 65535, "service.port", f"must be in [0, 65535], got {self.port}")
        _check(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "service.metrics_port",
               f"must be null or in [0, 65535], got {self.metrics_port}")
        for name in ("world_size", "prefetch", "max_inflight", "max_message_mb", "max_adapter_mb",
                     "max_pushes"):
            _check(getattr(self, name) >= 1, f"service.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("first_message_timeout", "chunk_timeout"):  # a day: any longer wait is a stuck call
            _check(0 < getattr(self, name) <= 86400, f"service.{name}",
                   f"must be in (0, 86400] seconds, got {getattr(self, name)}")
        _check(self.max_message_mb < 2048, "service.max_message_mb",
               f"must be < 2048 (gRPC's limit), got {self.max_message_mb}")
        window = self.prefetch + self.max_inflight  # a reconnecting rank may ask for any step in it
        _check(self.journal_retention >= window, "service.journal_retention",
               f"must be >= prefetch + max_inflight ({window}), got {self.journal_retention}")
        for name, other in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
            _check(bool(getattr(self, name)) or not getattr(self, other), f"service.{name}",
                   f"required when service.{other} is set: TLS needs both the certificate and its key")

    def auth_token(self) -> str | None:
        """The stripped content of ``auth_token_file``, None when it is not set.

        Read when serving starts, not when the config loads: the file need only exist on the selector.
        """
        if not self.auth_token_file:
            return None
        token = _read_file("service.auth_token_file", self.auth_token_file).decode(errors="replace").strip()
        _check(token != "", "service.auth_token_file", f"{self.auth_token_file!r} is empty")
        _check(token.isascii() and token.isprintable() and " " not in token, "service.auth_token_file",
               "the token must be one word of printable ASCII (it travels as gRPC metadata)")
        return token

    def check_work_dir(self) -> None:
        """ValueError naming ``service.work_dir`` unless it is a writable folder or can be made one.

        Checked where the selector runs (with ``Config.validate_for_serving``, by the service's
        ``build_engine``), not when vetting a deployment's config elsewhere; nothing is created here,
        the folder is made with the job.
        """
        path, what = Path(self.work_dir), "cannot be checked"
        try:
            existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
            if existing == path and not path.is_dir():
                raise ValueError(f"service.work_dir: {self.work_dir!r} exists and is not a directory")
            if not existing.is_dir():
                raise ValueError(f"service.work_dir: cannot create {self.work_dir!r}: "
                                 f"{str(existing)!r} is not a directory")
            what = "is not writable" if existing == path else f"cannot be created in {str(existing)!r}"
            with tempfile.TemporaryFile(dir=existing):  # a real write: modes, read-only mounts, ACLs
                pass
        except OSError as e:
            raise ValueError(f"service.work_dir: {self.work_dir!r} {what} "
                             f"({e.strerror or type(e).__name__})") from None

    def tls_pair(self) -> tuple[bytes, bytes] | None:
        """``(private key PEM, certificate PEM)`` of ``tls_key`` and ``tls_cert``; None when TLS is off."""
        if not self.tls_cert:
            return None
        return _read_file("service.tls_key", self.tls_key), _read_file("service.tls_cert", self.tls_cert)


def _read_file(key: str, path: str) -> bytes:
    """The bytes of ``path``; ValueError naming ``key`` when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{key}: cannot read {path!r} ({e.strerror or type(e).__name__})") from None


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": ShardConfig, "tokenize": TokenizeConfig,
                             "selector": SelectorConfig, "service": ServiceConfig}


@dataclass(kw_only=True, slots=True)
class Config:
    """The whole selector: one section per concern. ``data.urls`` is None until given."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: ShardConfig = field(default_factory=lambda: _build_section("data", {}))
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def __post_init__(self) -> None:
        layers = self.model.num_layers
        _check(layers is None or self.selector.sketch_layers <= layers, "selector.sketch_layers",
               f"must not exceed model.num_layers ({layers}), got {self.selector.sketch_layers}")

    @property
    def records_per_step(self) -> int:
        """W*L: the records one step takes from the stream, a large batch for each of the W ranks."""
        return self.service.world_size * self.selector.large_batch_size

    def step_selector(self) -> SelectorConfig:
        """The selector of one step over all W ranks: it picks b*W samples of the step's W*L."""
        return replace(self.selector, batch_size=self.selector.batch_size * self.service.world_size,
                       large_batch_size=self.records_per_step)

    def validate_for_serving(self) -> None:
        """Raise ValueError when something a running selector needs is missing or unreadable.

        That is the shard URLs, the token file and the TLS files: checked here rather than at load
        time, so a config naming files that exist only on the selector's machine loads anywhere.
        """
        _check(self.data.urls is not None, "data.urls",
               "required: set it under data: in the config file or with --set data.urls=PATTERN")
        self.service.auth_token()
        self.service.tls_pair()


def _build_section(section: str, values: Mapping[str, Any]) -> Any:
    cls, field_types = SECTIONS[section], hints(SECTIONS[section])
    kwargs = {k: typed(f"{section}.{k}", v, field_types[k]) for k, v in values.items()
              if not (section == "data" and k == "urls" and v is None)}
    unset = section == "data" and "urls" not in kwargs
    if unset:  # validate every other data key now; data.urls stays None until serving
        kwargs["urls"] = "unset"
    try:
        obj = cls(**kwargs)
    except ValueError as e:  # SelectorConfig and ShardConfig name the field without its section
        message = str(e)
        first = re.match(r"\w+", message)
        if first and first.group() in field_types:
            raise ValueError(f"{section}.{message}") from None
        raise
    if unset:
        obj.urls = None
    return obj


def _key(section: Any, name: Any = None) -> None:
    """Refuse an unknown section or key, listing the valid ones."""
    if section not in SECTIONS:
        raise ValueError(f"{show(section)}: unknown section; valid sections: {', '.join(SECTIONS)}")
    valid = [f.name for f in fields(SECTIONS[section])]
    if name is not None and name not in valid:
        raise ValueError(f"{section}.{name}: unknown key; valid keys of {section}: {', '.join(valid)}")


def _collect(doc: Any, origin: str) -> dict[str, dict[str, Any]]:
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ValueError(f"{origin}: expected a mapping of sections {list(SECTIONS)}, got {show(doc)}")
    values: dict[str, dict[str, Any]] = {}
    for section, body in doc.items():
        _key(section)
        if not isinstance(body, (Mapping, type(None))):
            raise ValueError(f"{section}: expected a mapping of keys, got {show(body)}")
        for name, value in (body or {}).items():
            _key(section, name)
            values.setdefault(section, {})[name] = value
    return values


def _parse_override(item: Any, values: dict[str, dict[str, Any]]) -> None:
    """Apply ``section.key=value``; the value is YAML, or the raw text where a string is expected."""
    key, equals, text = item.partition("=") if isinstance(item, str) else ("", "", "")
    section, _, name = key.strip().partition(".")
    if not (equals and name):
        raise ValueError(f"override {show(item)}: expected section.key=value, e.g. selector.batch_size=16")
    _key(section, name)
    hint = hints(SECTIONS[section])[name]
    takes_str = hint is str or str in typing.get_args(hint)
    takes_map = any(typing.get_origin(a) is dict for a in typing.get_args(hint))  # e.g. {a: 1, b: 2}
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:
        if not takes_str or text.lstrip().startswith(("[", "{") if takes_map else "["):
            raise ValueError(f"{section}.{name}: cannot parse {show(text)} ({type(e).__name__})") from None
        value = text.strip()
    kept = (str, list, type(None), dict) if takes_map else (str, list, type(None))
    if takes_str and not isinstance(value, kept):  # job_id=007 stays "007"
        value = text.strip()
    values.setdefault(section, {})[name] = value


def from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A validated Config from ``{section: {key: value}}`` (as ``to_dict`` writes) plus overrides."""
    return _from_values(_collect(data, "config"), overrides)


def _from_values(values: dict[str, dict[str, Any]], overrides: Sequence[str]) -> Config:
    for item in overrides:
        _parse_override(item, values)
    sections = {name: _build_section(name, values.get(name, {})) for name in SECTIONS}
    return Config(**sections)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The config of a YAML file (None: the defaults) with ``section.key=value`` overrides applied."""
    try:
        doc = None if path is None else yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # also not UTF-8, nested too deep, int too long
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    return _from_values(_collect(doc, str(path)), overrides)


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if value == "":  # visible in the table and in --help
        return "''"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value)


def config_fields() -> list[tuple[str, str, str]]:
    """``(section.key, default as text, help)`` for every field of every section, in declaration order."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            default = (f.default if f.default is not MISSING
                       else f.default_factory() if f.default_factory is not MISSING else MISSING)
            text = "(required)" if default is MISSING else _text(default)
            rows.append((f"{section}.{f.name}", text, f.metadata.get("help", "")))
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` of plain YAML/JSON types; ``from_dict`` reads it back."""
    return {name: {f.name: _plain(getattr(getattr(config, name), f.name)) for f in fields(cls)}
            for name, cls in SECTIONS.items()}


def to_yaml(config: Config) -> str:
    """The config as a YAML file ``load_config`` reads, headed by its fingerprint."""
    return f"# fingerprint: {fingerprint(config)}\n" + yaml.safe_dump(to_dict(config), sort_keys=False)


# Keys that decide a job's selections. Not: where it runs (device, dtype: a resumed selector replays
# its journal), the starting adapter (pushes replace it), data.allow_pipe, or the service's plumbing.
JOB_KEYS = ("model.source", "model.num_layers", "model.lora_r", "model.lora_alpha", "model.lora_dropout",
            "model.lora_targets", "tokenize", "selector", "data", "service.world_size")
_NOT_JOB_KEYS = ("data.allow_pipe",)


def fingerprint(config: Config) -> str:
    """Short sha256 of the ``JOB_KEYS``: trainers and a restarted selector check they agree on it."""
    flat = {f"{s}.{k}": v for s, body in to_dict(config).items() for k, v in body.items()}
    job = {k: v for k, v in flat.items() if k not in _NOT_JOB_KEYS
           and any(k == p or k.startswith(p + ".") for p in JOB_KEYS)}
    if job["data.urls"] is not None:  # "s-{0..1}.tar" and ["s-0.tar", "s-1.tar"] are one job
        job["data.urls"] = expand_urls(job["data.urls"])
    blob = json.dumps(job, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_table() -> str:
    """The keys, defaults and help as the README's Markdown table."""
    rows = [f"| `{k}` | `{d}` | {h.replace('|', '/')} |" for k, d, h in config_fields()]
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows])


def config_help() -> str:
    """The keys, defaults and help, one per line, for ``--help``."""
    rows = config_fields()
    width = max(len(k) for k, _, _ in rows)
    lines = [f"  {k:<{width}}  {h} [default: {d}]" for k, d, h in rows]
    return "configuration keys (--set KEY=VALUE, or KEY under its section in --config):\n" + "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config``, repeated ``--set key=value`` and ``--print-config``; list the keys in the epilog."""
    parser.add_argument("--config", metavar="PATH", help=f"YAML file, a mapping per section {list(SECTIONS)}")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one key (repeatable); VALUE is YAML: 16, true, null, [q_proj, v_proj]")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit")
    parser.epilog = (parser.epilog + "\n\n" if parser.epilog else "") + config_help()
    if parser.formatter_class is argparse.HelpFormatter:  # keep the key table's lines
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Config:
    """The Config of parsed arguments; errors go to ``parser.error`` when given; ``--print-config`` exits."""
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        if parser is None:
            raise
        parser.error(str(e))
    if getattr(args, "print_config", False):
        sys.stdout.write(to_yaml(config))
        raise SystemExit(0)
    return config
