"""Task heads that sit on a vector representation."""

from __future__ import annotations

from torch import nn


class ClassificationHead(nn.Module):
    """Logits over ``num_classes``: optional hidden layer (ReLU + dropout), then a linear layer.

    With ``hidden=50, dropout=0.5`` on a 50-d input this is one task branch of
    Sener & Koltun's MultiLeNet.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            in_features = hidden
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class MultiLabelHead(ClassificationHead):
    """One logit per binary label (e.g. CelebA's 40 attributes); train with a binary task."""

    def __init__(self, in_features: int, num_labels: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__(in_features, num_labels, hidden=hidden, dropout=dropout)
        self.num_labels = num_labels
