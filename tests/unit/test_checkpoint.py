"""The pure parts of checkpoints and resume: restorable iterator positions, per-batch seeds, completeness checks,
pruning, the pipeline's drain points, atomic folder replacement. (Whole runs killed and resumed:
tests/integration/test_resume.py.)"""

from pathlib import Path

import pytest
import torch

from common.data import TokenizedExample, iterate_batches, iterate_pretrain
from common.resumable import EVAL, TRAIN_BATCH, Counted, sampling_seed
from common.storage import recover_dir, replace_dir
from learner.checkpoint import (
    CheckpointError,
    StateCheckpointer,
    check_complete,
    find_resume,
    latest_complete,
    truncate_metrics,
)
from tests.fake_checkpoints import fake_checkpoint


def _items(n):
    return [TokenizedExample([i], [i + 1], i) for i in range(n)]


def test_counted_iterators_fast_forward_to_the_same_position():
    items = _items(10)
    for make in (
        lambda: iterate_batches(items, 3, seed=5),
        lambda: iterate_pretrain(torch.arange(40).view(10, 4), 3, 5),
    ):
        it = Counted(make())
        first = [next(it) for _ in range(7)]  # crosses epochs: 3 batches per epoch
        assert it.drawn == 7
        again = Counted(make(), drawn=4)
        for want in first[4:]:
            got = next(again)
            assert (got == want).all() if isinstance(got, torch.Tensor) else got == want
        assert again.drawn == 7


def test_counted_passes_exhaustion_through_uncounted():
    it = Counted(iter(()))
    assert next(it, None) is None and it.drawn == 0


def test_sampling_seeds_depend_on_seed_purpose_and_index_only():
    assert sampling_seed(0, TRAIN_BATCH, 3) == sampling_seed(0, TRAIN_BATCH, 3)
    seeds = {sampling_seed(s, p, i) for s in (0, 1) for p in (TRAIN_BATCH, EVAL) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """`root` is the run's checkpoints/state folder."""
    return Path(fake_checkpoint(str(root.parent.parent), step, complete))


def test_completeness_sizes_and_metadata(tmp_path, capsys):
    root = tmp_path / "checkpoints" / "state"
    _fake_checkpoint(root, 2)
    newest = _fake_checkpoint(root, 4)
    _fake_checkpoint(root, 6, complete=False)  # died mid-save: no metadata
    assert latest_complete(root) == str(newest)
    assert "step-0000006" in capsys.readouterr().out
    with (newest / "__0_0.distcp").open("r+b") as fh:
        fh.truncate(50)
    assert check_complete(newest) == "__0_0.distcp has 50 bytes, 100 recorded"
    (root / "step-0000002" / "rank-0.pt").unlink()
    assert check_complete(root / "step-0000002") == "rank-0.pt missing"
    assert latest_complete(root) is None
    assert find_resume("auto", tmp_path) is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_resume(str(newest), tmp_path)


def test_find_resume_reads_the_driver_state(tmp_path):
    root = tmp_path / "checkpoints" / "state"
    _fake_checkpoint(root, 3)
    point = find_resume("auto", tmp_path)
    assert point is not None and (point.phase, point.phase_step, point.prompt_batches) == ("minillm", 3, 3)
    assert find_resume(None, tmp_path) is None


def test_prune_keeps_the_newest_complete_and_newer_partials(tmp_path):
    root = tmp_path / "checkpoints" / "state"
    for step in (1, 2, 3, 4):
        _fake_checkpoint(root, step)
    _fake_checkpoint(root, 5, complete=False)
    StateCheckpointer(tmp_path, every_steps=1, keep=2).prune()
    assert sorted(p.name for p in root.iterdir()) == ["step-0000003", "step-0000004", "step-0000005"]


def test_saves_fall_on_multiples_and_the_phase_end():
    c = StateCheckpointer(Path("/nonexistent"), every_steps=4, keep=1)
    assert [s for s in range(1, 11) if c.due(s - 1, s, 10)] == [4, 8, 10]
    assert c.due(3, 5, 40) and not c.due(4, 7, 40)  # collections of 2 or 3 updates: crossing a multiple counts
    assert not StateCheckpointer(Path("/nonexistent"), every_steps=0, keep=1).due(3, 4, 4)


def test_launch_limit_drains_the_pipeline_before_each_save():
    c = StateCheckpointer(Path("/nonexistent"), every_steps=4, keep=1)
    # one update per batch: at step 0, launch batches for updates 1..4 at most (save after 4)
    assert c.launch_limit(step=0, steps=10, updates_per=1, batches_per=1, consumed=0) == 4
    assert c.launch_limit(step=3, steps=10, updates_per=1, batches_per=1, consumed=3) == 4
    assert c.launch_limit(step=8, steps=10, updates_per=1, batches_per=1, consumed=8) == 10  # the phase's end
    # collections of 2 batches, 4 updates each: the save follows the first collection
    assert c.launch_limit(step=0, steps=16, updates_per=4, batches_per=2, consumed=0) == 2
    assert StateCheckpointer(Path("/x"), every_steps=0, keep=1).launch_limit(0, 10, 1, 1, 0) > 10**9


def test_replace_dir_and_recover(tmp_path):
    dst, tmp = tmp_path / "best", tmp_path / "best.tmp"
    dst.mkdir()
    (dst / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    replace_dir(tmp, dst)
    assert (dst / "a").read_text() == "new" and not tmp.exists() and not (tmp_path / "best.old").exists()
    dst.rename(tmp_path / "best.old")  # a crash between the two renames
    recover_dir(dst)
    assert (dst / "a").read_text() == "new"


def test_truncate_metrics(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\n')
    truncate_metrics(tmp_path, len('{"step": 1}\n'))
    assert f.read_text() == '{"step": 1}\n'
