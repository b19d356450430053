"""Checkpoints: an interrupted run resumes bitwise, a killed save leaves the previous one usable,
broken or mismatched checkpoints are one-line UserErrors, and an adapter holds no base weight.

Every run trains a tiny Llama (real megatron-core, real gloo processes) with LoRA dropout, a
warm-up + cosine LR schedule, and batches drawn from torch, Python and NumPy RNGs, so step 3 after
a resume matches the uninterrupted step 3 only if weights, AdamW state, LR step and every RNG
stream come back exactly.

One training run (a subprocess) feeds most tests, but each concern has its own fixture and test:
the resume per variant, the real kill, the crash after each save stage, each load error, the
adapter's contents (no training needed).  The worker computes each concern on its own and keeps
a failure as that concern's result, so one broken behaviour fails only the tests that name it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from slime.backends.megatron_utils.checkpoint import SAVE_STAGES
from tests._support.dist import free_port, run_distributed

REPO = Path(__file__).resolve().parents[3]
VARIANTS: dict[str, list[str]] = {
    "lora": ["--use-lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1"],
    "full": [],
}
KILLED_AT = "manifest"  # the real kill: every file written, nothing renamed yet
SIMULATION_ERROR = "crash-simulation-error.txt"  # written by killed_run if simulating the crashes failed
FAILED = "__failed__"  # marks a concern whose computation raised: {FAILED: traceback}


def _captured(fn, *args):
    """``fn(*args)``, or ``{FAILED: traceback}`` if it raised: one concern's failure must not hide another's."""
    try:
        return fn(*args)
    except BaseException:
        return {FAILED: traceback.format_exc()}


def _unwrap(value, what: str):
    """``value`` computed by :func:`_captured`, or the test fails with the traceback of ``what``."""
    if isinstance(value, dict) and FAILED in value:
        pytest.fail(f"{what} raised in the worker:\n{value[FAILED]}", pytrace=False)
    return value


def _flags(base: Path, tp: int, variant: str, *extra: str) -> list[str]:
    return ["--hf-checkpoint", str(base), "--tensor-model-parallel-size", str(tp), "--lr", "2e-2",
            "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--lr-decay-iters", "10",
            "--weight-decay", "0.01", "--seed", "3", *VARIANTS[variant], *extra]


def _build(base: Path, tp: int, variant: str, *extra: str):
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.utils.arguments import parse_args

    args = parse_args(_flags(base, tp, variant, *extra))
    return args, initialize_model_and_optimizer(args)


def _step(built) -> tuple[float, float, float]:
    """One optimizer step on a batch whose contents depend on the torch, Python and NumPy RNGs."""
    model, opt = built.model[0], built.optimizer
    model.train()
    offset = random.randrange(4)
    ids = torch.randint(0, built.arch.vocab_size, (2, 12))[:, offset:offset + 8]
    pos = torch.arange(8).expand(2, -1)
    opt.zero_grad()
    loss = model(ids[:, :-1], pos[:, :-1], None, labels=ids[:, 1:]).mean() * float(1 + np.random.rand())
    loss.backward()
    norm, lr = opt.step()
    return loss.item(), norm, lr


def _seed_host_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train(rank: int, base: Path, root: Path, tp: int) -> dict:
    """Per variant: three steps, saving after steps 1 and 2; returns the three (loss, norm, lr)."""
    from slime.backends.megatron_utils.checkpoint import save_checkpoint

    results = {}
    for variant in VARIANTS:
        _seed_host_rngs(0)
        args, built = _build(base, tp, variant)
        steps = []
        for iteration in (1, 2, 3):
            steps.append(_step(built))
            if iteration < 3:
                save_checkpoint(root / variant, iteration, built.model, built.arch, args, built.optimizer,
                                {"consumed_samples": 2 * iteration, "variant": variant})
        results[variant] = steps
    return results


def _simulate_crashes(base: Path, root: Path) -> None:
    """For every save stage: a copy of the LoRA run's directory whose save of iteration 3 died there."""
    from slime.backends.megatron_utils import checkpoint

    class Killed(BaseException):
        pass

    def die() -> None:
        raise Killed

    args, built = _build(base, 1, "lora")
    checkpoint._kill = die
    for stage in checkpoint.SAVE_STAGES:
        target = root / f"crash-{stage}"
        shutil.copytree(root / "lora", target, symlinks=True)
        os.environ[checkpoint.CRASH_ENV] = stage
        with pytest.raises(Killed):
            checkpoint.save_checkpoint(target, 3, built.model, built.arch, args, built.optimizer, {})
    del os.environ[checkpoint.CRASH_ENV]


def killed_run(base: str, root: str) -> None:
    """Fresh process (``python test_checkpoint.py BASE ROOT``): train, simulate crashes, then die for real."""
    from slime.backends.megatron_utils import checkpoint
    from slime.backends.megatron_utils.parallel import init_parallel

    torch.set_num_threads(1)
    init_parallel(0, 1, master_port=free_port())
    base_dir, root_dir = Path(base), Path(root)
    results = _train(0, base_dir, root_dir, 1)
    (root_dir / "uninterrupted.json").write_text(json.dumps(results))
    original_kill = checkpoint._kill
    try:
        _simulate_crashes(base_dir, root_dir)
    except BaseException:  # reported by the crash-recovery tests; the real kill below still runs
        (root_dir / SIMULATION_ERROR).write_text(traceback.format_exc())
    checkpoint._kill = original_kill
    args, built = _build(base_dir, 1, "lora")
    os.environ[checkpoint.CRASH_ENV] = KILLED_AT
    checkpoint.save_checkpoint(root_dir / "lora", 3, built.model, built.arch, args, built.optimizer, {})
    raise AssertionError(f"the save survived {checkpoint.CRASH_ENV}={KILLED_AT}")


def _user_error(fn) -> str:
    from slime.utils.errors import UserError

    try:
        fn()
    except UserError as exc:
        return str(exc)
    return "<no UserError>"


def _resume(rank: int, base: Path, root: Path, tp: int) -> dict:
    """Fresh model per variant, RNGs scrambled, load, step 3; then a scrambled-RNG control step."""
    return {variant: _resume_variant(base, root, tp, variant) for variant in VARIANTS}


def _resume_variant(base: Path, root: Path, tp: int, variant: str) -> dict:
    from slime.backends.megatron_utils.checkpoint import load_checkpoint

    _seed_host_rngs(99)
    args, built = _build(base, tp, variant)
    iteration, extra = load_checkpoint(root / variant, built.model, built.arch, args, built.optimizer)
    out = {"iteration": iteration, "extra": extra, "step3": _step(built)}
    load_checkpoint(root / variant, built.model, built.arch, args, built.optimizer)
    torch.manual_seed(12345)  # the same state with the dropout/data RNG not restored: must differ
    out["step3_without_rng"] = _step(built)
    return out


def _crash_recovery(base: Path, root: Path, stage: str) -> dict:
    """The copy crashed after ``stage`` loads (the previous or the finished iteration), and the next save cleans up."""
    from slime.backends.megatron_utils import checkpoint

    target = root / f"crash-{stage}"
    _seed_host_rngs(99)
    args, built = _build(base, 1, "lora")
    iteration, _ = checkpoint.load_checkpoint(target, built.model, built.arch, args, built.optimizer)
    step = _step(built)
    checkpoint.save_checkpoint(target, 4, built.model, built.arch, args, built.optimizer, {})
    leftovers = sorted(p.name for p in target.iterdir() if p.name.startswith("."))
    return {"iteration": iteration, "step": step, "leftovers": leftovers, "link": os.readlink(target / "adapter")}


def _errors(base: Path, other_model: Path, root: Path) -> dict[str, str]:
    """One UserError message per way a --load directory can be wrong."""
    from slime.backends.megatron_utils.checkpoint import META_FILE, load_checkpoint

    def load(directory: Path, variant: str = "lora", *extra: str, model: Path = base):
        args, built = _build(model, 1, variant, *extra)
        return lambda: load_checkpoint(directory, built.model, built.arch, args, built.optimizer)

    def broken(name: str, edit) -> Path:
        target = root / f"broken-{name}"
        shutil.copytree(root / "lora", target, symlinks=True)
        edit(target / "iter_0000002")
        return target

    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def flip_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))

    def claim_tp2(iter_dir: Path) -> None:
        meta = json.loads((iter_dir / META_FILE).read_text())
        meta["parallel"]["tensor_model_parallel_size"] = 2
        (iter_dir / META_FILE).write_text(json.dumps(meta))

    empty = root / "empty"
    empty.mkdir()
    dangling = broken("dangling", lambda d: shutil.rmtree(d))
    cases = {  # each builds its broken copy and its model only when its turn comes, as before
        "no_latest": lambda: load(empty),
        "missing_iter": lambda: load(dangling),
        "truncated": lambda: load(broken("truncated", lambda d: truncate(d / "trainer_state/rank_00000.safetensors"))),
        "corrupt": lambda: load(broken("corrupt", lambda d: flip_byte(d / "adapter/adapter_model.safetensors"))),
        "bad_meta": lambda: load(broken("meta", lambda d: truncate(d / META_FILE))),
        "lora_r": lambda: load(root / "lora", "lora", "--lora-r", "8"),
        "no_lora": lambda: load(root / "lora", "full"),
        "model": lambda: load(root / "lora", model=other_model),
        "tp": lambda: load(broken("tp", claim_tp2)),
    }
    return {case: _captured(lambda make=make: _user_error(make())) for case, make in cases.items()}


def _adapter_size(root: Path) -> dict:
    """Save a checkpoint of a SmolLM2-135M-shaped model with r=16; report the adapter's tensors."""
    from safetensors import safe_open

    from slime.backends.megatron_utils.arch import ModelArch
    from slime.backends.megatron_utils.checkpoint import save_checkpoint
    from slime.backends.megatron_utils.model import build_optimizer, get_model
    from slime.utils.arguments import parse_args

    smollm2 = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                   max_position_embeddings=2048, tie_word_embeddings=True)
    arch = ModelArch.from_hf_config(smollm2)
    # --hf-checkpoint set (never read) skips random init of the 135M base weights: only shapes matter.
    args = parse_args(["--use-lora", "--lora-r", "16", "--lora-alpha", "32", "--hf-checkpoint", str(root / "unused")])
    chunks = get_model(args, arch, args.lora)
    base_numel = sum(p.numel() for p in chunks[0].parameters() if not p.requires_grad)
    save_checkpoint(root / "smollm2", 1, chunks, arch, args, build_optimizer(args, chunks), {})
    weights = root / "smollm2" / "adapter" / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    files = {p.name: p.stat().st_size for p in (root / "smollm2" / "adapter").iterdir()}
    return {"shapes": shapes, "files": files, "base_numel": base_numel}


def _resume_and_check(rank: int, base: Path, other_model: Path, root: Path, tp: int) -> dict:
    """TP=2: the resume only; a failure fails the worker (a rank that went on would wait for its peer).
    TP=1: every concern computed on its own, its failure kept as its result (see :func:`_captured`)."""
    if tp > 1:
        return {"resume": _resume(rank, base, root, tp)}
    return {"resume": {variant: _captured(_resume_variant, base, root, tp, variant) for variant in VARIANTS},
            "crash": {stage: _captured(_crash_recovery, base, root, stage) for stage in SAVE_STAGES},
            "errors": _captured(_errors, base, other_model, root)}


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The TP=1 run (a subprocess, ``killed_run``): three uninterrupted steps per variant with saves after
    steps 1 and 2, the simulated crashes, then a save of iteration 3 really killed mid-way (``os._exit``).
    Returns ``(uninterrupted (loss, norm, lr) per variant and step, base, other model, run root)``."""
    from tests._support.tiny_models import make_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("ckpt_tp1")
    base = make_tiny_checkpoint(tmp, family="llama", seed=0)
    other = make_tiny_checkpoint(tmp, family="llama", seed=1, name="other", hidden_size=48)
    root = tmp / "run"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(base), str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    from slime.backends.megatron_utils.checkpoint import CRASH_EXIT_CODE

    assert proc.returncode == CRASH_EXIT_CODE, proc.stderr[-3000:]
    uninterrupted = json.loads((root / "uninterrupted.json").read_text())
    return uninterrupted, base, other, root


@pytest.fixture(scope="module")
def tp1_checks(trained):
    """One fresh worker process computes, each on its own, the resumes, the crash recoveries and the
    load errors (a failure is kept as that concern's result); the fixtures below hand out one each."""
    _, base, other, root = trained
    (result,) = run_distributed(_resume_and_check, 1, tp=1, args=(base, other, root, 1))
    return result


@pytest.fixture(scope="module")
def resumed(tp1_checks):
    """Per variant: the step 3 after loading iteration 2 into a fresh model (and the control step)."""
    return tp1_checks["resume"]


@pytest.fixture(scope="module")
def crash_recovery(trained, tp1_checks):
    """Per save stage: what loading the copy whose save of iteration 3 died after that stage gave."""
    simulation_error = trained[3] / SIMULATION_ERROR
    if simulation_error.exists():
        pytest.fail(f"simulating the crashes failed in killed_run:\n{simulation_error.read_text()}", pytrace=False)
    return tp1_checks["crash"]


@pytest.fixture(scope="module")
def load_errors(tp1_checks):
    """Per way a --load directory can be wrong: the UserError message."""
    return _unwrap(tp1_checks["errors"], "preparing the broken checkpoints")


@pytest.fixture(scope="module")
def smollm2_shaped_adapter(tmp_path_factory, single_process):
    """The adapter checkpoint of a SmolLM2-135M-shaped model at r=16 (in this process; no training needed)."""
    return _adapter_size(tmp_path_factory.mktemp("ckpt_smollm2"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_is_bitwise_identical_tp1(trained, resumed, variant):
    uninterrupted = trained[0]
    resumed = _unwrap(resumed[variant], f"resuming the {variant} run")
    assert resumed["iteration"] == 2
    assert resumed["extra"] == {"consumed_samples": 4, "variant": variant}
    assert tuple(resumed["step3"]) == tuple(uninterrupted[variant][2]), variant  # loss, grad norm, lr: exact
    assert resumed["step3_without_rng"][0] != uninterrupted[variant][2][0], "RNG restore is not exercised"


def test_killed_save_leaves_previous_checkpoint(trained):
    root = trained[3]
    from slime.backends.megatron_utils.checkpoint import read_latest_iteration

    # The real kill (os._exit mid-save): latest still names 2, the staging dir is all that is left.
    assert read_latest_iteration(root / "lora") == 2
    assert os.readlink(root / "lora" / "adapter") == "iter_0000002/adapter"
    assert not (root / "lora" / "iter_0000003").exists()


@pytest.mark.parametrize("stage", SAVE_STAGES)
def test_save_crashed_at_each_stage_recovers(trained, crash_recovery, stage):
    uninterrupted = trained[0]
    crash = _unwrap(crash_recovery[stage], f"recovering from a crash after the {stage} stage")
    finished = stage == "latest"
    assert crash["iteration"] == (3 if finished else 2), stage
    if not finished:  # resuming from 2 replays the uninterrupted step 3
        assert tuple(crash["step"]) == tuple(uninterrupted["lora"][2]), stage
    assert crash["leftovers"] == [], stage
    assert crash["link"] == "iter_0000004/adapter"


@pytest.mark.parametrize("case, words", [
    ("no_latest", ["latest_checkpointed_iteration.txt", "missing"]),
    ("missing_iter", ["iteration 2", "iter_0000002"]),
    ("truncated", ["rank_00000.safetensors", "truncated"]),
    ("corrupt", ["adapter_model.safetensors", "corrupt"]),
    ("bad_meta", ["checkpoint.json", "corrupt"]),
    ("lora_r", ["--lora-r 4", "--lora-r 8"]),
    ("no_lora", ["--use-lora"]),
    ("model", ["different model", "hidden_size", "--hf-checkpoint"]),
    ("tp", ["--tensor-model-parallel-size 2", "not supported"]),
])
def test_load_errors_name_the_file_and_flag(load_errors, case, words):
    message = _unwrap(load_errors[case], f"loading the {case} checkpoint")
    assert "\n" not in message
    for word in words:
        assert word in message, (case, message)


def test_adapter_of_smollm2_shape_holds_only_lora_tensors(smollm2_shaped_adapter):
    info = smollm2_shaped_adapter
    r, hidden, ffn, q, kv = 16, 576, 1536, 9 * 64, 3 * 64
    per_layer = r * ((hidden + q) + 2 * (hidden + kv) + (q + hidden) + 2 * (hidden + ffn) + (ffn + hidden))
    expected_bytes = 30 * per_layer * 4  # fp32
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in info["shapes"]), "base weight in adapter"
    assert len(info["shapes"]) == 30 * 7 * 2
    tensor_bytes = sum(4 * int(np.prod(s)) for s in info["shapes"].values())
    assert tensor_bytes == expected_bytes
    size = info["files"]["adapter_model.safetensors"]
    assert expected_bytes <= size < expected_bytes + 100_000  # tensors + header, nothing else
    assert size < 0.05 * info["base_numel"] * 4  # under 5% of the frozen base it adapts
    assert 10e6 < size < 25e6  # ~19.5 MB in fp32 (~4.9M parameters)


@pytest.mark.slow
def test_resume_is_bitwise_identical_tp2(tmp_path):
    from tests._support.tiny_models import make_tiny_checkpoint

    base = make_tiny_checkpoint(tmp_path, family="llama", seed=0)
    root = tmp_path / "run"
    uninterrupted = run_distributed(_train, 2, tp=2, args=(base, root, 2))
    resumed = run_distributed(_resume_and_check, 2, tp=2, args=(base, base, root, 2))
    for rank in range(2):
        for variant in VARIANTS:
            got = resumed[rank]["resume"][variant]
            assert got["iteration"] == 2
            assert tuple(got["step3"]) == tuple(uninterrupted[rank][variant][2]), (rank, variant)
    assert sorted(p.name for p in (root / "lora" / "iter_0000002" / "trainer_state").iterdir()) == [
        "args.json", "rank_00000.json", "rank_00000.safetensors", "rank_00001.json", "rank_00001.safetensors"]


if __name__ == "__main__":
    killed_run(*sys.argv[1:3])
