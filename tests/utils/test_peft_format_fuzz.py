"""Fuzzing ``read_peft_adapter``: whatever bytes ``adapter_config.json`` and
``adapter_model.safetensors`` hold, reading gives a validated adapter or one one-line UserError,
never another exception or a hang.

Property-based (hypothesis, bounded examples, no example database written): random bytes and
random JSON, safetensors files with a generated header, and truncations and byte flips of a real
small adapter written with ``write_peft_dir``.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slime.utils.errors import UserError
from slime.utils.peft_format import CONFIG_NAME, WEIGHTS_NAME, PeftAdapter, peft_key, read_peft_adapter, write_peft_dir

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Q = "model.layers.0.self_attn.q_proj"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none", "target_modules": ["q_proj"],
          "rank_pattern": {}, "alpha_pattern": {}}


@pytest.fixture(scope="module")
def valid() -> tuple[bytes, bytes]:
    """(config bytes, safetensors bytes) of a real small adapter."""
    with tempfile.TemporaryDirectory() as tmp:
        gen = torch.Generator().manual_seed(0)
        tensors = {peft_key(Q, "A"): torch.randn(2, 8, generator=gen),
                   peft_key(Q, "B"): torch.randn(8, 2, generator=gen)}
        out = write_peft_dir(Path(tmp) / "adapter", tensors, CONFIG)
        return (out / CONFIG_NAME).read_bytes(), (out / WEIGHTS_NAME).read_bytes()


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as path:
        yield Path(path)


def _read(workdir: Path, config: bytes, weights: bytes) -> PeftAdapter | None:
    """Read an adapter directory holding these bytes; a UserError must be one line."""
    (workdir / CONFIG_NAME).write_bytes(config)
    (workdir / WEIGHTS_NAME).write_bytes(weights)
    try:
        adapter = read_peft_adapter(workdir)
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"
        return None
    for module, (a, b) in adapter.modules.items():
        assert a.dim() == b.dim() == 2 and a.shape[0] == b.shape[1], module
        adapter.scaling(module)
    return adapter


def test_the_valid_adapter_reads(workdir: Path, valid: tuple[bytes, bytes]) -> None:
    assert _read(workdir, *valid) is not None


def _mutate(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    """``data`` cut to ``cut`` bytes, then byte ``i`` xor ``x`` for each flip (positions wrap)."""
    out = bytearray(data[:cut])
    for position, xor in flips:
        if out:
            out[position % len(out)] ^= xor
    return bytes(out)


_flips = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), max_size=4)


@FUZZ
@given(cut=st.integers(0, 1 << 12), flips=_flips)
@example(cut=0, flips=[])
@example(cut=7, flips=[])  # shorter than the 8-byte header length
@example(cut=1 << 12, flips=[(0, 0xFF), (7, 0x7F)])  # an absurd header length
def test_mutated_weights_file(workdir: Path, valid: tuple[bytes, bytes], cut: int, flips) -> None:
    config, weights = valid
    _read(workdir, config, _mutate(weights, cut, flips))


@FUZZ
@given(cut=st.integers(0, 1 << 9), flips=_flips)
def test_mutated_config_file(workdir: Path, valid: tuple[bytes, bytes], cut: int, flips) -> None:
    config, weights = valid
    _read(workdir, _mutate(config, cut, flips), weights)


@FUZZ
@given(config=st.binary(max_size=512), weights=st.binary(max_size=512))
def test_random_bytes(workdir: Path, valid: tuple[bytes, bytes], config: bytes, weights: bytes) -> None:
    _read(workdir, config, valid[1])
    _read(workdir, valid[0], weights)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
_config_values = {
    "peft_type": st.sampled_from(["LORA", "IA3"]) | _json,
    "r": st.integers(-2, 8) | _json,
    "lora_alpha": st.integers(-2, 16) | st.floats() | _json,
    "bias": st.just("none") | _json,
    "use_rslora": _json,
    "use_dora": st.booleans(),
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", Q, "(", r"\2", "x)|(q"]) | st.text(max_size=6),
                                    st.integers(-1, 4) | _json, max_size=3) | _json,
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "["]) | st.text(max_size=6), _json, max_size=3) | _json,
}


@FUZZ
@given(config=st.fixed_dictionaries({}, optional=_config_values) | _json)
@example(config={"r": 2, "lora_alpha": 4, "rank_pattern": {"(": 2}})  # found: re.error
@example(config={"r": 2, "lora_alpha": 4, "rank_pattern": [2]})  # found: AttributeError
@example(config={"r": 2, "lora_alpha": 4, "alpha_pattern": {r"\2": 1}})  # a group that is open when used
@example(config={"r": 2, "lora_alpha": 10**400})  # found: accepted, then an OverflowError in scaling
@example(config={"r": 2, "lora_alpha": float("nan")})  # found: accepted, a NaN scaling
def test_json_configs(workdir: Path, valid: tuple[bytes, bytes], config) -> None:
    _read(workdir, json.dumps(config).encode(), valid[1])


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3",
           "F8_E5M2", "F8_E8M0", "F4", "C64", "X99"]
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2}


@st.composite
def _safetensors(draw) -> bytes:
    """A safetensors file with a generated header: PEFT-like or odd keys, any dtype, shapes whose
    offsets fit the data (or, sometimes, do not)."""
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4) | _json, max_size=2))
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from([peft_key(Q, "A"), peft_key(Q, "B"), peft_key("m", "A"), "other"])
                   | st.text(max_size=10))
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = _ITEMSIZE.get(dtype, 1)
        for dim in shape:
            size *= dim
        size = draw(st.sampled_from([size, size, size + 1, max(size - 1, 0)]))
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + draw(st.binary(min_size=offset, max_size=offset + 8))


@FUZZ
@given(weights=_safetensors())
def test_generated_safetensors_headers(workdir: Path, valid: tuple[bytes, bytes], weights: bytes) -> None:
    _read(workdir, valid[0], weights)
