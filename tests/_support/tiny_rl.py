"""A tiny, complete RL setup: a random Llama with a character-level tokenizer and chat template,
plus prompt files, so ``train.py`` runs end to end in seconds.

The task used by the learning tests: a custom reward (``tests/_support/rewards.py``) pays for
the character ``7`` in the response, something a random tiny policy learns in a few dozen
rollouts.
"""

from __future__ import annotations

import json
from pathlib import Path

CHARS = list("0123456789+-=?. abcdefghijklmnopqrstuvwxyzWA")
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'][0] }}{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>a{% endif %}"
)


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_tiny_rl_checkpoint(root: str | Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny random model whose vocabulary is the character tokenizer's (48 tokens)."""
    from tests._support.tiny_models import make_tiny_checkpoint

    vocab = len(SPECIAL) + len(CHARS)
    out = make_tiny_checkpoint(root, family, seed=seed, name=f"tiny-rl-{family}",
                               **{"vocab_size": vocab, "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0,
                                  **overrides})
    make_tokenizer(out)
    config = json.loads((out / "generation_config.json").read_text()) if (out / "generation_config.json").exists() else {}
    config.update(eos_token_id=2, bos_token_id=1, pad_token_id=0)
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


def write_prompts(path: str | Path, n: int = 64, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    path = Path(path)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            row = {"prompt": [{"role": "user", "content": f"what is {a}+{b}?"}], "label": str(a + b)}
            f.write(json.dumps(row) + "\n")
    return path
