"""Write a toy arithmetic prompt set: train.jsonl and eval.jsonl.

    python tools/make_arith_data.py --out-dir DIR [--seed 0] [--n-train 2000] [--n-eval 100] [--op add]

Each line is one prompt in the format slime's --prompt-data reads:

    {"prompt": [{"role": "user", "content": "What is 7 + 12? Answer with just the number."}],
     "label": "19", "metadata": {"a": 7, "b": 12, "op": "add"}}

Operands are uniform in 0..20.  Train and eval come from two independent
random streams derived from --seed, so changing --n-train never changes the
eval set, and the same seed always gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable

from slime.utils.atomic import write_file_atomically
from slime.utils.errors import run_main

OPERAND_MAX = 20
OPS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "add": ("+", lambda a, b: a + b),
    "sub": ("-", lambda a, b: a - b),
}


def make_problem(a: int, b: int, op: str) -> dict[str, Any]:
    symbol, apply = OPS[op]
    question = f"What is {a} {symbol} {b}? Answer with just the number."
    return {
        "prompt": [{"role": "user", "content": question}],
        "label": str(apply(a, b)),
        "metadata": {"a": a, "b": b, "op": op},
    }


def make_split(split: str, seed: int, n: int, op: str) -> list[dict[str, Any]]:
    """``n`` problems from the stream named by (split, seed); string seeds hash
    deterministically, independent of PYTHONHASHSEED."""
    rng = random.Random(f"{split}:{seed}")
    pairs = [(rng.randint(0, OPERAND_MAX), rng.randint(0, OPERAND_MAX)) for _ in range(n)]
    return [make_problem(a, b, op) for a, b in pairs]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    write_file_atomically(path, write)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=_non_negative, default=2000)
    parser.add_argument("--n-eval", type=_non_negative, default=100)
    parser.add_argument("--op", choices=sorted(OPS), default="add")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.n_train), ("eval", args.n_eval)):
        path = args.out_dir / f"{split}.jsonl"
        write_jsonl(path, make_split(split, args.seed, n, args.op))
        print(f"wrote {n} {args.op} problems to {path}")


if __name__ == "__main__":
    run_main(main)
