"""The streaming top-k of proponents and opponents per test image: O(n_test * k) memory whatever the training set."""
from __future__ import annotations

import torch


class TopKInfluenceTracker:
    """Streaming per-test-row top-k of proponents (largest) and opponents (smallest) scores.

    Memory is O(n_test * k) whatever the number of training examples. Blocks of scores
    arrive with the global training indices of their columns; each update is one concat
    + topk on tensors. Trackers over disjoint training shards `merge` into exactly the
    tracker of the union.
    """

    def __init__(self, n_test: int, k: int, device="cpu", dtype=torch.float32):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.n_test, self.k = n_test, k
        self.prop_values = torch.full((n_test, k), -float("inf"), device=device, dtype=dtype)
        self.prop_indices = torch.full((n_test, k), -1, device=device, dtype=torch.long)
        # opponents kept as the top-k of the negated scores
        self.opp_values = torch.full((n_test, k), -float("inf"), device=device, dtype=dtype)
        self.opp_indices = torch.full((n_test, k), -1, device=device, dtype=torch.long)

    @staticmethod
    def _merge(values, indices, new_values, new_indices, k):
        v = torch.cat([values, new_values], dim=1)
        i = torch.cat([indices, new_indices], dim=1)
        top_v, pos = torch.topk(v, k, dim=1)
        return top_v, torch.gather(i, 1, pos)

    def update(self, scores: torch.Tensor, train_indices: torch.Tensor, rows: slice | None = None) -> None:
        """scores: (n_rows, n_block); train_indices: (n_block,) global indices of the columns."""
        rows = rows if rows is not None else slice(0, self.n_test)
        scores = scores.to(self.prop_values.dtype)
        idx = train_indices.to(self.prop_indices.device).view(1, -1).expand(scores.shape[0], -1)
        kk = min(self.k, scores.shape[1])
        # pre-select the block's own top-k before merging: cheap and keeps the concat small
        bv, bp = torch.topk(scores, kk, dim=1)
        self.prop_values[rows], self.prop_indices[rows] = self._merge(
            self.prop_values[rows], self.prop_indices[rows], bv, torch.gather(idx, 1, bp), self.k)
        bv, bp = torch.topk(-scores, kk, dim=1)
        self.opp_values[rows], self.opp_indices[rows] = self._merge(
            self.opp_values[rows], self.opp_indices[rows], bv, torch.gather(idx, 1, bp), self.k)

    def merge(self, other: "TopKInfluenceTracker") -> "TopKInfluenceTracker":
        """In place: the tracker of the union of both trackers' training examples."""
        if (other.n_test, other.k) != (self.n_test, self.k):
            raise ValueError("trackers cover different test sets or k")
        self.prop_values, self.prop_indices = self._merge(self.prop_values, self.prop_indices,
                                                          other.prop_values.to(self.prop_values), other.prop_indices.to(self.prop_indices), self.k)
        self.opp_values, self.opp_indices = self._merge(self.opp_values, self.opp_indices,
                                                        other.opp_values.to(self.opp_values), other.opp_indices.to(self.opp_indices), self.k)
        return self

    def proponents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values descending, indices), each (n_test, k)."""
        return self.prop_values, self.prop_indices

    def opponents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values ascending: most negative first, indices), each (n_test, k)."""
        return -self.opp_values, self.opp_indices

    def state(self) -> dict:
        return {"prop_values": self.prop_values.cpu(), "prop_indices": self.prop_indices.cpu(),
                "opp_values": self.opp_values.cpu(), "opp_indices": self.opp_indices.cpu()}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> "TopKInfluenceTracker":
        n_test, k = state["prop_values"].shape
        t = cls(n_test, k, device=device, dtype=state["prop_values"].dtype)
        for name in ("prop_values", "prop_indices", "opp_values", "opp_indices"):
            setattr(t, name, torch.as_tensor(state[name]).to(device))
        return t
