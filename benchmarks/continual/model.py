"""The pretrained model: a small MLP trained in the run on task 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import NUM_CLASSES, NUM_FEATURES, Split, Task


class MLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU; the Linear layers are fc1, fc2, head."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(NUM_FEATURES, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def task_loss(model: nn.Module, task: Task, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy over the task's classes only (logits (N, 10) restricted to them)."""
    return F.cross_entropy(model(x)[:, task.classes], y)


@torch.no_grad()
def accuracy(model: nn.Module, task: Task, split: Split) -> float:
    """Fraction of ``split`` whose argmax over the task's classes is the label."""
    return float((model(split.x)[:, task.classes].argmax(1) == split.y).float().mean())


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of one shuffled epoch (the last batch may be smaller)."""
    return torch.randperm(n, generator=generator).split(batch_size)


def pretrain(task: Task, seed: int, epochs: int, hidden: int = 128, lr: float = 1e-3,
             batch_size: int = 64) -> MLP:
    """An MLP trained with Adam on the task's train split (seeded init and batch order)."""
    torch.manual_seed(seed)
    model = MLP(hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in batches(len(task.train.y), batch_size, generator):
            loss = task_loss(model, task, task.train.x[index], task.train.y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()
