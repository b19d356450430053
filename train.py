"""RL post-training, slime style: rollout -> train -> sync -> evaluate -> log -> save, on Ray actors.

With ``--async-rollout`` the next rollout is already being generated while the trainer steps.

    python train.py --hf-checkpoint DIR --prompt-data train.jsonl --use-lora --lora-r 16 ...

With ``--use-lora`` only the adapters train and only the adapters travel to the rollout
engine; without it, the same loop does full-parameter RL with full-weight sync.
"""

from __future__ import annotations

import os
import time

from slime.ray.cluster import ray_cluster
from slime.ray.faults import actor_failures_end_the_run
from slime.ray.preflight import check_run
from slime.ray.rollout import RolloutStream
from slime.ray.placement_group import (
    create_placement_groups,
    create_rollout_manager,
    create_training_models,
    num_bundles,
)
from slime.utils.allocator import active_allocator
from slime.utils.arguments import parse_args
from slime.utils.errors import run_main
from slime.utils.failpoints import failpoint
from slime.utils.memory import PeakMemoryTracker
from slime.utils.metrics import MetricsLogger, Progress, format_line
from slime.utils.run_summary import summarize


def train(args) -> dict:
    check_run(args)
    wall_start = time.time()
    memory = PeakMemoryTracker()
    history: list[tuple[int, dict]] = []
    # A dead or hung engine/trainer ends the run with one line: the checkpoint and the resume command.
    cpus = max(num_bundles(args), os.cpu_count() or 1)  # a private cluster's; a joined one has its own
    with ray_cluster(num_cpus=cpus, address=args.ray_address), actor_failures_end_the_run(args):
        pgs = create_placement_groups(args)
        rollout_manager = create_rollout_manager(args, pgs)  # the engines load while the trainers start
        actor_model = create_training_models(args, pgs)
        pids = [*rollout_manager.wait_ready(), *actor_model.pids()]
        for pid in pids:
            memory.add_pid(pid)
        print(f"trainer ranks on nodes: {', '.join(actor_model.group.node_ids())}", flush=True)
        print(f"malloc of engine and trainers: {', '.join(sorted({active_allocator(p) for p in pids}))}", flush=True)
        memory.add_ray_cluster_processes()  # raylet, GCS, workers: the whole run's memory

        start_rollout = 0
        if args.load:
            iteration, state = actor_model.load()
            rollout_manager.load_state_dict(state)
            start_rollout = iteration + 1
        num_rollout = args.num_rollout or args.num_epoch * rollout_manager.num_rollout_per_epoch()
        logger = MetricsLogger.from_args(args, resume_step=start_rollout)
        actor_model.update_weights(rollout_manager, version=start_rollout)
        rollouts = RolloutStream(rollout_manager, start_rollout, num_rollout,
                                 ahead=args.max_staleness if args.async_rollout else 0)
        if args.eval_interval and start_rollout == 0:
            history.append((-1, rollout_manager.eval(-1)))  # where the run starts from
            logger.log(*history[-1])
            print(format_line(*history[-1]), flush=True)

        for rollout_id in range(start_rollout, num_rollout):
            step_start = time.time()
            with Progress(f"rollout {rollout_id}", total=3, unit="phase") as progress:
                batch, metrics = rollouts.next(rollout_id)
                failpoint("driver.after_generate")
                progress.update()
                metrics |= actor_model.train(rollout_id, batch)
                failpoint("driver.after_train")
                progress.update()
                metrics |= actor_model.update_weights(rollout_manager, version=rollout_id + 1)
                failpoint("driver.after_sync")
                if should_eval(args, rollout_id, num_rollout):
                    metrics |= rollout_manager.eval(rollout_id)
                progress.update()
            metrics["perf/step_seconds"] = time.time() - step_start
            metrics |= memory.metrics()
            history.append((rollout_id, metrics))
            logger.log(rollout_id, metrics)
            print(format_line(rollout_id, metrics), flush=True)
            # Saved after the rollout's row is logged: a run killed in between redoes the rollout and logs it
            # again (a resumed logger drops the rows from its resume point on). Saved before, a kill right after
            # the save would resume past a rollout whose row was never written.
            if should_save(args, rollout_id, num_rollout):
                actor_model.save(rollout_id, rollouts.state_dict())
                failpoint("driver.after_save")
        logger.close()
    memory.stop()
    lines = summarize(args, history, time.time() - wall_start, memory.summary())
    print("\n".join(["=" * 80, "Summary", *lines, "=" * 80]), flush=True)
    return {"history": history, "memory": memory.summary()}


def should_save(args, rollout_id: int, num_rollout: int) -> bool:
    last = rollout_id == num_rollout - 1
    return bool(args.save) and (last or bool(args.save_interval) and (rollout_id + 1) % args.save_interval == 0)


def should_eval(args, rollout_id: int, num_rollout: int) -> bool:
    last = rollout_id == num_rollout - 1
    return bool(args.eval_interval) and (last or (rollout_id + 1) % args.eval_interval == 0)


if __name__ == "__main__":
    run_main(lambda: train(parse_args()))
