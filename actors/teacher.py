"""Teacher scorer: the teacher in plain torch, returning log-probs of every response position over the
vocabulary (dense), or the top-k with the remaining mass (sparse)."""

from __future__ import annotations

import time

import torch

from common.data import LMBatch
from common.models import load_model
from common.rollout import Rollouts, TeacherScores, gather_positions, pack_rollouts


class Teacher:
    def __init__(
        self,
        teacher_dir: str,
        vocab_size: int,
        pad_id: int,
        batch_size: int = 16,
        top_k: int | None = None,
        dtype: str = "float32",
    ):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(teacher_dir, dtype).to(self.device).eval()
        self.vocab_size, self.pad_id = vocab_size, pad_id
        self.batch_size, self.top_k = batch_size, top_k
        self.stats = {"scored_tokens": 0, "score_seconds": 0.0}

    def _logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
        # padded embedding rows beyond the tokenizer are not tokens: slice before normalising
        return torch.log_softmax(logits[..., : self.vocab_size].float(), dim=-1)

    @torch.no_grad()
    def score(self, rollouts: Rollouts) -> TeacherScores:
        t0 = time.perf_counter()
        packed = pack_rollouts(rollouts, self.pad_id)
        chunks = []
        for start in range(0, len(rollouts), self.batch_size):
            sl = slice(start, start + self.batch_size)
            logp = self._logprobs(packed.input_ids[sl], packed.attention_mask[sl])
            chunks.append(gather_positions(logp, packed.predict_pos[sl].to(self.device)).cpu())
        dense = torch.cat(chunks)
        token_lp = dense.gather(-1, packed.tokens.unsqueeze(-1)).squeeze(-1) * packed.mask
        self.stats["scored_tokens"] += int(packed.mask.sum().item())
        elapsed = time.perf_counter() - t0
        self.stats["score_seconds"] += elapsed
        if self.top_k is None:
            return TeacherScores(token_lp, packed.mask, logprobs=dense, seconds=elapsed)
        vals, ids = dense.topk(self.top_k, dim=-1)
        rest = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-6))
        return TeacherScores(
            token_lp, packed.mask, topk_ids=ids, topk_logprobs=vals, rest_logprob=rest, seconds=elapsed
        )

    @torch.no_grad()
    def score_lm_batch(self, batch: LMBatch) -> torch.Tensor:
        """Dense [B, L-1, V] log-probs at every next-token position of a ground-truth batch (for word KD)."""
        return self._logprobs(batch.input_ids, batch.attention_mask)[:, :-1].cpu()

    def get_stats(self) -> dict[str, float]:
        return dict(self.stats)
