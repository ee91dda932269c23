"""Shared fixtures: one Ray session for the integration tests, and the tiny default's models."""

import os

from common.engine_env import IN_PROCESS_ENGINE, set_engine_env

set_engine_env()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")  # as learner.main: actors not starved by any other busy process

import pytest  # noqa: E402


def _start_ray(ray) -> None:
    ray.init(
        address="local",  # never another cluster on this machine (a `ray start` head, another test's)
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {**IN_PROCESS_ENGINE, "WANDB_MODE": "offline"}},
    )


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        _start_ray(ray)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_module():
    """Ray for one module, shut down after it, for modules that must not share a Ray with the rest of the session
    (test_job_submission's own head now stops only its own processes; this keeps each module's Ray apart anyway).
    Reuses a session that is already up."""
    import ray

    owned = not ray.is_initialized()
    if owned:
        _start_ray(ray)
    yield ray
    if owned:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models():
    """The embedded default's tokenizer/teacher/student (built once, cached like the default run's)."""
    from common.tiny import tiny_models_for

    return tiny_models_for()
