"""A training loop with a planted leak (docs/doctor.md): every step's output is kept with its graph."""

import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
history = []
for step in range(8):
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    history.append(logits)  # meant for a metric later: keeps the logits and their graph
