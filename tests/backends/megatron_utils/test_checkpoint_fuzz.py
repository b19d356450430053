"""Fuzzing the checkpoint files a user can hand-edit or damage, without a model: any bytes in
``latest_checkpointed_iteration.txt``, ``checkpoint.json`` or any JSON file read through
``read_json_file`` give a value or one one-line UserError, never another exception or a hang;
a manifest that reads is either accepted by ``_check_compatible`` or refused with one.

Property-based (hypothesis, bounded examples, no example database written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    LATEST_FILE,
    META_FILE,
    _check_compatible,
    _lora_flags,
    _read_json,
    read_latest_iteration,
)
from slime.utils.errors import UserError, read_json_file
from slime.utils.lora_config import LoraConfig

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ARCH = ModelArch(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, head_dim=16, vocab_size=256, max_position_embeddings=128, rope_theta=10000.0,
                 norm_eps=1e-5, qk_layernorm=False, add_qkv_bias=False, tie_word_embeddings=True)
LORA = LoraConfig(r=4, alpha=8.0, target_modules=("linear_qkv",))
ARGS = argparse.Namespace(lora=LORA, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                          expert_model_parallel_size=1)
VALID_META = {
    "format": FORMAT, "version": FORMAT_VERSION, "iteration": 3, "weights": "adapter",
    "model": dataclasses.asdict(ARCH), "lora": _lora_flags(LORA),
    "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "world_size": 1},
    "files": {"adapter/adapter_model.safetensors": {"bytes": 10, "sha256": "0" * 64},
              "trainer_state/rank_00000.json": {"bytes": 3, "sha256": "1" * 64}},
}


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as path:
        yield Path(path)


def _one_line_or_value(call: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, call())``, or ``(False, message)`` for a UserError, which must be one line."""
    try:
        return True, call()
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"
        return False, message


def test_the_valid_manifest_is_accepted(workdir: Path) -> None:
    (workdir / META_FILE).write_text(json.dumps(VALID_META))
    _check_compatible(_read_json(workdir / META_FILE), ARCH, ARGS, workdir / META_FILE)


# ------------------------------------------------------------------ latest_checkpointed_iteration.txt

@FUZZ
@given(data=st.binary(max_size=64) | st.text(max_size=24).map(str.encode))
@example(data=b"12\n")
@example(data="²".encode())  # found: isdigit() but int() refuses it (ValueError)
@example(data="١٢".encode())  # Arabic-Indic digits: not what the trainer writes
@example(data=b"\xff\xfe1")  # found: not UTF-8 (UnicodeDecodeError)
@example(data=b"9" * 5000)  # found: over int()'s 4300 digits (ValueError)
@example(data=b"")
def test_latest_file(workdir: Path, data: bytes) -> None:
    (workdir / LATEST_FILE).write_bytes(data)
    ok, value = _one_line_or_value(lambda: read_latest_iteration(workdir))
    if ok:
        assert type(value) is int and value == int(data.decode().strip(), 10) >= 0


# ------------------------------------------------------------------ read_json_file, checkpoint.json

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(data=st.binary(max_size=512) | _json.map(lambda v: json.dumps(v).encode()))
@example(data=b"[" * 100_000)  # found: RecursionError
@example(data=b"9" * 5000)  # found: ValueError (int over 4300 digits)
@example(data=b'{"a": "\xff"}')
@example(data=b'"\\ud800"')  # a lone surrogate is valid JSON
@example(data=b"\xef\xbb\xbf{}")  # a BOM
def test_read_json_file(workdir: Path, data: bytes) -> None:
    path = workdir / "any.json"
    path.write_bytes(data)
    ok, value = _one_line_or_value(lambda: read_json_file(path, missing="unused", corrupt_fix="; write it again"))
    if not ok:
        assert value.startswith(f"{path}: ") and value.endswith("; write it again")


def _check_manifest(workdir: Path, data: bytes) -> None:
    path = workdir / META_FILE
    path.write_bytes(data)
    ok, meta = _one_line_or_value(lambda: _read_json(path))
    if ok:
        _one_line_or_value(lambda: _check_compatible(meta, ARCH, ARGS, path))


@FUZZ
@given(data=st.binary(max_size=512) | _json.map(lambda v: json.dumps(v).encode()))
@example(data=b"[]")  # found: AttributeError ('list' object has no attribute 'get')
def test_any_manifest_bytes(workdir: Path, data: bytes) -> None:
    _check_manifest(workdir, data)


_PATHS = [("model",), ("lora",), ("parallel",), ("files",), ("model", "hidden_size"), ("lora", "lora_r"),
          ("parallel", "world_size"), ("parallel", "tensor_model_parallel_size"),
          ("files", "adapter/adapter_model.safetensors"), ("files", "adapter/adapter_model.safetensors", "bytes")]


def _edit(meta: dict, path: tuple[str, ...], value: Any, delete: bool) -> dict:
    """A deep copy of ``meta`` with the entry at ``path`` replaced by ``value`` (or deleted)."""
    meta = json.loads(json.dumps(meta))
    node = meta
    for key in path[:-1]:
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return meta


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(_PATHS), _json, st.booleans()), min_size=1, max_size=3))
@example(edits=[(("lora",), {}, False)])  # found: KeyError on a LoRA flag
@example(edits=[(("lora",), None, True)])  # found: KeyError 'lora'
@example(edits=[(("parallel",), {}, False)])  # found: KeyError 'tensor_model_parallel_size'
@example(edits=[(("files", "adapter/adapter_model.safetensors"), [], False)])
@example(edits=[(("model", "family"), "a\nb", False)])  # a value with a newline, in the message
def test_edited_manifests(workdir: Path, edits) -> None:
    meta = VALID_META
    for path, value, delete in edits:
        try:
            meta = _edit(meta, path, value, delete)
        except (KeyError, TypeError, AttributeError):  # an earlier edit removed the parent
            pass
    _check_manifest(workdir, json.dumps(meta).encode())
