"""--lora-tasks: the task file, its validation (every problem in one line) and the per-task view."""

import json

import pytest

from slime.utils.arguments import parse_args
from slime.utils.errors import UserError
from slime.utils.tasks import max_rank, task_args

YAML = """
tasks:
  - name: add
    prompt_data: add.jsonl
    rm_type: exact
    eval_prompt_data: add_eval.jsonl
  - name: sub
    prompt_data: sub.jsonl
    custom_rm_path: rewards.py:score
    eval_prompt_data: {hard: sub_hard.jsonl, easy: sub_easy.jsonl}
    lr: 3.0e-4
    r: 32
    lora_alpha: 8
"""


def _args(task_file, *flags):
    return parse_args(["--hf-checkpoint", "m", "--use-lora", "--lora-r", "16", "--lora-alpha", "32", "--lr", "1e-4",
                       "--rm-type", "math", "--lora-tasks", str(task_file), *flags])


def test_yaml_tasks_take_the_flags_as_defaults(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(YAML)
    args = _args(path)
    add, sub = args.tasks
    assert (add.name, add.prompt_data, add.rm_type, add.custom_rm_path) == ("add", "add.jsonl", "exact", None)
    assert add.eval_prompt_data == ("add", "add_eval.jsonl")
    assert (add.lr, add.lora.r, add.lora.alpha) == (1e-4, 16, 32.0)  # the flags
    assert sub.custom_rm_path == "rewards.py:score"
    assert sub.eval_prompt_data == ("hard", "sub_hard.jsonl", "easy", "sub_easy.jsonl")
    assert (sub.lr, sub.lora.r, sub.lora.alpha, sub.lora.scaling) == (3e-4, 32, 8.0, 0.25)
    assert sub.lora.targets == args.lora.targets  # everything else is the run's
    assert max_rank(args) == 32


def test_task_view_is_a_one_task_run(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"name": "sub", "prompt_data": "s.jsonl", "eval_prompt_data": "e.jsonl", "r": 4}]))
    args = _args(path)
    view = task_args(args, args.tasks[0])
    assert (view.prompt_data, view.eval_prompt_data, view.rm_type, view.lora_r, view.lora.r) == \
        ("s.jsonl", ["sub", "e.jsonl"], "math", 4, 4)
    assert view.tasks == [] and args.prompt_data is None and args.lora.r == 16  # the run's flags are untouched


def test_every_problem_of_the_file_in_one_line(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("""
- name: add
  prompt_data: a.jsonl
  rm_type: fuzzy
- name: add
  prompt_data: b.jsonl
- name: 2bad
  prompt_data: c.jsonl
  lr: -1
- name: iter_0000001
  prompt_data: d.jsonl
- name: ok
  r: 0
  colour: blue
""")
    with pytest.raises(UserError) as info:
        _args(path)
    message = str(info.value)
    assert "\n" not in message
    for part in ("task 'add': rm_type 'fuzzy' is unknown", "task name 'add' appears twice", "name '2bad' is not a valid",
                 "lr must be > 0", "name 'iter_0000001' is not a valid", "task 'ok': prompt_data (a jsonl file of "
                 "prompts) is required", "task 'ok': r must be an integer >= 1", "unknown key 'colour'"):
        assert part in message, part


@pytest.mark.parametrize("text, expected", [
    ("tasks: []", "expected a non-empty list of tasks"),
    ("tasks: [unclosed", "not valid YAML"),
    ("- just a string", "expected a mapping with name and prompt_data"),
])
def test_malformed_files(tmp_path, text, expected):
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=expected):
        _args(path)


def test_flags_that_conflict_with_tasks(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("- {name: add, prompt_data: a.jsonl}")
    with pytest.raises(UserError) as info:
        parse_args(["--hf-checkpoint", "m", "--lora-tasks", str(path), "--prompt-data", "p.jsonl",
                    "--no-lora-only-trainable"])
    message = str(info.value)
    for part in ("--lora-tasks trains one adapter per task and needs --use-lora", "--prompt-data with --lora-tasks",
                 "--no-lora-only-trainable with --lora-tasks"):
        assert part in message, part
    with pytest.raises(UserError, match="--lora-tasks .*missing.yaml: no such file"):
        parse_args(["--hf-checkpoint", "m", "--use-lora", "--lora-tasks", str(tmp_path / "missing.yaml")])


def test_without_the_flag_there_are_no_tasks():
    assert parse_args(["--hf-checkpoint", "m", "--prompt-data", "p.jsonl"]).tasks == []
