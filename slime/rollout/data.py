"""Prompt data: the ``Sample`` record and a resumable, epoch-shuffling prompt sampler.

A prompt file (``--prompt-data``) is JSON Lines, one object per line, or a
parquet table (needs pyarrow).  Each row holds

* ``input_key`` (default ``prompt``): a plain string, or an OpenAI-style message
  list ``[{"role": "user", "content": "..."}]`` (needs ``--apply-chat-template``);
* ``label_key`` (default ``label``): anything the reward function understands;
* ``metadata_key`` (default ``metadata``): an optional JSON object.

Every row is validated and tokenised at load time, so a bad line fails the run
before any rollout, with ``file:line`` in the message.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from slime.utils.errors import UserError


@dataclass
class Sample:
    """One prompt and, once rolled out, one response to it.

    ``index`` is the row number in the prompt file (0-based), stable across
    epochs; ``group_index`` is the sample's prompt group within its rollout (the
    n samples drawn for one prompt share it; see ``RolloutBatch.group_ids``).
    ``prompt_token_ids`` tokenise ``prompt`` exactly, without extra special
    tokens, so trainer and rollout engine see the same ids.
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
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a trailing blank line is not a prompt
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{flag} {path}:{lineno}: not valid JSON ({exc.msg})") from None


def _read_parquet(path: Path, flag: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{flag} {path}: reading parquet needs pyarrow; `pip install pyarrow` or convert the file to jsonl"
        ) from None
    # A table has one schema for all rows, so a field a row lacks reads back as null: drop the
    # nulls, so such a row is reported as missing the field, as the same row in jsonl would be.
    for row_number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}:row {row_number}", {key: value for key, value in row.items() if value is not None}


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
    ) -> None:
        self.path = Path(path)
        self.seed = seed
        self.shuffle = shuffle
        if apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise UserError("--apply-chat-template: the tokenizer has no chat template; drop the flag")
        self._tokenizer = tokenizer
        self._keys = (input_key, label_key, metadata_key)
        self._apply_chat_template = apply_chat_template
        self._samples = [self._parse(i, loc, row) for i, (loc, row) in enumerate(_read_rows(self.path, flag))]
        if not self._samples:
            raise UserError(f"{flag} {self.path}: the file holds no prompts")
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, tokenizer: Any, path: str | None = None, **kwargs: Any
    ) -> PromptDataset:
        """Build from slime's flags; ``path`` overrides ``--prompt-data`` (e.g. an eval set)."""
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
        # The chat template already carries the special tokens; adding a BOS on
        # top would make the ids disagree with the text.
        token_ids = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
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
