"""The paper's triplet ranking loss (eq. 3, as in the reference code with ``inverse=False``).

For a batch of N knee-visit pairs, S[a, b] = f(x_a) . g(y_b) (cosine similarity of the
L2-normalised radiograph embedding a and thickness embedding b). The loss is

    L = sum_a sum_{b != a} max(0, m + S[a, b] - S[a, a]),   m = 0.1

in one direction only: each radiograph is the query and every other map of the batch a negative
key. (The reference code also sums the diagonal, where every term equals m; that constant has
no gradient, so excluding it, as DESIGN.md states, changes the reported value, not training.)
"""

from __future__ import annotations

import torch

MARGIN = 0.1


def similarity_matrix(radiograph_emb: torch.Tensor, thickness_emb: torch.Tensor) -> torch.Tensor:
    """``[N, 512] x [N, 512] -> [N, N]``, S[a, b] = f(x_a) . g(y_b)."""
    return radiograph_emb @ thickness_emb.t()


def triplet_loss_from_similarity(similarity: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    positive = similarity.diagonal().unsqueeze(1)  # S[a, a] per row
    cost = (margin + similarity - positive).clamp(min=0)
    off_diagonal = ~torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    return (cost * off_diagonal).sum()


def triplet_loss(
    radiograph_emb: torch.Tensor, thickness_emb: torch.Tensor, margin: float = MARGIN
) -> torch.Tensor:
    """Sum over the batch (not the mean), as in the paper and the reference code."""
    return triplet_loss_from_similarity(similarity_matrix(radiograph_emb, thickness_emb), margin)
