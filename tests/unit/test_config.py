import pytest
from pydantic import ValidationError

from common.config import ConfigError, DistillConfig, load_config, parse_overrides


def test_default_config_loads():
    cfg = load_config()
    assert isinstance(cfg, DistillConfig)
    assert cfg.method == "minillm" and cfg.objective.alpha == 0.2


def test_overrides_apply_and_parse_types():
    cfg = load_config(overrides=["learner.lr=1e-4", "data.max_prompt_tokens=64", "objective.clip_eps=null"])
    assert cfg.learner.lr == 1e-4
    assert cfg.data.max_prompt_tokens == 64
    assert cfg.objective.clip_eps is None


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError, match=r"learner\.lrr: unknown key"):
        load_config(overrides=["learner.lrr=1"])


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"objective\.alpha"):
        load_config(overrides=["objective.alpha=1.5"])


def test_head_dim_rule_is_enforced():
    with pytest.raises(ConfigError, match=r"models\.tiny\.student.*head_dim=16"):
        load_config(overrides=["models.tiny.student.hidden_size=32", "models.tiny.student.num_heads=2"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["learner.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(ValidationError):
        cfg.learner.lr = 1.0  # type: ignore[misc]


def test_local_source_needs_paths():
    with pytest.raises(ConfigError, match="models"):
        load_config(overrides=["models.source=local"])


def test_batches_must_split_evenly_over_learner_workers():
    with pytest.raises(ConfigError, match="divisible by learner.num_workers"):
        load_config(overrides=["learner.num_workers=3"])


def test_weight_sync_choice_and_backend():
    from common.config import weight_sync_backend

    cfg = load_config(None, ["learner.weight_sync=collective"])
    assert cfg.learner.weight_sync == "collective"
    assert weight_sync_backend(cfg.cluster) == "gloo"
    gpu = load_config(None, ["cluster.learner_gpus=1", "cluster.sampler_gpus=1"])
    assert weight_sync_backend(gpu.cluster) == "nccl"
    # a CPU sampler gets its weights over gloo even from a GPU learner (CPU buffers)
    assert weight_sync_backend(load_config(None, ["cluster.learner_gpus=1"]).cluster) == "gloo"
    with pytest.raises(ConfigError, match="learner.weight_sync"):
        load_config(None, ["learner.weight_sync=nccl"])
    with pytest.raises(ConfigError, match="tensor_parallel_size=1"):
        load_config(
            None, ["learner.weight_sync=collective", "sampler.tensor_parallel_size=2", "cluster.sampler_gpus=2"]
        )
    assert load_config(None, ["cluster.torch_threads=2"]).cluster.torch_threads == 2
    with pytest.raises(ConfigError, match="cluster.torch_threads"):
        load_config(None, ["cluster.torch_threads=0"])


def test_weight_group_backend_from_the_members_gpus():
    """NCCL only when every member has a GPU of its own: it refuses two ranks on one device."""
    from common.weight_sync import group_backend

    assert group_backend([["n1:0"], ["n1:1"], ["n2:0"]]) == "nccl"
    assert group_backend([["n1:0"], ["n1:0"]]) == "gloo"  # the whole service on one GPU (fractional num_gpus)
    assert group_backend([["n1:0", "n1:1"], ["n1:1"]]) == "gloo"  # a shared GPU among several
    assert group_backend([["n1:0"], []]) == "gloo"  # a CPU sampler
    assert group_backend([["n1:0"], ["n2:0"]]) == "nccl"  # GPU 0 of two nodes
