"""Prompt data: the ``Sample`` record and a resumable, epoch-shuffling prompt sampler.

A prompt file (``--prompt-data``) is JSON Lines, one object per line, or a
parquet table (needs pyarrow).  Each row holds

* ``input_key`` (default ``prompt``): a plain string, or an OpenAI-style message
  list ``[{"role": "user", "content": "..."}]`` (needs ``--apply-chat-template``);
* ``label_key`` (default ``label``): anything the reward function understands;
* ``metadata_key`` (default ``metadata``): an optional JSON object.

Every row is validated and tokenised at load time, so a bad line fails the run
before any rollout, with ``file:line`` in the message (``file:row N`` in parquet).
With a :class:`PromptLimit` (the model's positions minus the response length), a
prompt longer than the limit fails the load, is left out, or keeps its last tokens
(``--over-long-prompts error|drop|truncate``).  The start-up checks
(``slime/ray/preflight.py``) build the same datasets as the rollout, so what they
accepted is exactly what the rollout samples from.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from slime.utils.errors import UserError


@dataclass(frozen=True)
class PromptLimit:
    """The most tokens a prompt may have: the model's positions less the longest response.

    ``policy`` is ``--over-long-prompts``: ``error`` fails the load naming the prompt,
    ``drop`` leaves such prompts out, ``truncate`` keeps their *last* tokens (a chat
    template ends in the question and the assistant header; the start is what is lost).
    """

    max_positions: int  # the model's max_position_embeddings
    response_len: int
    response_flag: str = "--rollout-max-response-len"
    policy: str = "error"

    @property
    def tokens(self) -> int:
        return self.max_positions - self.response_len

    @classmethod
    def from_args(cls, args: argparse.Namespace, max_positions: int, *, eval_set: bool = False) -> PromptLimit:
        """The limit of the training prompts, or with ``eval_set`` of an evaluation set (whose
        --eval-max-response-len defaults to --rollout-max-response-len: then that flag is named)."""
        response_len, flag = args.rollout_max_response_len, "--rollout-max-response-len"
        eval_len = getattr(args, "eval_max_response_len", None) if eval_set else None
        if eval_len is not None and eval_len != response_len:
            response_len, flag = eval_len, "--eval-max-response-len"
        return cls(max_positions, response_len, flag, getattr(args, "over_long_prompts", "error"))

    def describe(self) -> str:
        return (f"{self.tokens} tokens (max_position_embeddings {self.max_positions} - {self.response_flag} "
                f"{self.response_len})")

    def error(self) -> str | None:
        """Why no prompt fits at all, or None."""
        if self.tokens >= 1:
            return None
        return (f"{self.response_flag} {self.response_len} leaves no room for a prompt in the model's "
                f"{self.max_positions} positions (max_position_embeddings); lower it")


@dataclass
class Sample:
    """One prompt and, once rolled out, one response to it.

    ``index`` is the row number in the prompt file (0-based), stable across
    epochs; ``group_index`` is the sample's prompt group within its rollout (the
    n samples drawn for one prompt share it; see ``RolloutBatch.group_ids``).
    ``prompt_token_ids`` tokenise ``prompt`` exactly, without extra special
    tokens, so trainer and rollout engine see the same ids (a truncated prompt's
    ``prompt`` is its kept ids, decoded).
    """

    index: int
    prompt: str
    prompt_token_ids: list[int]
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    response: str = ""
    response_token_ids: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)  # one per response token
    reward: float | None = None
    group_index: int | None = None


def _read_rows(path: Path, flag: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)`` pairs; location is ``file:line`` (jsonl) or ``file:row N``."""
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    if path.suffix == ".parquet":
        yield from _read_parquet(path, flag)
        return
    with path.open("rb") as f:  # bytes, decoded line by line: a bad byte is reported at its own line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[:exc.start].decode("utf-8-sig" if lineno == 1 else "utf-8", errors="replace")) + 1
                raise UserError(f"{flag} {path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{column}); save the file as UTF-8") from None
            if not line.strip():
                continue  # a trailing blank line is not a prompt
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{flag} {path}:{lineno}: not valid JSON ({exc.msg})") from None
            except (RecursionError, ValueError) as exc:  # nesting too deep, an integer too long
                raise UserError(f"{flag} {path}:{lineno}: JSON this reader refuses ({type(exc).__name__}: "
                                f"{str(exc)[:80]})") from None
            yield f"{path}:{lineno}", row


def _has_lone_surrogate(text: str) -> bool:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_parquet(path: Path, flag: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{flag} {path}: reading parquet needs pyarrow; `pip install pyarrow` or convert the file to jsonl"
        ) from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise UserError(f"{flag} {path}: not a readable parquet file ({reason}); write it with pyarrow or use jsonl"
                        ) from None
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:  # parquet stores strings as unchecked bytes
        bad = next(i for i in range(table.num_rows) if not _decodes(table.slice(i, 1)))
        raise UserError(f"{flag} {path}:row {bad + 1}: a string is not UTF-8 text; write the table with UTF-8 "
                        "strings") from None
    # A table has one schema for all rows, so a field a row lacks reads back as null: drop the
    # nulls, so such a row is reported as missing the field, as the same row in jsonl would be.
    for row_number, row in enumerate(rows, start=1):
        yield f"{path}:row {row_number}", {key: value for key, value in row.items() if value is not None}


def _decodes(table: Any) -> bool:
    try:
        table.to_pylist()
    except UnicodeDecodeError:
        return False
    return True


def _as_messages(value: Any) -> list[dict[str, str]] | None:
    """``value`` as a chat message list, or None when it is not one."""
    if not isinstance(value, list) or not value:
        return None
    ok = all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    return value if ok else None


class PromptDataset:
    """All prompts of one file, tokenised, with a seeded per-epoch shuffle.

    ``next_batch(n)`` walks the file in the order ``shuffle(range(N), seed + epoch)``
    and moves to the next epoch when one runs out (a batch may straddle two
    epochs).  ``state_dict()`` captures ``(epoch, position)``: a run resumed from
    it draws exactly the batches the original run would have drawn.

    With ``limit``, prompts over ``limit.tokens`` follow ``limit.policy``;
    ``over_long`` lists each one's ``(location, tokens)`` (dropped or truncated).
    A dropped row's number is not reused: ``Sample.index`` stays the file row.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tokenizer: Any,
        *,
        input_key: str = "prompt",
        label_key: str = "label",
        metadata_key: str = "metadata",
        apply_chat_template: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        flag: str = "--prompt-data",
        limit: PromptLimit | None = None,
        check_label: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._check_label = check_label  # what the reward function cannot score (start-up checks only)
        self.seed = seed
        self.shuffle = shuffle
        if apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise UserError("--apply-chat-template: the tokenizer has no chat template; drop the flag")
        self._tokenizer = tokenizer
        self._keys = (input_key, label_key, metadata_key)
        self._apply_chat_template = apply_chat_template
        self.over_long: list[tuple[str, int]] = []
        self._samples = self._load(flag, limit)
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, tokenizer: Any, path: str | None = None, *, eval_set: bool = False,
        max_positions: int | None = None, **kwargs: Any
    ) -> PromptDataset:
        """Build from slime's flags; ``path`` overrides ``--prompt-data``.

        ``eval_set``: an ``--eval-prompt-data`` file (file order, ``--eval-max-response-len``).
        ``max_positions``: the model's ``max_position_embeddings``; prompts are then held to
        it less the response length, as ``--over-long-prompts`` says.
        """
        if max_positions is not None:
            kwargs.setdefault("limit", PromptLimit.from_args(args, max_positions, eval_set=eval_set))
        if eval_set:
            kwargs = {"shuffle": False, "flag": "--eval-prompt-data", **kwargs}
        return cls(
            path if path is not None else args.prompt_data,
            tokenizer,
            input_key=args.input_key,
            label_key=args.label_key,
            metadata_key=args.metadata_key,
            apply_chat_template=args.apply_chat_template,
            seed=args.seed,
            **kwargs,
        )

    def _load(self, flag: str, limit: PromptLimit | None) -> list[Sample]:
        """Every row parsed; over-long prompts handled as ``limit.policy`` says."""
        if limit is not None and limit.error():
            raise UserError(f"{flag} {self.path}: {limit.error()}")
        samples, bad_label = [], ""
        for index, (location, row) in enumerate(_read_rows(self.path, flag)):
            sample = self._parse(index, location, row)
            length = len(sample.prompt_token_ids)
            if limit is not None and length > limit.tokens:
                self.over_long.append((location, length))
                if limit.policy == "drop":
                    continue
                if limit.policy == "truncate":  # keep the end: the question and the assistant header
                    sample.prompt_token_ids = sample.prompt_token_ids[-limit.tokens:]
                    sample.prompt = self._tokenizer.decode(sample.prompt_token_ids)
            if self._check_label is not None and not bad_label and (problem := self._check_label(sample.label)):
                bad_label = f"{location}: {problem}"  # said after the file's other problems
            samples.append(sample)
        if limit is not None and limit.policy == "error" and self.over_long:
            (location, length), more = self.over_long[0], len(self.over_long) - 1
            others = f", and {more} more prompt{'s' if more > 1 else ''} of this file {'are' if more > 1 else 'is'}"
            raise UserError(f"{location}: the prompt is {length} tokens, over the limit of {limit.describe()}"
                            f"{others if more else ''}; shorten {'them' if more else 'it'}, lower "
                            f"{limit.response_flag}, or pass --over-long-prompts drop (or truncate)")
        if bad_label:
            raise UserError(bad_label)
        if not samples:
            dropped = (f" (--over-long-prompts drop left out all {len(self.over_long)}, each over {limit.tokens} "
                       "tokens)" if self.over_long and limit is not None else "")
            raise UserError(f"{flag} {self.path}: the file holds no prompts{dropped}")
        return samples

    def _parse(self, index: int, location: str, row: Any) -> Sample:
        input_key, label_key, metadata_key = self._keys
        if not isinstance(row, dict):
            raise UserError(f"{location}: expected a JSON object, got {type(row).__name__}")
        if input_key not in row:
            raise UserError(f"{location}: no '{input_key}' field (set --input-key to the prompt field)")
        metadata = row.get(metadata_key) or {}
        if not isinstance(metadata, dict):
            raise UserError(f"{location}: '{metadata_key}' must be a JSON object, got {type(metadata).__name__}")
        prompt = self._render(location, row[input_key])
        if _has_lone_surrogate(prompt):
            raise UserError(f"{location}: '{input_key}' holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), "
                            "which is not text; fix the file's escapes")
        # The chat template already carries the special tokens; adding a BOS on
        # top would make the ids disagree with the text.
        token_ids = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not token_ids:  # the engines refuse it mid-run, where the row is no longer known
            raise UserError(f"{location}: '{input_key}' is empty (0 tokens); give the row a prompt or remove it")
        return Sample(index=index, prompt=prompt, prompt_token_ids=list(token_ids), label=row.get(label_key),
                      metadata=metadata)

    def _render(self, location: str, value: Any) -> str:
        """The prompt text the model sees."""
        input_key = self._keys[0]
        messages = _as_messages(value)
        if isinstance(value, str):
            if not self._apply_chat_template:
                return value
            messages = [{"role": "user", "content": value}]
        elif messages is None:
            raise UserError(f"{location}: '{input_key}' must be a string or a list of "
                            "{'role': ..., 'content': ...} messages")
        elif not self._apply_chat_template:
            raise UserError(f"{location}: '{input_key}' is a message list; add --apply-chat-template")
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._samples)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def epoch(self) -> int:
        """The epoch the next drawn sample belongs to (0-based)."""
        return self._epoch

    def samples(self) -> list[Sample]:
        """Fresh copies of every sample, in file order (for evaluation)."""
        return [copy.deepcopy(s) for s in self._samples]

    def next_batch(self, n: int) -> list[Sample]:
        """The next ``n`` samples (fresh copies: the rollout may fill them in)."""
        if n < 1:
            raise ValueError(f"next_batch needs n >= 1, got {n}")
        batch = []
        for _ in range(n):
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order(self._epoch)
            batch.append(copy.deepcopy(self._samples[self._order[self._position]]))
            self._position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position, "num_samples": len(self._samples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_samples"] != len(self._samples):
            raise UserError(
                f"{self.path}: the checkpoint's sampler state is for {state['num_samples']} prompts but the file "
                f"now holds {len(self._samples)}; resume with the original prompt file"
            )
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._order = self._epoch_order(self._epoch)


def check_prompt_files(args: argparse.Namespace, tokenizer: Any, max_positions: int,
                       check_label: Callable[[Any], str | None] | None = None) -> tuple[list[str], list[str]]:
    """Build every prompt file's dataset as the rollout will (same rendering, same limits).

    ``check_label(label)`` says what the reward function could not score (e.g. no number for
    ``--rm-type math``): such a row fails here, at ``file:line``, not in the middle of a rollout.

    Returns ``(errors, warnings)``, one line each: the first problem of each file, and what
    ``--over-long-prompts drop|truncate`` did.  A file that does not exist is skipped (the
    path checks report it).
    """
    pairs = args.eval_prompt_data or []
    files = [(args.prompt_data, False)] + [(path, True) for path in pairs[1::2]]
    errors, warnings = [], []
    for path, eval_set in files:
        limit = PromptLimit.from_args(args, max_positions, eval_set=eval_set)
        if limit.error():  # said once; the file is still read for its other problems
            errors.append(limit.error())
        if not path or not Path(path).is_file():
            continue
        try:
            dataset = PromptDataset.from_args(args, tokenizer, path=path, eval_set=eval_set,
                                              max_positions=None if limit.error() else max_positions,
                                              check_label=check_label)
        except UserError as exc:
            errors.append(str(exc))
            continue
        if dataset.over_long:
            (first, length), over = dataset.over_long[0], len(dataset.over_long)
            total = len(dataset) + (over if limit.policy == "drop" else 0)
            what = "left out" if limit.policy == "drop" else f"cut to their last {limit.tokens} tokens"
            warnings.append(f"warning: --over-long-prompts {limit.policy}: {over} of {total} prompts of {path} are "
                            f"over the limit of {limit.describe()} and were {what} (first: {first}, {length} tokens)")
    return list(dict.fromkeys(errors)), warnings
