"""MoQAE's chunk router (Mixed-precision Quantization via mixture of quantization-Aware Experts, ACL 2025).

Per decoder layer, a gated MLP reads the hidden states of a chunk of N tokens, C ∈ R^{N×D} (the
states entering the block, after its input norm), and gives each token a distribution over the
experts (bit-width configurations):

    P = softmax( (SiLU(C·W1) ⊙ (C·W2)) · W3 ),   W1, W2 ∈ R^{D×h}, W3 ∈ R^{h×E}

Each token votes for its argmax expert; the chunk takes the majority (``chunk_votes``), ties going
to the higher bit-width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChunkRouter(nn.Module):
    """Gated-MLP router of one layer: hidden [.., D] -> expert probabilities [.., E]."""

    def __init__(self, hidden_size: int, n_experts: int, width: int | None = None):
        super().__init__()
        width = width or n_experts
        self.w1 = nn.Linear(hidden_size, width, bias=False)
        self.w2 = nn.Linear(hidden_size, width, bias=False)
        self.w3 = nn.Linear(width, n_experts, bias=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.w1.weight.dtype)
        return self.w3(F.silu(self.w1(x)) * self.w2(x))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(hidden).float(), dim=-1)


def chunk_votes(token_choice: torch.Tensor, expert_bits: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Majority vote of per-token expert choices within each chunk; ties go to the higher bit-width.

    ``token_choice``: [..., N] expert indices  ->  [...] chosen expert index per chunk.
    """
    n_experts = len(expert_bits)
    counts = F.one_hot(token_choice.long(), n_experts).sum(dim=-2)  # [..., E]
    # break ties by bit-width: score = count * (E + 1) + rank of the expert's bits (higher bits win)
    order = torch.tensor(expert_bits).argsort().argsort().to(counts.device)  # rank 0 = fewest bits
    score = counts * (n_experts + 1) + order
    return score.argmax(dim=-1)


class RouterBank(nn.Module):
    """One router per routed layer (with routing sharing, only each group's first layer has one)."""

    def __init__(self, n_layers: int, hidden_size: int, n_experts: int, width: int | None, share_group: int):
        super().__init__()
        self.share_group = max(1, share_group)
        self.routed_layers = list(range(0, n_layers, self.share_group))
        self.routers = nn.ModuleList(ChunkRouter(hidden_size, n_experts, width) for _ in self.routed_layers)

    def leader(self, layer_idx: int) -> int:
        """The layer whose routing decision ``layer_idx`` uses."""
        return layer_idx - layer_idx % self.share_group

    def router(self, layer_idx: int) -> ChunkRouter:
        return self.routers[self.leader(layer_idx) // self.share_group]

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
