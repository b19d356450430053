"""train.py with --lora-tasks on a tiny model: two tasks, one base, one run, one engine.

Each task has its own prompts, reward, rank and learning rate.  The engine samples both tasks in
one call, routed per request; the trainer's log-probs match the engine's for every task (a request
sent through the wrong adapter would fail --check-logprob-gap); each saved adapter loads alone in
peft and gives the trainer's log-probs; --load resumes both tasks exactly."""

import json

import pytest

from tests._support.numerics import assert_close
from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts
from tests.test_train import PEFT_LOGPROB_ATOL, ROOT, chat_tokens, rows, run_train

RANKS = {"sevens": 4, "arith": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    ckpt = make_tiny_rl_checkpoint(root)
    tasks = [
        {"name": "sevens", "prompt_data": str(write_prompts(root / "sevens.jsonl", n=32, seed=0)),
         "custom_rm_path": f"{ROOT}/tests/_support/rewards.py:sevens", "lr": 1e-2},
        {"name": "arith", "prompt_data": str(write_prompts(root / "arith.jsonl", n=32, seed=1)), "rm_type": "math",
         "eval_prompt_data": str(write_prompts(root / "arith_eval.jsonl", n=8, seed=2)), "r": 8, "lora_alpha": 16,
         "lr": 5e-3},
    ]
    task_file = root / "tasks.json"
    task_file.write_text(json.dumps({"tasks": tasks}))
    return ckpt, task_file


def flags(ckpt, task_file, out, num_rollout, *extra):
    return ["--hf-checkpoint", ckpt, "--lora-tasks", task_file, "--use-lora", "--lora-r", 4, "--lora-alpha", 8,
            "--apply-chat-template", "--rollout-batch-size", 4, "--n-samples-per-prompt", 4,
            "--rollout-max-response-len", 12, "--num-rollout", num_rollout, "--log-dir", out / "logs", "--seed", 3,
            "--eval-interval", 2, *extra]


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    ckpt, task_file = setup
    out = tmp_path_factory.mktemp("run")
    proc = run_train(*flags(ckpt, task_file, out, 3, "--save", out / "save", "--save-interval", 1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, out


def test_every_task_trains_on_its_own_rollouts(run):
    proc, out = run
    assert "Adapters: sevens (r=4, alpha=8), arith (r=8, alpha=16)" in proc.stdout
    metrics = {r["rollout_id"]: r for r in rows(out / "logs")}
    assert sorted(metrics) == [-1, 0, 1, 2]
    assert "arith/eval/arith/reward_mean" in metrics[-1] and "arith/eval/arith/reward_mean" in metrics[2]
    for rollout_id in (0, 1, 2):
        row = metrics[rollout_id]
        for task in RANKS:
            for key in ("rollout/reward_mean", "train/loss", "train/grad_norm", "train/lr"):
                assert f"{task}/{key}" in row, (rollout_id, task, key)
            # the engine sampled each task's requests from that task's adapter, as the trainer sees it
            assert_close(row[f"{task}/train/rollout_logprob_abs_diff"], 0.0, atol=1e-3, rtol=0,
                         what=f"engine vs trainer gap, {task}")
        assert (row["sevens/train/lr"], row["arith/train/lr"]) == (1e-2, 5e-3)
    # adapter-only sync of both adapters: the sum of the two adapters' fp32 bytes
    from safetensors.torch import load_file

    sizes = {t: sum(v.numel() * 4 for v in load_file(str(out / "save" / t / "adapter" / "adapter_model.safetensors")).values())
             for t in RANKS}
    assert metrics[1]["sync/bytes"] == sum(sizes.values())
    assert sizes["arith"] == 2 * sizes["sevens"]  # r 8 vs r 4


def test_each_saved_adapter_loads_alone_in_peft(setup, run, single_process):
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.utils.arguments import parse_args
    from tests._support.logprobs import hf_logprobs, megatron_logprobs, peft_logprobs

    ckpt, _ = setup
    _, out = run
    tokens = chat_tokens(ckpt, [("what is 3+4?", "7 is 7."), ("what is 9+8?", "17 = 17")])
    base = hf_logprobs(ckpt, tokens)
    in_peft = {}
    for task, r in RANKS.items():
        adapter = out / "save" / task / "adapter"
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == r
        in_peft[task] = peft_logprobs(ckpt, adapter, tokens)
        assert (in_peft[task] - base).abs().max() > 10 * PEFT_LOGPROB_ATOL  # it has learned
        args = parse_args(["--hf-checkpoint", str(ckpt), "--use-lora", "--lora-r", str(r), "--lora-alpha", str(2 * r),
                           "--lora-adapter-path", str(adapter)])
        built = initialize_model_and_optimizer(args)
        for chunk in built.model:
            chunk.eval()
        assert_close(in_peft[task], megatron_logprobs(built.model, built.arch, tokens), atol=PEFT_LOGPROB_ATOL, rtol=0,
                     what=f"saved adapter {task}: peft vs trainer")
    assert (in_peft["sevens"] - in_peft["arith"]).abs().max() > 10 * PEFT_LOGPROB_ATOL  # two adapters, not one


def test_load_resumes_every_task_exactly(setup, run, tmp_path):
    """A run of 2 rollouts, then --load to 3: rollout 2 equals the uninterrupted run's, for both tasks."""
    ckpt, task_file = setup
    _, out = run
    reference = {r["rollout_id"]: r for r in rows(out / "logs")}
    first = run_train(*flags(ckpt, task_file, tmp_path, 2, "--save", tmp_path / "save"))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train(*flags(ckpt, task_file, tmp_path, 3, "--save", tmp_path / "save", "--load", tmp_path / "save"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {r["rollout_id"]: r for r in rows(tmp_path / "logs")}
    for task in RANKS:
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm", "rollout/response_len_mean"):
            assert after[2][f"{task}/{key}"] == reference[2][f"{task}/{key}"], (task, key)
