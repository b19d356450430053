"""``train.py`` with a rollout engine that is handed a perturbed adapter: what ``--check-logprob-gap`` is for.

By design nothing a user passes makes the engine and the trainer see different adapters: the
engine only ever receives the trainer's own export (``TrainGroup.update_weights`` ->
``RolloutEngine.apply_update``), including an adapter started from ``--lora-adapter-path``.
So the end-to-end test of the check uses a test double of the engine:
:class:`PerturbedAdapterEngine` is the real engine except that ``apply_update`` adds seeded noise
to every ``lora_B`` it receives, i.e. the engine samples from another policy than the one the
trainer trains, as with a stale or mis-exported adapter.

    python -c "from tests._support.perturbed_engine import main; main()" FLAGS...

runs ``train.py``'s own ``__main__`` with ``FLAGS`` after registering the double as the ``hf``
engine in :data:`slime.rollout.engines.ENGINES`.  The double lives in this importable module (not
in ``__main__``), so Ray hands it to the engine's worker by reference and the worker imports it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

from slime.rollout import engines
from slime.rollout.engine import WeightUpdate
from slime.rollout.hf_engine import HFRolloutEngine

ROOT = Path(__file__).resolve().parents[2]
B_NOISE_STD = 0.5  # large next to the trainer's B (zero at the start, ~lr per step after)


class PerturbedAdapterEngine(HFRolloutEngine):
    """The built-in engine, given ``B + N(0, B_NOISE_STD)`` for every adapter B it is sent."""

    def apply_update(self, payload: WeightUpdate) -> dict:
        tensors, config = payload
        if config is not None:
            gen = torch.Generator().manual_seed(0)
            tensors = {key: value + B_NOISE_STD * torch.randn(value.shape, generator=gen, dtype=value.dtype)
                       if ".lora_B." in key else value for key, value in tensors.items()}
        return super().apply_update((tensors, config))


def main() -> None:
    """Run ``train.py`` (as ``__main__``, with this process's arguments) on the perturbed engine."""
    engines.ENGINES["hf"] = f"{__name__}:{PerturbedAdapterEngine.__name__}"
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
