"""The driver schedules and never receives a tensor: a real MiniLLM phase (tiny models, real actors) in this process,
with every `ray.get` of the driver inspected."""

import dataclasses

import pytest
import ray
import torch

from tests.inprocess import short_minillm_recipe

pytestmark = pytest.mark.integration


def _tensors_in(value, path="result"):
    """Paths of every torch.Tensor inside a value (containers and dataclasses searched)."""
    if isinstance(value, torch.Tensor):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _tensors_in(v, f"{path}[{k!r}]")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _tensors_in(v, f"{path}[{i}]")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [p for f in dataclasses.fields(value) for p in _tensors_in(getattr(value, f.name), f"{path}.{f.name}")]
    return []


def test_minillm_phase_never_brings_a_tensor_to_the_driver(ray_module, tiny_models, tmp_path, monkeypatch):
    recipe, _ = short_minillm_recipe(
        tmp_path / "run",
        tiny_models.student,
        "learner.minillm_steps=3",
        "eval.num_prompts=4",
        "eval.kl_prompts=4",
        "eval.max_new_tokens=8",
        "sampler.max_new_tokens=8",
    )

    received: list[str] = []
    real_get = ray.get

    def inspecting_get(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        received.extend(_tensors_in(value))
        return value

    monkeypatch.setattr(ray, "get", inspecting_get)
    try:
        summary = recipe.run()
    finally:
        monkeypatch.setattr(ray, "get", real_get)
        recipe.cleanup()
    assert summary["weight_version"] == 3 and summary["final"] is not None
    assert received == [], f"tensors reached the driver: {received[:5]}"
    # the check can fail: fetching a shard the driver only holds by reference is caught
    taken = []
    monkeypatch.setattr(ray, "get", inspecting_get)
    try:
        taken.append(ray.put({"shard": torch.zeros(2)}))
        ray.get(taken[0])
    finally:
        monkeypatch.setattr(ray, "get", real_get)
    assert received == ["result['shard']"]
