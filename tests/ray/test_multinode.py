"""Nothing assumes one node: train.py joins a running two-node Ray cluster (``--ray-address``),
spreads its trainers one per node and rendezvouses on rank 0's node.

The two nodes are Ray's own (``ray.cluster_utils.Cluster``: a head and a worker node, each with
its own raylet, object store and worker processes) on this one machine, so they share an IP; what
differs between them, and what the test checks, is the Ray node each trainer runs on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slime.ray.cluster import cluster_address
from slime.utils.arguments import parse_args
from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts

ROOT = Path(__file__).resolve().parents[2]
# Logical CPUs per node: one trainer bundle, plus room for the engine's bundle on either node.
NODE_CPUS = 2
# Nothing listens here: a run that used $RAY_ADDRESS instead of --ray-address would fail to connect.
UNUSED_ADDRESS = "127.0.0.1:9"


def test_ray_address_flag_is_parsed_and_overrides_the_environment(monkeypatch):
    assert parse_args(["--ray-address", "10.1.2.3:6379"]).ray_address == "10.1.2.3:6379"
    assert parse_args([]).ray_address is None
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    assert cluster_address("10.1.2.3:6379") == "10.1.2.3:6379"
    assert cluster_address(None) == "10.9.9.9:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(None) is None


def test_more_nodes_than_the_cluster_has_is_one_user_error(monkeypatch):
    """STRICT_SPREAD would wait forever for a node that does not exist: refused at once instead."""
    from slime.ray.cluster import create_placement_group, ray_cluster
    from slime.utils.errors import UserError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_cluster(num_cpus=2):  # one node, with CPUs enough for two bundles
        with pytest.raises(UserError, match=r"^--actor-num-nodes 2 needs 2 CPU bundles on as many nodes but the "
                                            r"Ray cluster has 1 such node; lower --actor-num-nodes or add"):
            create_placement_group(2, use_gpu=False, flag="--actor-num-nodes", spread=True)


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A head and one worker node, their state (and Ray's address file, which follows
    ``RAY_TMPDIR``) in a private temp dir: short, since Ray's socket paths live under it."""
    from ray.cluster_utils import Cluster

    root = tempfile.mkdtemp(prefix="slime-mn-")
    temp_dir = os.path.join(root, "ray")
    os.mkdir(temp_dir)
    monkeypatch.setenv("RAY_TMPDIR", root)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token written under ~
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=NODE_CPUS, temp_dir=temp_dir, include_dashboard=False)  # the first is the head
        cluster.add_node(num_cpus=NODE_CPUS, temp_dir=temp_dir)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def test_train_joins_a_two_node_cluster_and_spreads_the_trainers(two_node_cluster, tmp_path):
    ckpt = make_tiny_rl_checkpoint(tmp_path)
    prompts = write_prompts(tmp_path / "train.jsonl", n=16)
    flags = ["--ray-address", two_node_cluster.address, "--hf-checkpoint", ckpt, "--prompt-data", prompts,
             "--apply-chat-template", "--rollout-batch-size", 4, "--n-samples-per-prompt", 4,
             "--rollout-max-response-len", 12, "--custom-rm-path", f"{ROOT}/tests/_support/rewards.py:sevens",
             "--log-dir", tmp_path / "logs", "--seed", 3, "--use-lora", "--lora-r", 4, "--lora-alpha", 8,
             "--num-rollout", 1, "--tensor-model-parallel-size", 2, "--actor-num-nodes", 2,
             "--actor-num-gpus-per-node", 1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": UNUSED_ADDRESS}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, flags)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    print(f"train.py over two nodes: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    placed = re.search(r"^trainer ranks on nodes: (.+)$", proc.stdout, re.M)
    assert placed, proc.stdout[-3000:]
    print(placed.group(0))
    nodes = placed.group(1).split(", ")
    cluster_nodes = {node.node_id for node in two_node_cluster.list_all_nodes()}
    assert len(nodes) == 2 and set(nodes) == cluster_nodes  # rank 0 and rank 1 each on its own node

    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["rollout_id"] == 0]
    # The TP shards, trained on two nodes, still give the engine the trainer's log-probs.
    assert row["train/rollout_logprob_abs_diff"] < 1e-3
