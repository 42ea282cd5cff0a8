"""Fuzzed configuration: ``load_config`` returns a Config or raises ValueError, never anything else.

Documents are random YAML: sections and keys real or made up, values of every YAML type (nested,
huge, negative, non-finite, unicode, null), plus raw text that may not be YAML at all; ``--set``
overrides are random too. A refusal must say where the fault is: the key or section at fault, the
override, or the file. A Config that loads must load again, unchanged, from the YAML it prints.
"""

from __future__ import annotations

import copy
import re
import tracemalloc
from dataclasses import fields

import pytest
import yaml
from hypothesis import event, example, given
from hypothesis import strategies as st

from colm_server.config import SECTIONS, Config, load_config, to_dict, to_yaml

from .conftest import fuzz

KEYS = {section: [f.name for f in fields(cls)] for section, cls in SECTIONS.items()}
ALL_KEYS = sorted({k for keys in KEYS.values() for k in keys})
NAMED = re.compile(rf"^({'|'.join(SECTIONS)})\b")  # a message that starts with a section or key

huge = st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400, -(10**400)])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), huge, st.floats(), st.text(max_size=12),
    st.sampled_from(["", " ", "null", "~", "yes", "0x10", "1e3", "007", ".inf", "{0..3}", "a{", "pipe:ls",
                     "x/manifest.json", "tiny:llama", "cuda:0", "colm", "l1", "\u202e", "\x00", "\ud7ff"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
# Plausible values as well, so that many documents get past the first key and deeper checks run.
plausible = st.one_of(st.integers(0, 128), st.floats(0, 1), st.sampled_from(
    ["tiny:llama", "auto", "cpu", "float32", "colm", "random", "exact", "zo", "adapter", "v_proj", "l1",
     "cluster", "default", "127.0.0.1", "/tmp/work", "s-{0..3}.tar", ["q_proj", "v_proj"], [], None]))


@st.composite
def sections(draw) -> dict:
    """A section body: known keys of this or another section, or made-up ones, with any values."""
    section = draw(st.sampled_from(sorted(SECTIONS)))
    keys = st.one_of(st.sampled_from(KEYS[section]), st.sampled_from(ALL_KEYS), st.text(max_size=8))
    body = draw(st.dictionaries(keys, plausible | values, max_size=5))
    return {section: body}


DEFAULTS = to_dict(load_config(None, ["data.urls=s-{0..3}.tar"]))


@st.composite
def perturbed(draw) -> str:
    """A complete, valid document with up to three values replaced, some under made-up keys."""
    doc = copy.deepcopy(DEFAULTS)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):  # a third of them left valid
        section = draw(st.sampled_from(sorted(doc)))
        doc[section][draw(st.sampled_from(KEYS[section]) | st.text(max_size=8))] = draw(plausible | values)
    return yaml.safe_dump(doc, allow_unicode=True)


documents = st.one_of(
    st.lists(sections(), max_size=4).map(lambda parts: {k: v for p in parts for k, v in p.items()}).map(
        lambda doc: yaml.safe_dump(doc, allow_unicode=True)),
    st.dictionaries(st.text(max_size=8) | st.sampled_from(sorted(SECTIONS)),
                    values, max_size=3).map(yaml.safe_dump),  # sections of any shape
    values.map(yaml.safe_dump),  # not a mapping at all
    st.text(max_size=200),  # raw text: YAML or not
)
overrides = st.one_of(
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(sorted(SECTIONS)) | st.text(max_size=6),
              st.sampled_from(ALL_KEYS) | st.text(max_size=6),
              st.one_of(plausible, values).map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
              | st.text(max_size=20)),
    st.text(max_size=30),  # anything at all
)
# Overrides of known keys with plausible values: most of them apply.
known_overrides = st.sampled_from(sorted(SECTIONS)).flatmap(lambda s: st.builds(
    lambda k, v: f"{s}.{k}={v}", st.sampled_from(KEYS[s]),
    plausible.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())))


def deep(n: int) -> str:
    return "model:\n  lora_targets: " + "[" * n + "]" * n + "\n"


def alias_bomb(levels: int) -> str:
    """A value of 9**levels strings from a few lines of anchors and aliases."""
    keys = KEYS["selector"]
    lines = ["selector:", f"  {keys[0]}: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  {keys[i]}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join([*lines, f"model:\n  source: *a{levels - 1}", ""])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-config")


def load(folder, text: str, items: list[str]) -> Config | ValueError:
    """``load_config`` of ``text`` written to a file; a ValueError is returned, anything else raised."""
    path = folder / "job.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        return load_config(path, items)
    except ValueError as err:
        message = str(err)
        named = NAMED.match(message) or message.startswith((str(path), "override ")) \
            or "unknown section" in message
        assert named, f"the refusal names no key, override or file: {message!r}"
        return err


@fuzz(150)
@given(text=documents, items=st.just([]) | st.lists(overrides, min_size=1, max_size=3))
@example(text="model:\n  lora_alpha: 1" + "0" * 400 + "\n", items=[])  # an int beyond float range
@example(text="", items=["model.lora_alpha=1" + "0" * 400])
@example(text=deep(5000), items=[])  # nested deeper than the YAML parser recurses
@example(text="", items=["model.lora_targets=" + "[" * 5000 + "]" * 5000])
@example(text="model:\n  lora_r: " + "9" * 5000 + "\n", items=[])  # beyond Python's int parsing limit
@example(text="data:\n  urls: 's-{0..3.tar'\n", items=[])  # unbalanced braces
@example(text="", items=["data.urls=s-{0..3}}.tar"])
@example(text="data:\n  urls: /nowhere/manifest.json\n", items=[])
@example(text="\udcff: 1\n", items=[])  # not UTF-8 on disk
def test_load_config_returns_a_config_or_raises_value_error(folder, text, items):
    config = load(folder, text, items)
    event("loaded" if isinstance(config, Config) else "refused")
    if isinstance(config, Config):
        assert_reloads(folder, config)


@fuzz(100)
@given(text=perturbed(), items=st.lists(known_overrides, max_size=2))
def test_a_valid_document_with_a_few_wild_values_loads_or_names_the_key_at_fault(folder, text, items):
    config = load(folder, text, items)
    event("loaded" if isinstance(config, Config) else "refused")
    if isinstance(config, Config):
        assert_reloads(folder, config)


def assert_reloads(folder, config: Config) -> None:
    """The YAML a Config prints (--print-config) loads back as the same Config."""
    again = load(folder, to_yaml(config), [])
    assert isinstance(again, Config) and to_dict(again) == to_dict(config)


def test_an_alias_bomb_is_refused_without_expanding_it(folder):
    """Eight lines of YAML aliases stand for 9**7 strings; refusing them must not spell them out."""
    tracemalloc.start()
    try:
        err = load(folder, alias_bomb(7), [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(err, ValueError) and str(err).startswith("model.source: expected str")
    assert peak < 8 << 20, f"{peak >> 20} MiB to refuse a few lines of YAML"  # the expansion takes 34
