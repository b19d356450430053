"""RL post-training, slime style: rollout -> train -> save -> sync -> evaluate, on Ray actors.

    python train.py --hf-checkpoint DIR --prompt-data train.jsonl --use-lora --lora-r 16 ...

With ``--use-lora`` only the adapters train and only the adapters travel to the rollout
engine; without it, the same loop does full-parameter RL with full-weight sync.
"""

from __future__ import annotations

import time

from slime.ray.cluster import ray_cluster
from slime.ray.placement_group import (
    create_placement_groups,
    create_rollout_manager,
    create_training_models,
    num_bundles,
)
from slime.ray.rollout import check_rollout_args
from slime.utils.arguments import parse_args
from slime.utils.errors import run_main
from slime.utils.memory import PeakMemoryTracker
from slime.utils.metrics import MetricsLogger, format_line


def train(args) -> dict:
    check_rollout_args(args)
    memory = PeakMemoryTracker()
    with ray_cluster(num_cpus=num_bundles(args)):
        pgs = create_placement_groups(args)
        rollout_manager = create_rollout_manager(args, pgs)
        actor_model = create_training_models(args, pgs, rollout_manager)
        for pid in [rollout_manager.engine_pid, *actor_model.pids()]:
            memory.add_pid(pid)

        start_rollout = 0
        if args.load:
            iteration, state = actor_model.load()
            rollout_manager.load_state_dict(state)
            start_rollout = iteration + 1
        num_rollout = args.num_rollout or args.num_epoch * rollout_manager.num_rollout_per_epoch()
        logger = MetricsLogger(args, resume=start_rollout > 0)
        actor_model.update_weights(rollout_manager)
        if args.eval_interval and start_rollout == 0:
            logger.log(-1, rollout_manager.eval(-1))  # where the run starts from

        for rollout_id in range(start_rollout, num_rollout):
            step_start = time.time()
            data, metrics = rollout_manager.generate(rollout_id)
            metrics |= actor_model.train(rollout_id, data)
            if should_save(args, rollout_id, num_rollout):
                actor_model.save(rollout_id, rollout_manager.state_dict())
            metrics |= actor_model.update_weights(rollout_manager)
            if should_eval(args, rollout_id, num_rollout):
                metrics |= rollout_manager.eval(rollout_id)
            metrics["perf/step_seconds"] = time.time() - step_start
            metrics["perf/peak_memory_gib"] = memory.peak_bytes / 2**30
            logger.log(rollout_id, metrics)
            print(format_line(rollout_id, metrics), flush=True)
        logger.close()
    memory.stop()
    return {"peak_memory_bytes": memory.peak_bytes, "num_rollout": num_rollout}


def should_save(args, rollout_id: int, num_rollout: int) -> bool:
    last = rollout_id == num_rollout - 1
    return bool(args.save) and (last or bool(args.save_interval) and (rollout_id + 1) % args.save_interval == 0)


def should_eval(args, rollout_id: int, num_rollout: int) -> bool:
    last = rollout_id == num_rollout - 1
    return bool(args.eval_interval) and (last or (rollout_id + 1) % args.eval_interval == 0)


if __name__ == "__main__":
    run_main(lambda: train(parse_args()))
