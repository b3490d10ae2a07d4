"""Spec dicts and YAML text, fuzzed, into the one loader every entry point uses (``load_spec``:
``orchestrator.deploy``, ``hms deploy FILE``, ``update_spec``): the result is a valid spec that
survives the trip to the workflow (the pydantic data converter), or a ``SpecError`` that names
the field (or, for a file, the file) — never any other exception."""

from __future__ import annotations

import math
import string
from pathlib import Path

import yaml
from fuzz_profiles import fuzz
from hypothesis import example, given
from hypothesis import strategies as st
from temporalio.contrib.pydantic import pydantic_data_converter

from hms_mgmt.errors import SpecError
from hms_mgmt.models import ServiceSpec
from hms_mgmt.orchestrator import load_spec

SEED = {"name": "hms-ach", "image": "registry.gov/hms-ach:1.4", "min_replicas": 2, "max_replicas": 10,
        "cpu_target": 60}
FIELDS = sorted(ServiceSpec.model_fields)
CONVERTER = pydantic_data_converter.payload_converter

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 2000), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**80),
    st.floats(), st.floats(-5, 100_000), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324, -0.0]),
    st.text(max_size=20), st.sampled_from([64, 256, 1025, 8193, 33_000]).map(lambda n: "a" * n),
    st.sampled_from(["", "25%", "100%", "101%", "-1%", "1.5%", "%", "1e3", "0x10", "/health", "/", "a:b",
                     "registry.gov/hms-ach:1.4", "HMS-ACH", "hms-ach-", "\x00", "\ud800", "NET_ADMIN", "chown"]),
    st.binary(max_size=20), st.datetimes(), st.dates(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.text(max_size=10), scalars),
                                                                         inner, max_size=5)),
    max_leaves=12,
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12), st.integers(), st.none(), st.booleans(),
                 st.sampled_from(["Name", "min-replicas", " name", "name ", "__class__", "model_config"]))


@st.composite
def spec_dicts(draw: st.DrawFn) -> tuple[dict[object, object], set[str]]:
    """The seed's dict with some fields changed, removed or added; also what was touched."""
    spec: dict[object, object] = dict(SEED)
    touched: set[str] = set()
    for key in draw(st.lists(keys, max_size=6)):
        if key in spec and draw(st.booleans()):
            del spec[key]
        else:
            spec[key] = draw(values)
        touched.add(str(key))
    return spec, touched


def check_valid(spec: ServiceSpec) -> None:
    """What deploy() does with a spec: the converter sends it to the workflow and back."""
    [payload] = CONVERTER.to_payloads([spec])
    [back] = CONVERTER.from_payloads([payload], [ServiceSpec])
    assert back == spec


@fuzz(400)
@given(spec_dicts())
@example(({**SEED, "env": {"A": "\ud800"}}, {"env"}))
@example(({**SEED, "name": "\ud800"}, {"name"}))
@example(({**SEED, "command": ["\udcff"]}, {"command"}))
@example(({**SEED, "node_selector": {"zone": "\ud800"}}, {"node_selector"}))
@example(({**SEED, "node_selector": {f"k{i}": "v" for i in range(10_000)}}, {"node_selector"}))
@example(({**SEED, "max_surge": 10**30}, {"max_surge"}))
@example(({**SEED, 7: 1}, {"7"}))
@example(({**SEED, "": 1}, {""}))
@example(({**SEED, None: 1}, {"None"}))
def test_spec_dicts_give_a_spec_or_an_error_naming_the_field(case: tuple[dict[object, object], set[str]]):
    spec, touched = case
    try:
        loaded = load_spec(spec)
    except SpecError as e:
        msg = str(e)
        assert msg.startswith("invalid service spec: "), msg
        named = {t for t in touched if (repr(t) if not t.isidentifier() else t) in msg or t in msg}
        assert named, f"error names none of the fields changed ({sorted(touched)}): {msg}"
        return
    check_valid(loaded)


@st.composite
def yaml_texts(draw: st.DrawFn) -> str | bytes:
    seed_text = yaml.safe_dump(SEED)
    kind = draw(st.sampled_from(["dumped", "mutated", "text", "bytes", "lines"]))
    if kind == "dumped":
        spec, _ = draw(spec_dicts())
        try:
            return yaml.safe_dump(spec, allow_unicode=draw(st.booleans()))
        except yaml.YAMLError:
            return yaml.dump(spec)  # python/object tags: the safe loader refuses them
    if kind == "mutated":
        text = seed_text
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(text)))
            cut = draw(st.integers(0, 4))
            text = text[:at] + draw(st.text(alphabet=string.printable + "&*!|>%@`\t\x00\u00e9", max_size=6)) + text[at + cut:]
        return text
    if kind == "lines":
        return "\n".join(draw(st.lists(st.sampled_from(
            ["name: hms-ach", "image: registry.gov/hms-ach:1.4", "min_replicas: 2", "max_replicas: 10",
             "cpu_target: 60", "a: &a [x, x, x, x]", "b: &b [*a, *a, *a, *a]", "command: *b", "env: {A: *a}",
             "- 1", "---", "...", "!!python/object:os.system {}", "port: 0x50", "port: 1_000", "port: .inf",
             "health_path: !!binary aGVsbG8=", "name: !!int 3", "? [a, b]\n: c", "env: {A: 1, B: null}",
             "max_surge: 25%", "max_surge: 1e400", "cap_add: [net_admin]", "cap_add: [chown, CAP_KILL]",
             "node_selector: {zone: [a]}", "min_replicas: 2017-01-01", "name: \"\\ud800\""]),
            max_size=12)))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return draw(st.text(max_size=300))


@fuzz(300)
@given(yaml_texts())
@example(b"name: hms-ach\n\xff\xfe")  # not UTF-8
@example("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
         "name: hms-ach\nimage: registry.gov/hms-ach:1.4\nmin_replicas: 2\nmax_replicas: 10\ncpu_target: 60\n"
         "command: *d\n")  # an alias bomb: refused at once, not expanded
@example("name: \"\\ud800\"\nimage: registry.gov/hms-ach:1.4\nmin_replicas: 2\nmax_replicas: 10\ncpu_target: 60\n")
def test_yaml_files_give_a_spec_or_an_error_naming_the_file(tmp_path: Path, text: str | bytes):
    path = tmp_path / "spec.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, errors="surrogatepass")
    try:
        loaded = load_spec(path)
    except SpecError as e:
        assert str(path) in str(e), str(e)
        return
    check_valid(loaded)


def test_paths_that_are_not_spec_files_are_spec_errors(tmp_path: Path):
    for path, why in [(tmp_path, "is a directory"), (tmp_path / "missing.yaml", "does not exist"),
                      (Path("/dev/null"), "expected a mapping"), (Path("/dev/zero"), "larger than 1024 KiB"),
                      (Path("/dev/urandom"), "larger than 1024 KiB"), (tmp_path / ("x" * 300), "File name too long")]:
        try:
            load_spec(path)
        except SpecError as e:
            assert str(path) in str(e) and why in str(e), str(e)
        else:
            raise AssertionError(f"{path} loaded as a spec")
