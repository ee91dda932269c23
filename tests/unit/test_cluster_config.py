"""ray_cluster.yaml validates with the installed Ray's own cluster-launcher schema and validator."""

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load():
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def _schema():
    import ray.autoscaler

    return json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())


def test_cluster_config_validates_with_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load()
    jsonschema.validate(cfg, _schema())
    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    types = full["available_node_types"]
    assert types[full["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert any("dashboard" in c for c in full["head_start_ray_commands"])


def test_validator_rejects_a_broken_config():
    cfg = _load()
    cfg["available_node_types"]["gpu_1x"]["max_wrokers"] = 3  # a typo must not pass
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _schema())
