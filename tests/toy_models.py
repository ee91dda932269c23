"""Small random Llama folders with non-trivial distributions, for tests that compare against HF forwards."""

from pathlib import Path

import torch
import transformers


def build_llama_dir(
    path: Path,
    vocab: int,
    seed: int,
    eos: int = 2,
    hidden: int = 64,
    layers: int = 2,
    head_std: float = 0.25,
    tied: bool = False,
) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # logits with std ~2 rather than ~0.2, so distributions are far from uniform
        model.lm_head.weight.normal_(0.0, head_std)
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path))
    return model.eval()


@torch.no_grad()
def next_token_probs(model, prefix: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([prefix])).logits[0, -1].double().softmax(-1)


def random_rollout_batch(vocab: int, eos: int, seed: int = 0):
    """Four packed rollouts of uneven lengths, random teacher log-probs and a pre-training batch."""
    from common.rollout import pack_sequences

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (3, 5, 4, 6)]
    responses = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (4, 2, 6, 3)]
    old = [(-torch.rand(len(r), generator=g) * 3 - 0.5).tolist() for r in responses]
    packed = pack_sequences(prompts, responses, eos, old)
    teacher = torch.log_softmax(torch.randn(4, packed.tokens.shape[1], vocab, generator=g) * 2, -1)
    pt = torch.randint(3, vocab, (4, 8), generator=g)
    return packed, teacher, pt


def to_shards(packed, teacher: torch.Tensor, parts: int = 1, top_k: int | None = None):
    """What a teacher actor sends the learner ranks, from dense teacher log-probs [B, T, V] at response positions."""
    from common.logprobs import topk_logprobs
    from common.rollout import ScoredShard, shard_rows, slice_packed

    real = packed.mask > 0
    token_lp = torch.where(real, teacher.gather(-1, packed.tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    shards = []
    for sl in shard_rows(packed.tokens.shape[0], parts):
        flat = teacher[sl][real[sl]]
        shards.append(
            ScoredShard(slice_packed(packed, sl), token_lp[sl], flat if top_k is None else topk_logprobs(flat, top_k))
        )
    return shards
