"""Placement planning (pure): one bundle per resource-asking actor; clear reasons when a cluster can't hold it."""

import pytest

from common.config import ConfigError, load_config
from common.placement import bundled, plan_slots, resource_problems


def test_default_plan_packs_on_two_cpus():
    slots = plan_slots(load_config())
    assert [s.name for s in slots] == ["learner-0", "teacher-0", "sampler-0", "rollout-queue"]
    assert bundled(slots) == {"learner-0": 0, "teacher-0": 1, "sampler-0": 2}  # replay asks for nothing
    assert resource_problems(slots, {"CPU": 2.0}, [{"CPU": 2.0}]) == []
    assert resource_problems(slots, {"CPU": 1.5}, [{"CPU": 1.5}])[0].startswith("2 CPUs requested")


def test_gpu_plan_names_each_actor_and_checks_single_nodes():
    cfg = load_config(
        overrides=[
            "sampler.tensor_parallel_size=2",
            "cluster.sampler_gpus=2",
            "cluster.teacher_gpus=1",
            "cluster.learner_gpus=1",
            "learner.num_workers=2",
            "learner.batch_size=16",
        ]
    )
    slots = plan_slots(cfg)
    assert {s.name: s.gpus for s in slots if s.gpus} == {"learner-0": 1, "learner-1": 1, "teacher-0": 1, "sampler-0": 2}
    problems = resource_problems(slots, {"CPU": 8, "GPU": 3})
    assert problems and "5 GPUs requested" in problems[0] and "sampler-0 2" in problems[0]
    # enough GPUs in total, but the tensor-parallel sampler needs two on one node
    five_single_gpu_nodes = [{"CPU": 2, "GPU": 1}] * 5
    problems = resource_problems(slots, {"CPU": 10, "GPU": 5}, five_single_gpu_nodes)
    assert problems == ["sampler-0 needs {'CPU': 1.0, 'GPU': 2.0} on one node; no node has that much"]


def test_tensor_parallel_needs_gpus_in_the_sampler_bundle():
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 needs cluster.sampler_gpus >= 2"):
        load_config(overrides=["sampler.tensor_parallel_size=2"])
