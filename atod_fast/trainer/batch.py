"""The step batch: one step's trajectories laid out once for every part that reads them.

A :class:`StepBatch` holds the trajectories packed end to end (``Packed``, on the training
device) and the *agent rows*: the packed positions whose hidden state predicts an agent token
(row i predicts token i + 1 of the same trajectory; a trajectory's last token predicts nothing).
Every per-token tensor the step computes (old log-probs, teacher scores, advantages, λ) has
one entry per agent row, in trajectory order; ``counts[b]`` of them belong to trajectory b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import Packed, last_hidden_states, pack
from .rollout import Trajectory


@dataclass(frozen=True)
class StepBatch:
    trajs: list[Trajectory]
    packed: Packed
    """The trajectories' tokens end to end; ids and positions on the device, offsets on the CPU."""
    action_mask: torch.Tensor
    """``[T]`` bool (CPU): the tokens the agent produced."""
    turn_idx: torch.Tensor
    """``[T]`` int64 (CPU): the turn of every token."""
    agent_rows: torch.Tensor
    """``[A]`` int64 (device): packed positions that predict an agent token."""
    counts: list[int]
    """Agent rows per trajectory."""

    @classmethod
    def build(cls, trajs: list[Trajectory], device: torch.device) -> StepBatch:
        packed = pack([torch.tensor(t.tokens, dtype=torch.long) for t in trajs])
        packed = Packed(packed.input_ids.to(device), packed.position_ids.to(device), packed.cu_seqlens,
                        packed.lengths)
        act = torch.tensor([a for t in trajs for a in t.action_mask], dtype=torch.bool)
        nxt = torch.zeros_like(act)
        nxt[:-1] = act[1:]
        nxt[packed.cu_seqlens[1:] - 1] = False
        turn = torch.tensor([k for t in trajs for k in t.turn_idx], dtype=torch.long)
        return cls(trajs, packed, act, turn, nxt.nonzero().squeeze(1).to(device),
                   [sum(t.action_mask[1:]) for t in trajs])

    def select(self, idx: list[int]) -> StepBatch:
        """The batch of trajectories ``idx`` (in that order)."""
        return StepBatch.build([self.trajs[i] for i in idx], self.packed.input_ids.device)

    @property
    def device(self) -> torch.device:
        return self.packed.input_ids.device

    @property
    def targets(self) -> torch.Tensor:
        """``[A]`` the agent tokens the rows predict."""
        return self.packed.input_ids[self.agent_rows + 1]

    @property
    def agent_turns(self) -> torch.Tensor:
        """``[A]`` (device) the turn index of the agent token each row predicts."""
        return self.turn_idx.to(self.device)[self.agent_rows + 1]

    def agent_slices(self, idx: list[int]) -> torch.Tensor:
        """Indices (device) of the agent rows of trajectories ``idx``: rows of per-token tensors to take."""
        offsets = [0]
        for c in self.counts:
            offsets.append(offsets[-1] + c)
        return torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx]).to(self.device)

    def trajectory_of_rows(self) -> torch.Tensor:
        """``[A]`` (device) the trajectory each agent row belongs to (to broadcast per-episode quantities)."""
        return torch.repeat_interleave(torch.arange(len(self.trajs)), torch.tensor(self.counts)).to(self.device)

    def hidden(self, lm, *, packing: str) -> torch.Tensor:
        """``[T, H]`` last hidden states of ``lm`` over the packed tokens (bf16 autocast on CUDA)."""
        from .models import decoder_of

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return last_hidden_states(decoder_of(lm), self.packed, mode=packing)
