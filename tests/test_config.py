"""The selector's configuration: YAML + overrides, refusals that name the key, fingerprint, CLI."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from colm_server.config import (
    SECTIONS,
    Config,
    ServiceConfig,
    add_cli_arguments,
    config_fields,
    config_from_args,
    fingerprint,
    from_dict,
    load_config,
    to_dict,
)

URLS = "/x/shard-{000..009}.tar"


def write(tmp_path, doc) -> str:
    path = tmp_path / "colm.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def test_defaults_load_but_serving_needs_urls():
    config = load_config(None)
    assert config == Config()
    assert config.selector.batch_size == 32 and config.service.port == 50051
    assert config.model.resolve(cuda_available=True) == ("cuda", "bfloat16")
    assert config.model.resolve(cuda_available=False) == ("cpu", "float32")
    assert config.data.urls is None
    with pytest.raises(ValueError, match=r"^data\.urls: required"):
        config.validate_for_serving()
    load_config(None, [f"data.urls={URLS}"]).validate_for_serving()


def test_yaml_file_plus_overrides(tmp_path):
    path = write(tmp_path, """
model: {source: "tiny:qwen2", num_layers: 2, lora_alpha: 32}
data:
  urls: /data/a-{0..3}.tar
  seed: 7
selector: {batch_size: 8, large_batch_size: 32, keep_sources: [gsm8k]}
service: {port: 0, world_size: 2}
""")
    config = load_config(path, [
        "selector.batch_size=16", f"data.urls={URLS}", "model.lora_targets=[q_proj,v_proj]",
        "service.job_id=007", "service.host=12345", "model.adapter=null", "data.urls={a,b}.tar",
    ])
    assert config.model.source == "tiny:qwen2" and config.model.num_layers == 2
    assert config.model.lora_alpha == 32.0 and isinstance(config.model.lora_alpha, float)
    assert config.model.lora_targets == ["q_proj", "v_proj"]
    assert config.selector.batch_size == 16 and config.selector.large_batch_size == 32
    assert config.selector.keep_sources == ("gsm8k",)  # list -> the field's tuple
    assert config.data.urls == "{a,b}.tar" and config.data.seed == 7  # the last override wins
    assert config.service.job_id == "007" and config.service.host == "12345"  # strings stay text
    assert config.service.world_size == 2 and config.model.adapter is None


@pytest.mark.parametrize("doc, override, key", [
    ({"modle": {}}, None, "'modle': unknown section"),
    ({"selector": {"batchsize": 4}}, None, "selector.batchsize: unknown key"),
    (None, "servce.port=1", "'servce': unknown section"),
    (None, "service.prot=1", "service.prot: unknown key"),
])
def test_unknown_section_or_key_refused(tmp_path, doc, override, key):
    path = write(tmp_path, doc) if doc else None
    with pytest.raises(ValueError) as info:
        load_config(path, [override] if override else [])
    assert key in str(info.value)
    assert "valid" in str(info.value)
    if "key" in key:  # the valid keys of that section are listed
        section = key.split(".")[0]
        assert all(f.name in str(info.value) for f in fields(SECTIONS[section]))


@pytest.mark.parametrize("override, key", [
    ("selector.batch_size=sixteen", "selector.batch_size: expected int"),
    ("selector.batch_size=1.5", "selector.batch_size: expected int"),
    ("selector.normalize=1", "selector.normalize: expected bool"),
    ("tokenize.max_length=true", "tokenize.max_length: expected int"),
    ("model.lora_targets=q_proj", "model.lora_targets: expected list[str] | None"),
    ("model.lora_targets=[1, 2]", "model.lora_targets: expected list[str] | None"),
    ("selector.zo_eps=.nan", "selector.zo_eps: must be a finite number"),
    ("data.seed=[1]", "data.seed: expected int"),
])
def test_wrong_types_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=r"^" + key.replace("[", r"\[").replace("|", r"\|")):
        load_config(None, [override])


def test_wrong_types_in_yaml_and_in_code_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^service\.job_id: expected str, got 123"):
        load_config(write(tmp_path, {"service": {"job_id": 123}}))
    with pytest.raises(ValueError, match=r"^selector: expected a mapping"):
        load_config(write(tmp_path, {"selector": [1, 2]}))
    with pytest.raises(ValueError, match=r"expected a mapping of sections"):
        load_config(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(ValueError, match=r"^service\.port: expected int"):
        ServiceConfig(port="50051")


@pytest.mark.parametrize("override, message", [
    ("selector.batch_size=100", r"^selector\.batch_size .*large_batch_size"),
    ("service.port=70000", r"^service\.port: must be in \[0, 65535\], got 70000"),
    ("service.max_inflight=0", r"^service\.max_inflight: must be >= 1"),
    ("service.prefetch=0", r"^service\.prefetch: must be >= 1"),
    ("selector.strategy=best", r"^selector\.strategy must be one of"),
    ("selector.zo_probes=0", r"^selector\.zo_probes must be >= 1"),
    ("model.device=tpu", r"^model\.device: must be"),
    ("model.dtype=int8", r"^model\.dtype: must be one of"),
    ("tokenize.min_prompt_fraction=2", r"^tokenize\.min_prompt_fraction: must be in \[0, 1\]"),
    ("data.urls=pipe:cat x.tar", r"^data\.urls: .*allow_pipe"),
    ("data.buffer=-1", r"^data\.buffer: must be"),
])
def test_impossible_values_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_cross_section_checks():
    with pytest.raises(ValueError, match=r"^selector\.sketch_layers: must not exceed model\.num_layers"):
        load_config(None, ["model.num_layers=1", "selector.sketch_layers=2"])
    with pytest.raises(ValueError, match=r"^service\.journal_retention: must be >= prefetch"):
        load_config(None, ["service.prefetch=8", "service.journal_retention=10"])


def test_a_step_takes_a_large_batch_for_every_rank():
    config = load_config(None, ["service.world_size=3", "selector.batch_size=4",
                                "selector.large_batch_size=16"])
    assert config.records_per_step == 3 * 16
    step = config.step_selector()
    assert (step.batch_size, step.large_batch_size) == (3 * 4, 3 * 16)
    assert (config.selector.batch_size, config.selector.large_batch_size) == (4, 16)  # per rank, unchanged


def test_fingerprint_follows_the_job_not_the_plumbing():
    base = load_config(None, [f"data.urls={URLS}"])
    moved = load_config(None, [f"data.urls={URLS}", "service.host=0.0.0.0", "service.port=0",
                               "service.work_dir=/elsewhere",
                               "model.device=cpu", "data.allow_pipe=true"])
    assert fingerprint(base) == fingerprint(moved)
    listed = [f"/x/shard-{i:03d}.tar" for i in range(10)]
    assert fingerprint(base) == fingerprint(load_config(None, [f"data.urls={listed}"]))
    for change in ("selector.batch_size=16", "data.seed=1", "service.world_size=2", "model.lora_r=4",
                   "tokenize.max_length=256", "model.source=smollm2"):
        assert fingerprint(load_config(None, [f"data.urls={URLS}", change])) != fingerprint(base), change
    assert len(fingerprint(base)) == 16 and int(fingerprint(base), 16) >= 0


@pytest.mark.parametrize("overrides", [
    [], [f"data.urls={URLS}", "selector.keep_sources=[a, b]", "model.lora_targets=[q_proj]",
         "service.job_id=t", "model.num_layers=3", "data.urls=[/a.tar, /b.tar]"],
])
def test_to_dict_yaml_load_round_trips(tmp_path, overrides):
    config = load_config(None, overrides)
    path = write(tmp_path, yaml.safe_dump(to_dict(config)))
    assert load_config(path) == config
    assert from_dict(to_dict(config)) == config
    assert fingerprint(load_config(path)) == fingerprint(config)


def test_config_fields_cover_every_field_in_order():
    rows = config_fields()
    expected = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]
    assert [key for key, _, _ in rows] == expected
    assert all(help_text for _, _, help_text in rows), "every field has help text"
    table = {key: default for key, default, _ in rows}
    assert table["selector.batch_size"] == "32" and table["model.num_layers"] == "null"
    assert table["tokenize.chat_template"] == "true" and table["data.urls"] == "(required)"
    assert table["selector.keep_sources"] == "[]"


def test_cli_arguments(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="colm-stream serve")
    add_cli_arguments(parser)
    assert "selector.batch_size" in parser.format_help()
    path = write(tmp_path, {"selector": {"batch_size": 8}})
    args = parser.parse_args(["--config", path, "--set", "selector.large_batch_size=16",
                              "--set", f"data.urls={URLS}"])
    config = config_from_args(args)
    assert (config.selector.batch_size, config.selector.large_batch_size) == (8, 16)
    with pytest.raises(SystemExit):
        config_from_args(parser.parse_args(["--set", "selector.batch_size=100"]), parser)
    assert "selector.batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        config_from_args(parser.parse_args(["--set", "service.port=0", "--print-config"]))
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# fingerprint: ")
    assert load_config(write(tmp_path, printed)).service.port == 0


KEYS = [key for key, _, _ in config_fields()]


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=30)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS),
              st.sampled_from(["[", "]", "{", "}", ":", "- a", "!!binary x", "&a *a", "1e999", "-1",
                               "0", "null", "~", "[[]]", "{a: 1}", ".inf", "2024-01-01", "'x"])),
))
def test_garbage_overrides_give_value_errors(item):
    try:
        load_config(None, [item])
    except ValueError:
        pass


def test_selector_mixture_from_yaml_and_from_set(tmp_path):
    assert load_config(write(tmp_path, "selector: {mixture: balanced}\n")).selector.mixture == "balanced"
    explicit = load_config(write(tmp_path, "selector:\n  mixture: {gsm8k: 0.5, code: 0.5}\n"))
    assert explicit.selector.mixture == {"gsm8k": 0.5, "code": 0.5}
    tempered = load_config(None, ["selector.mixture=temperature", "selector.mixture_temperature=3"])
    assert tempered.selector.mixture == "temperature" and tempered.selector.mixture_temperature == 3.0
    flow = load_config(None, ["selector.mixture={a: 1, b: 2}"])  # --set values are YAML
    assert flow.selector.mixture == {"a": 1.0, "b": 2.0}
    assert load_config(None).selector.mixture == "stream"  # the default: weights as before


@pytest.mark.parametrize("override, message", [
    ("selector.mixture=balance", r"^selector\.mixture must be one of"),
    ("selector.mixture={a: -1}", r"^selector\.mixture: the share of 'a' must be"),
    ("selector.mixture={a: lots}", r"^selector\.mixture\.a: expected float"),
    ("selector.mixture={no: 1}", r"^selector\.mixture: keys must be text, got False"),  # YAML's "no"
    ("selector.mixture={a: 1", r"^selector\.mixture: cannot parse"),
    ("selector.mixture=[a, b]", r"^selector\.mixture: expected str \| dict"),
    ("selector.mixture_temperature=0", r"^selector\.mixture_temperature must be a finite number > 0"),
])
def test_bad_mixtures_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_colm_paper_with_another_mixture_is_refused_naming_both_keys(tmp_path):
    with pytest.raises(ValueError, match=r"^selector\.mixture 'balanced' .*strategy 'colm-paper'"):
        load_config(write(tmp_path, "selector: {strategy: colm-paper, mixture: balanced}\n"))


def test_an_explicit_mixture_round_trips_and_is_fingerprinted_whatever_its_order(tmp_path):
    config = load_config(None, [f"data.urls={URLS}", "selector.mixture={b: 2, a: 1}"])
    assert load_config(write(tmp_path, yaml.safe_dump(to_dict(config)))) == config
    assert from_dict(to_dict(config)) == config
    reordered = load_config(None, [f"data.urls={URLS}", "selector.mixture={a: 1, b: 2}"])
    assert fingerprint(reordered) == fingerprint(config)
    for other in ("selector.mixture=balanced", "selector.mixture={a: 1, b: 3}", "selector.mixture=stream"):
        assert fingerprint(load_config(None, [f"data.urls={URLS}", other])) != fingerprint(config), other
