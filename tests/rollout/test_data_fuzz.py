"""Fuzzing the prompt reader: any bytes as a ``--prompt-data`` jsonl file give a dataset or one
one-line UserError, never another exception or a hang.

Property-based (hypothesis, bounded examples, no example database written); the tokenizer is the
real SmolLM2 one, as in tests/rollout/test_data.py, so what reaches it is what a run feeds it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from slime.rollout.data import PromptDataset
from slime.utils.errors import UserError

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEYS = ("prompt", "label", "metadata", "role", "content", "question")


@pytest.fixture(scope="module")
def tokenizer(smollm2_checkpoint: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_checkpoint)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as path:
        yield Path(path)


def _load(workdir: Path, tokenizer: Any, data: bytes, *, chat: bool = False, input_key: str = "prompt",
          strict: bool = False) -> None:
    """Load ``data`` as a prompt file through ``from_args``; the dataset must be usable, or the
    failure one UserError of one line."""
    path = workdir / "prompts.jsonl"
    path.write_bytes(data)
    args = argparse.Namespace(prompt_data=str(path), input_key=input_key, label_key="label",
                              metadata_key="metadata", apply_chat_template=chat, seed=0)
    try:
        dataset = PromptDataset.from_args(args, tokenizer)
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"
        if strict:
            raise
        return
    assert len(dataset) >= 1
    for sample in dataset.next_batch(len(dataset)):
        assert isinstance(sample.prompt, str) and all(isinstance(i, int) for i in sample.prompt_token_ids)


@FUZZ
@given(data=st.binary(max_size=2048))
@example(data=b"")
@example(data=b"\n\n \r\n")
@example(data=b'{"prompt": "caf\xe9"}\n')  # not UTF-8
@example(data=b'\xef\xbb\xbf{"prompt": "x"}\n')  # a BOM
@example(data=b'{"prompt": "a\rb"}\n')  # a bare CR inside a string
@example(data=b'{"prompt": "x"}\x00\n')
def test_any_bytes_give_a_dataset_or_a_user_error(tokenizer: Any, workdir: Path, data: bytes) -> None:
    _load(workdir, tokenizer, data)


_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
_roles = st.sampled_from(["user", "system", "assistant"]) | st.text(max_size=8)
_messages = st.lists(st.fixed_dictionaries({"role": _roles, "content": st.text(max_size=60)}), min_size=1, max_size=3)
_rows = st.fixed_dictionaries(
    {"prompt": st.text(max_size=200) | _messages | _json_values},
    optional={"label": _json_values, "metadata": _json_values | st.dictionaries(st.text(max_size=8), _scalars)},
) | _json_values
_line = (st.builds(lambda row, ascii_only: json.dumps(row, ensure_ascii=ascii_only), _rows, st.booleans())
         | st.text(max_size=80))


@FUZZ
@given(lines=st.lists(_line, max_size=6), newline=st.sampled_from(["\n", "\r\n"]), chat=st.booleans(),
       input_key=st.sampled_from(["prompt", "content"]))
@example(lines=['{"prompt": "x", "metadata": null}'], newline="\n", chat=False, input_key="prompt")
@example(lines=['{"prompt": [{"role": "tool", "content": "x"}]}'], newline="\n", chat=True, input_key="prompt")
@example(lines=['{"prompt": NaN, "label": Infinity}'], newline="\n", chat=False, input_key="prompt")
def test_jsonl_shaped_rows_give_a_dataset_or_a_user_error(tokenizer: Any, workdir: Path, lines: list[str],
                                                          newline: str, chat: bool, input_key: str) -> None:
    _load(workdir, tokenizer, newline.join(lines).encode("utf-8"), chat=chat, input_key=input_key)


# Crashes fuzzing found in the reader: valid UTF-8 files whose reading raised something other
# than a UserError (a lone surrogate reached the tokenizer; RecursionError; int-digits ValueError).
KNOWN_CRASHES = [
    pytest.param(b'{"prompt": "\\ud800"}\n', False, id="lone-surrogate-escape-reaches-the-tokenizer"),
    pytest.param(b'{"prompt": [{"role": "user", "content": "\\udfff"}]}\n', True, id="lone-surrogate-in-a-message"),
    pytest.param(b'{"prompt": "x", "label": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", False,
                 id="deep-nesting-recursion-error"),
    pytest.param(b'{"prompt": "x", "label": ' + b"9" * 5000 + b"}\n", False, id="int-over-4300-digits"),
]


@pytest.mark.parametrize(("data", "chat"), KNOWN_CRASHES)
def test_crashes_fuzzing_found_are_user_errors(tokenizer: Any, workdir: Path, data: bytes, chat: bool) -> None:
    with pytest.raises(UserError, match=r"prompts\.jsonl:1: "):
        _load(workdir, tokenizer, data, chat=chat, strict=True)
