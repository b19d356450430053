"""PromptDataset on the real SmolLM2 tokenizer: parsing, errors, sampling, resume."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from slime.rollout.data import PromptDataset, PromptLimit, Sample
from slime.utils.errors import UserError

QUESTION = "What is 2 + 3? Answer with just the number."


@pytest.fixture(scope="module")
def tokenizer(smollm2_checkpoint: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_checkpoint)


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _numbered(tmp_path: Path, n: int) -> Path:
    return _write(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "label": str(i)} for i in range(n)])


def test_message_list_with_chat_template(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"prompt": [{"role": "user", "content": QUESTION}], "label": "5", "metadata": {"a": 2, "b": 3}}]
    ds = PromptDataset(_write(tmp_path / "p.jsonl", rows), tokenizer, apply_chat_template=True)
    (sample,) = ds.samples()
    assert sample.prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert (sample.index, sample.label, sample.metadata) == (0, "5", {"a": 2, "b": 3})
    # Ids tokenise the text exactly: no BOS added on top of the template.
    assert tokenizer.decode(sample.prompt_token_ids) == sample.prompt
    assert sample.prompt_token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (sample.response, sample.response_token_ids, sample.rollout_logprobs) == ("", [], [])
    assert sample.reward is None and sample.group_index is None


def test_plain_string_becomes_one_user_message(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path / "p.jsonl", [{"prompt": QUESTION}])
    templated = PromptDataset(path, tokenizer, apply_chat_template=True).samples()[0]
    messages = [{"role": "user", "content": QUESTION}]
    assert templated.prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raw = PromptDataset(path, tokenizer).samples()[0]
    assert raw.prompt == QUESTION and raw.label is None and raw.metadata == {}
    assert raw.prompt_token_ids == tokenizer(QUESTION, add_special_tokens=False)["input_ids"]


def test_custom_keys_and_from_args(tmp_path: Path, tokenizer: Any) -> None:
    path = _write(tmp_path / "p.jsonl", [{"question": "hi", "answer": 7, "info": {"src": "x"}}, ""])
    args = argparse.Namespace(prompt_data=str(path), input_key="question", label_key="answer",
                              metadata_key="info", apply_chat_template=False, seed=1)
    ds = PromptDataset.from_args(args, tokenizer)
    assert len(ds) == 1  # the blank line is skipped
    assert ds.samples()[0] == Sample(index=0, prompt="hi", prompt_token_ids=ds.samples()[0].prompt_token_ids,
                                     label=7, metadata={"src": "x"})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "ok"}', "{not json"], r"p\.jsonl:2: not valid JSON"),
        (['{"prompt": "ok"}', '{"question": "x"}'], r"p\.jsonl:2: no 'prompt' field \(set --input-key"),
        (['[1, 2]'], r"p\.jsonl:1: expected a JSON object, got list"),
        (['{"prompt": 3}'], r"p\.jsonl:1: 'prompt' must be a string or a list of"),
        (['{"prompt": [{"role": "user"}]}'], r"p\.jsonl:1: 'prompt' must be a string or a list of"),
        (['{"prompt": "x", "metadata": [1]}'], r"p\.jsonl:1: 'metadata' must be a JSON object, got list"),
        (['{"prompt": [{"role": "user", "content": "x"}]}'], r"p\.jsonl:1: 'prompt' is a message list; add --apply"),
        ([""], r"--prompt-data .*p\.jsonl: the file holds no prompts"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, tokenizer: Any, lines: list[str], message: str) -> None:
    path = _write(tmp_path / "p.jsonl", lines)
    with pytest.raises(UserError, match=message):
        PromptDataset(path, tokenizer)


def test_missing_file_names_the_flag(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(UserError, match=r"--eval-prompt-data .*nope\.jsonl: file not found"):
        PromptDataset(tmp_path / "nope.jsonl", tokenizer, flag="--eval-prompt-data")


def test_chat_template_required_for_apply_chat_template(tmp_path: Path, tokenizer: Any) -> None:
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(UserError, match="the tokenizer has no chat template; drop the flag"):
        PromptDataset(_numbered(tmp_path, 2), bare, apply_chat_template=True)


def test_parquet_rows_are_read(tmp_path: Path, tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": [{"role": "user", "content": QUESTION}], "label": "5", "metadata": {"a": 2, "b": 3}},
        {"prompt": [{"role": "user", "content": "What is 4 + 4?"}], "label": "8", "metadata": {"a": 4, "b": 4}},
        {"prompt": [{"role": "user", "content": "What is 1 + 0?"}], "label": "1", "metadata": {"a": 1, "b": 0}},
    ]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    samples = PromptDataset(path, tokenizer, apply_chat_template=True).samples()
    assert [(s.index, s.label, s.metadata) for s in samples] == [(i, r["label"], r["metadata"]) for i, r in enumerate(rows)]
    for sample, row in zip(samples, rows):
        assert sample.prompt == tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert sample.prompt_token_ids == tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    # The same rows as JSON Lines give the same samples.
    assert PromptDataset(_write(tmp_path / "p.jsonl", rows), tokenizer, apply_chat_template=True).samples() == samples


def test_parquet_bad_row_names_file_and_row(tmp_path: Path, tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "label": "1"}, {"question": "b"}]), path)
    with pytest.raises(UserError, match=r"p\.parquet:row 2: no 'prompt' field"):
        PromptDataset(path, tokenizer)


def test_parquet_without_pyarrow_is_a_user_error(tmp_path: Path, tokenizer: Any, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow.parquet` fails as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"reading parquet needs pyarrow; `pip install pyarrow`"):
        PromptDataset(path, tokenizer)


def _labels(batch: list[Sample]) -> list[str]:
    return [s.label for s in batch]


def test_epochs_shuffle_with_seed_plus_epoch(tmp_path: Path, tokenizer: Any) -> None:
    ds = PromptDataset(_numbered(tmp_path, 5), tokenizer, seed=3)
    first = _labels(ds.next_batch(3))
    assert ds.epoch == 0
    straddling = _labels(ds.next_batch(4))  # 2 from epoch 0, 2 from epoch 1
    assert ds.epoch == 1
    expected = [str(i) for i in range(5)]
    random.Random(3).shuffle(expected)
    assert first + straddling[:2] == expected
    # Epoch e is shuffled with seed + e: a dataset seeded 4 starts with epoch 1's order.
    shifted = PromptDataset(_numbered(tmp_path, 5), tokenizer, seed=4)
    assert _labels(shifted.next_batch(2)) == straddling[2:]


def test_no_shuffle_walks_file_order(tmp_path: Path, tokenizer: Any) -> None:
    ds = PromptDataset(_numbered(tmp_path, 3), tokenizer, shuffle=False)
    assert [s.index for s in ds.next_batch(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert ds.epoch == 2


def test_batches_are_copies(tmp_path: Path, tokenizer: Any) -> None:
    ds = PromptDataset(_numbered(tmp_path, 1), tokenizer)
    first = ds.next_batch(1)[0]
    first.response, first.metadata["x"] = "changed", 1
    again = ds.next_batch(1)[0]
    assert again.response == "" and again.metadata == {}


def test_resume_gives_the_same_next_batches(tmp_path: Path, tokenizer: Any) -> None:
    path = _numbered(tmp_path, 7)
    original = PromptDataset(path, tokenizer, seed=11)
    original.next_batch(5)
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
    resumed = PromptDataset(path, tokenizer, seed=11)
    resumed.load_state_dict(state)
    assert resumed.epoch == original.epoch == 0
    for _ in range(3):
        assert _labels(resumed.next_batch(4)) == _labels(original.next_batch(4))
    assert resumed.state_dict() == original.state_dict()


def test_resume_with_a_changed_file_is_refused(tmp_path: Path, tokenizer: Any) -> None:
    state = PromptDataset(_numbered(tmp_path, 4), tokenizer).state_dict()
    other = PromptDataset(_numbered(tmp_path, 6), tokenizer)
    with pytest.raises(UserError, match="state is for 4 prompts but the file now holds 6"):
        other.load_state_dict(state)


def test_next_batch_rejects_non_positive(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        PromptDataset(_numbered(tmp_path, 2), tokenizer).next_batch(0)


# ---------------------------------------------------------------- bytes that are not UTF-8


def test_non_utf8_bytes_name_file_and_line(tmp_path: Path, tokenizer: Any) -> None:
    # Long lines first: the bad byte lies well past the reader's first buffer, and the line is still exact.
    long_rows = b"".join(json.dumps({"prompt": "x" * 5000}).encode() + b"\n" for _ in range(3))
    path = tmp_path / "p.jsonl"
    path.write_bytes(long_rows + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"^--prompt-data .*p\.jsonl:4: not UTF-8 text \(byte 0xe9 at column 16\); "
                                        r"save the file as UTF-8$"):
        PromptDataset(path, tokenizer)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "caf\u00e9"}).encode() + b"\r\n")
    assert PromptDataset(path, tokenizer).samples()[0].prompt == "caf\u00e9"


def test_parquet_string_not_utf8_names_file_and_row(tmp_path: Path, tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = pa.array([b"ok", b"fine", b"caf\xe9"], type=pa.binary()).view(pa.string())  # unchecked bytes
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": prompts}), path)
    with pytest.raises(UserError, match=r"^--prompt-data .*p\.parquet:row 3: a string is not UTF-8 text; "
                                        r"write the table with UTF-8 strings$"):
        PromptDataset(path, tokenizer)


def test_a_file_that_is_not_parquet_is_a_user_error(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(b"this is not a parquet file")
    with pytest.raises(UserError, match=r"^--prompt-data .*p\.parquet: not a readable parquet file \(.+\); "
                                        r"write it with pyarrow or use jsonl$"):
        PromptDataset(path, tokenizer)


# ---------------------------------------------------------------- prompts longer than the model's context


@pytest.fixture(scope="module")
def chars(tmp_path_factory) -> Any:
    """The character-level tokenizer of the tiny RL setup: one token per character."""
    from tests._support.tiny_rl import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("chars"))


def _lengths(tmp_path: Path, lengths: list[int]) -> Path:
    return _write(tmp_path / "p.jsonl", [{"prompt": "7" * n, "label": str(n)} for n in lengths])


def test_an_over_long_prompt_names_file_line_tokens_limit_and_flag(tmp_path: Path, chars: Any) -> None:
    limit = PromptLimit(max_positions=128, response_len=12)
    with pytest.raises(UserError) as info:
        PromptDataset(_lengths(tmp_path, [5, 200, 116, 117, 3]), chars, limit=limit)
    assert str(info.value) == (
        f"{tmp_path / 'p.jsonl'}:2: the prompt is 200 tokens, over the limit of 116 tokens "
        "(max_position_embeddings 128 - --rollout-max-response-len 12), and 1 more prompt of this file is; "
        "shorten them, lower "
        "--rollout-max-response-len, or pass --over-long-prompts drop (or truncate)")


def test_a_100k_character_prompt_fails_at_load(tmp_path: Path, chars: Any) -> None:
    with pytest.raises(UserError, match=r"p\.jsonl:1: the prompt is 100000 tokens, over the limit of 116 "):
        PromptDataset(_lengths(tmp_path, [100_000]), chars, limit=PromptLimit(128, 12))


def test_drop_leaves_over_long_prompts_out_and_keeps_row_numbers(tmp_path: Path, chars: Any) -> None:
    path = _lengths(tmp_path, [5, 200, 116, 117, 3])
    ds = PromptDataset(path, chars, limit=PromptLimit(128, 12, policy="drop"), shuffle=False)
    assert [(s.index, s.label) for s in ds.samples()] == [(0, "5"), (2, "116"), (4, "3")]
    assert ds.over_long == [(f"{path}:2", 200), (f"{path}:4", 117)]


def test_truncate_keeps_the_last_tokens(tmp_path: Path, chars: Any) -> None:
    path = _write(tmp_path / "p.jsonl", [{"prompt": "abcdefghij" * 20 + "what is 3+4?"}, {"prompt": "short"}])
    ds = PromptDataset(path, chars, apply_chat_template=True, limit=PromptLimit(128, 28, policy="truncate"))
    long, short = ds.samples()
    full = chars.apply_chat_template([{"role": "user", "content": "abcdefghij" * 20 + "what is 3+4?"}],
                                     tokenize=False, add_generation_prompt=True)
    full_ids = chars(full, add_special_tokens=False)["input_ids"]
    assert long.prompt_token_ids == full_ids[-100:]  # the question and the assistant header survive
    assert long.prompt.endswith("what is 3+4?<|im_end|><|im_start|>a") and len(long.prompt_token_ids) == 100
    assert chars(long.prompt, add_special_tokens=False)["input_ids"] == long.prompt_token_ids
    assert short.prompt == "<|im_start|>ushort<|im_end|><|im_start|>a"
    assert ds.over_long == [(f"{path}:1", len(full_ids))]


def test_a_file_whose_every_prompt_is_dropped_holds_no_prompts(tmp_path: Path, chars: Any) -> None:
    with pytest.raises(UserError, match=r"p\.jsonl: the file holds no prompts \(--over-long-prompts drop left out "
                                        r"all 2, each over 116 tokens\)"):
        PromptDataset(_lengths(tmp_path, [200, 300]), chars, limit=PromptLimit(128, 12, policy="drop"))


def test_a_response_length_that_leaves_no_room_is_refused(tmp_path: Path, chars: Any) -> None:
    limit = PromptLimit(128, 128, response_flag="--eval-max-response-len")
    assert limit.error() == ("--eval-max-response-len 128 leaves no room for a prompt in the model's 128 positions "
                             "(max_position_embeddings); lower it")
    with pytest.raises(UserError, match="--eval-max-response-len 128 leaves no room"):
        PromptDataset(_lengths(tmp_path, [1]), chars, limit=limit)


def test_from_args_takes_the_limit_of_the_set(tmp_path: Path, chars: Any) -> None:
    path = _lengths(tmp_path, [101, 5])
    args = argparse.Namespace(prompt_data=str(path), input_key="prompt", label_key="label", metadata_key="metadata",
                              apply_chat_template=False, seed=1, rollout_max_response_len=28,
                              eval_max_response_len=8, over_long_prompts="drop")
    assert len(PromptDataset.from_args(args, chars, max_positions=128)) == 1  # 101 > 128 - 28
    evaluated = PromptDataset.from_args(args, chars, path=str(path), eval_set=True, max_positions=128)
    assert len(evaluated) == 2 and [s.index for s in evaluated.next_batch(2)] == [0, 1]  # eval: file order
    assert len(PromptDataset.from_args(args, chars)) == 2  # no model limit given: nothing is checked
