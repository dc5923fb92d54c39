"""Class-incremental strategies built around an exemplar memory: iCaRL and LUCIR.

Both keep ``memory_size`` exemplars in total, ``m = memory_size // classes seen`` per class,
chosen by herding on L2-normalised features at the end of every experience and trimmed
for old classes by keeping each class's first ``m`` (iCaRL, Rebuffi et al., CVPR 2017,
Algorithms 2, 4 and 5). The exemplars are trained on together with the new data. The
memory is computed from an experience's whole training set, so every process of a
distributed run holds the same one.

- ``icarl``: iCaRL (Rebuffi et al., CVPR 2017). Training (Algorithm 3) minimises binary
  cross-entropy over the sigmoid outputs of every class seen: one-hot targets for the
  new classes, the old model's sigmoid outputs for the old ones. This REPLACES the
  softmax cross-entropy, which the objective always computes as ``"current"``: the
  strategy returns iCaRL's loss as ``"bce"`` and its weighting gives ``"current"`` weight
  0 (still logged, never trained on). Evaluation classifies by the nearest mean of
  exemplars (Algorithm 1) through ``scores``.
- ``lucir``: LUCIR (Hou et al., CVPR 2019). The Class-IL head becomes a cosine classifier
  ``eta * cos(theta_i, f(x))`` (cosine normalisation, Sec. 3.2, eq. 4) trained with the
  usual ``"current"`` cross-entropy, which is LUCIR's L_ce; ``"less_forget"`` is
  1 - cos(f*(x), f(x)) between the old and new model's features (less-forget constraint,
  Sec. 3.3, eq. 6), weighted by lambda = lambda_base sqrt(|C_old| / |C_new|) (eq. 7)
  through ``loss_weights``; ``"margin"`` is the margin ranking loss of the batch's
  exemplars against their top-K new classes (inter-class separation, Sec. 3.4, eq. 8),
  weight 1. Test: the cosine classifier's outputs (the paper's "CNN" classifier).
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from mtl.errors import CheckpointError, ConfigError
from mtl.weighting import build_weighting

from ..buffer import herding_selection
from ..learner import ExperienceData
from .base import CURRENT, Strategy

HEAD = "classifier"  # the one Class-IL head (Stream.head_name)


# ----- features and the exemplar memory ----------------------------------------------------------


def normalised_features(learner, model, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """phi(x): the encoder's representation, flattened and scaled to unit L2 norm (iCaRL Sec. 2.1)."""
    return F.normalize(learner.encode(model, x, task_ids).flatten(1).float(), dim=1)


@torch.no_grad()
def features_of(learner, model, data, batch_size: int = 256) -> torch.Tensor:
    """Normalised features of every sample of ``data`` (``ExperienceData`` or ``ExemplarData``), in eval
    mode, on the CPU."""
    net = getattr(model, "module", model)
    was_training, device = net.training, next(net.parameters()).device
    net.eval()
    out = []
    for start in range(0, len(data), batch_size):
        x, _, t = data.batch(range(start, min(start + batch_size, len(data))))
        out.append(normalised_features(learner, net, x.to(device), t.to(device)).cpu())
    net.train(was_training)
    return torch.cat(out)


class ExemplarData(Dataset):
    """Exemplars as ``(image, head target, task id)`` items, like ``ExperienceData``."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor):
        self.inputs, self.targets, self.task_ids = inputs, labels, task_ids

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i], int(self.task_ids[i])

    def batch(self, indices):
        indices = torch.as_tensor(list(indices), dtype=torch.long)
        return self.inputs[indices], self.targets[indices], self.task_ids[indices]


class ExemplarMemory:
    """The exemplar sets P_y of every class seen, as three tensors (inputs, head labels, task ids).

    Rows are grouped by head label, ascending; inside a class they keep herding's order, so
    a class's first m rows are its m best exemplars and reducing the set (Algorithm 5) keeps them.
    """

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ConfigError(f"memory_size must be a whole number of exemplars > 0, got {size!r}; "
                              "give e.g. memory_size=2000 (iCaRL's K on CIFAR-100).")
        self.size = int(size)
        self.inputs: torch.Tensor | None = None
        self.labels = torch.zeros(0, dtype=torch.long)
        self.task_ids = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def per_class(self, classes: int) -> int:
        """m = K / t (Algorithm 2), rounded down so the memory never exceeds K."""
        return self.size // classes

    def class_counts(self) -> dict[int, int]:
        values, counts = torch.unique(self.labels, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))

    def reduce(self, m: int) -> None:
        """Algorithm 5: keep the first ``m`` exemplars of every class."""
        if not len(self):
            return
        first = torch.ones_like(self.labels, dtype=torch.bool)
        first[1:] = self.labels[1:] != self.labels[:-1]
        starts = torch.nonzero(first).flatten()
        # rank of each row inside its class: its position minus the position of its class's first row
        rank = torch.arange(len(self)) - starts[torch.cumsum(first.long(), 0) - 1]
        self._keep(rank < m)

    def add(self, inputs: torch.Tensor, label: int, task_id: int) -> None:
        """Append the exemplars of one new class (in herding order)."""
        n = len(inputs)
        self.inputs = inputs.clone() if self.inputs is None else torch.cat([self.inputs, inputs])
        self.labels = torch.cat([self.labels, torch.full((n,), label, dtype=torch.long)])
        self.task_ids = torch.cat([self.task_ids, torch.full((n,), task_id, dtype=torch.long)])
        order = torch.sort(self.labels, stable=True).indices  # group by class, keeping herding order
        self._keep(order)

    def _keep(self, index: torch.Tensor) -> None:
        self.inputs, self.labels, self.task_ids = self.inputs[index], self.labels[index], self.task_ids[index]

    def data(self) -> ExemplarData:
        return ExemplarData(self.inputs, self.labels, self.task_ids)

    def update(self, learner, experience) -> None:
        """End of an experience (Algorithm 2): m = K / t, reduce the old sets, herd the new classes' sets."""
        m = self.per_class(len(learner.seen_classes))
        self.reduce(m)
        data = ExperienceData(experience, learner, "train")
        features = features_of(learner, learner.model, data)
        for label in torch.unique(data.targets).tolist():
            rows = torch.nonzero(data.targets == label).flatten()
            chosen = rows[herding_selection(features[rows], min(m, len(rows)))]  # Algorithm 4
            self.add(torch.stack([data.data[int(i)][0] for i in chosen]), label, experience.task_id)

    def class_means(self, learner, model) -> torch.Tensor:
        """mu_y (Algorithm 1): mean of the exemplars' normalised features, renormalised (Sec. 2.1); row y = label y."""
        features = features_of(learner, model, self.data())
        classes = int(self.labels.max()) + 1
        sums = torch.zeros(classes, features.shape[1]).index_add_(0, self.labels, features)
        return F.normalize(sums / torch.bincount(self.labels, minlength=classes).clamp_min(1).unsqueeze(1), dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        inputs = self.inputs if self.inputs is not None else torch.zeros(0)
        return {"inputs": inputs, "labels": self.labels, "task_ids": self.task_ids}

    def load_state_dict(self, state: dict) -> None:
        try:
            inputs, labels, task_ids = state["inputs"], state["labels"], state["task_ids"]
        except (KeyError, TypeError):
            raise CheckpointError("exemplar-memory state needs tensors 'inputs', 'labels' and 'task_ids'; "
                                  "the checkpoint is not from this strategy or is damaged.") from None
        if not all(isinstance(t, torch.Tensor) for t in (inputs, labels, task_ids)) or not (
                len(labels) == len(task_ids) and (len(labels) == 0 or len(inputs) == len(labels))):
            raise CheckpointError("exemplar-memory state holds tensors of mismatched lengths; the checkpoint "
                                  "is damaged.")
        if len(labels) > self.size:
            raise CheckpointError(f"the checkpoint's memory holds {len(labels)} exemplars, more than "
                                  f"memory_size={self.size}; resume with the memory_size of the run.")
        self.inputs = inputs.clone() if len(labels) else None
        self.labels, self.task_ids = labels.long().clone(), task_ids.long().clone()


class ExemplarStrategy(Strategy):
    """Class-IL with an exemplar memory mixed into the training data and a frozen copy of the old model."""

    settings = ("class",)

    def __init__(self, memory_size: int = 2000):
        super().__init__()
        self.memory = ExemplarMemory(memory_size)
        self.old_model: list[nn.Module] = []  # in a list: not a submodule (not saved, not trained)
        self.old_classes = 0

    def check(self, stream) -> None:
        super().check(stream)
        if self.memory.size < stream.num_classes:
            raise ConfigError(f"{self.name}'s memory_size={self.memory.size} leaves no exemplar for some of the "
                              f"{stream.num_classes} classes of stream '{stream.name}'; give memory_size >= "
                              f"{stream.num_classes} (one exemplar per class at least).")

    def before_experience(self, learner, experience) -> None:
        # prepare() has appended this experience's classes after the old ones
        self.old_classes = len(learner.seen_classes) - len(experience.classes)
        self.old_model = []
        if self.old_classes:
            old = copy.deepcopy(getattr(learner.model, "module", learner.model)).eval()
            self.old_model = [old.requires_grad_(False)]

    def old_features(self, learner, x, task_ids) -> torch.Tensor:
        with torch.no_grad():
            return learner.encode(self.old_model[0], x, task_ids)

    def train_data(self, learner, experience):
        """The new data plus every exemplar (iCaRL Algorithm 3, line 'D <- union of X and P')."""
        new = ExperienceData(experience, learner, "train")
        return ConcatDataset([new, self.memory.data()]) if len(self.memory) else new

    def after_experience(self, learner, experience) -> None:
        self.memory.update(learner, experience)

    def get_extra_state(self):
        return {"memory": self.memory.state_dict()}

    def set_extra_state(self, state) -> None:
        self.memory.load_state_dict(state["memory"])


# ----- iCaRL ------------------------------------------------------------------------------------


def icarl_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Algorithm 3's loss: -sum_y [t_y log g_y(x) + (1 - t_y) log(1 - g_y(x))], g = sigmoid(logits).

    Summed over the classes as in the paper, averaged over the batch (as the softmax
    cross-entropy it replaces is).
    """
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").sum(1).mean()


class ICaRL(ExemplarStrategy):
    """iCaRL: herded exemplars, sigmoid BCE with distilled old-class targets, nearest-mean-of-exemplars test.

    ``memory_size``: K, exemplars in total (2000 in the paper). The paper's class means also
    average the exemplars' horizontally flipped images; flips are not made here (digits and
    many other inputs are not flip-invariant). The head is the learner's Class-IL linear
    layer, whose bias the paper's g_y(x) = sigmoid(w_y . phi(x)) does not have.
    """

    name = "icarl"
    extra_loss_names = ("bce",)

    def __init__(self, memory_size: int = 2000):
        super().__init__(memory_size)
        self.means: torch.Tensor | None = None  # (classes seen, feature dim), row = head label

    def weighting(self, learner, loss_names):
        # iCaRL's BCE replaces the softmax cross-entropy: "current" is computed (and logged) but weighs 0
        return build_weighting("static", loss_names, weights={CURRENT: 0.0, "bce": 1.0})

    def extra_losses(self, learner, model, batch, z, logits):
        x, y, task_ids = batch
        targets = F.one_hot(y, logits.shape[1]).float()  # new classes: delta_{y = y_i}
        if self.old_classes:  # old classes: q_i^y = g_y(x_i) of the model before this experience
            old = self.old_model[0]
            with torch.no_grad():
                old_logits = learner.logits(old, self.old_features(learner, x, task_ids), task_ids)
            targets[:, : self.old_classes] = torch.sigmoid(old_logits[:, : self.old_classes].float())
        return {"bce": icarl_loss(logits, targets)}

    def after_experience(self, learner, experience) -> None:
        super().after_experience(learner, experience)
        self.means = self.memory.class_means(learner, learner.model)

    def scores(self, learner, model, x, task_ids):
        """Algorithm 1: -||phi(x) - mu_y|| for every class seen, in head order (None before the first means)."""
        if self.means is None or len(self.means) != len(learner.seen_classes):
            return None
        phi = normalised_features(learner, model, x, task_ids)
        return -torch.cdist(phi, self.means.to(phi.device))

    def get_extra_state(self):
        means = self.means if self.means is not None else torch.zeros(0)
        return {**super().get_extra_state(), "means": means}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        means = state["means"]
        if not isinstance(means, torch.Tensor):
            raise CheckpointError("iCaRL's state entry 'means' must be a tensor; the checkpoint is damaged.")
        self.means = means.clone() if means.numel() else None


# ----- LUCIR ------------------------------------------------------------------------------------


class CosineClassifier(nn.Module):
    """``eta * <theta_i / |theta_i|, f(x) / |f(x)|>`` for every class i (LUCIR Sec. 3.2, eq. 4 before the softmax).

    ``eta`` is learnt. Grows like ``IncrementalClassifier``: old rows and eta keep their values.
    """

    def __init__(self, in_features: int, num_classes: int = 0, eta: float = 1.0):
        super().__init__()
        self.in_features, self.num_classes = in_features, 0
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.eta = nn.Parameter(torch.tensor(float(eta)))
        self.grow(num_classes)

    def grow(self, num_classes: int) -> None:
        if num_classes <= self.num_classes:
            return
        old = self.weight
        weight = torch.empty(num_classes, self.in_features, device=old.device, dtype=old.dtype)
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(weight[self.num_classes:], -bound, bound)  # scale is irrelevant: rows are normalised
        weight[: self.num_classes] = old.detach()
        self.weight = nn.Parameter(weight)
        self.num_classes = num_classes

    def cosine(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z.flatten(1), dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.eta * self.cosine(z)


def less_forget_loss(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """LUCIR eq. 6, averaged over the batch: 1 - <f*(x) / |f*(x)|, f(x) / |f(x)|>."""
    new, old = F.normalize(features.flatten(1).float(), dim=1), F.normalize(old_features.flatten(1).float(), dim=1)
    return (1.0 - (new * old).sum(1)).mean()


def margin_ranking_loss(cosine: torch.Tensor, targets: torch.Tensor, old_classes: int, margin: float,
                        top_k: int) -> torch.Tensor:
    """LUCIR eq. 8: for every old-class sample x, sum over its top-K new classes k of
    max(0, m - <theta(x), f(x)> + <theta_k, f(x)>) on the (unscaled) cosines; mean over those samples.
    Zero when the batch has no old-class sample or there are no new classes."""
    old = targets < old_classes
    new_classes = cosine.shape[1] - old_classes
    if not old_classes or not new_classes or not bool(old.any()):
        return cosine.new_zeros(())
    cos = cosine[old].float()
    truth = cos.gather(1, targets[old].unsqueeze(1))  # <theta(x), f(x)>
    hardest = cos[:, old_classes:].topk(min(top_k, new_classes), dim=1).values  # the hard negatives
    return F.relu(margin - truth + hardest).sum(1).mean()


class LUCIR(ExemplarStrategy):
    """LUCIR: cosine classifier, less-forget constraint, margin ranking on exemplars, herded memory.

    Options (paper values as defaults): ``memory_size`` exemplars in total (the paper keeps 20
    per class; here the total is fixed as in iCaRL), ``lambda_base`` = 5, ``margin`` m = 0.5,
    ``top_k`` K = 2, ``eta`` the learnable scale's starting value. ``freeze_old``: the old
    class embeddings stay fixed while the features are held by the less-forget constraint
    (Sec. 3.3; the authors' code trains them at learning rate 0); here they are put back
    after every optimiser step, which is exact under any optimiser. ``imprint``: a new
    class's embedding starts as the normalised mean of its samples' normalised features
    (weight imprinting, Qi et al., CVPR 2018, as in the authors' released code).

    The margin loss sums over the K negatives as eq. 8 does (the authors' code averages over
    them: K times smaller). Not done here: the optional class-balanced finetuning, and
    removing the encoder's last ReLU (the paper's ResNets end without it, so features can be
    negative).
    """

    name = "lucir"
    extra_loss_names = ("less_forget", "margin")

    def __init__(self, memory_size: int = 2000, lambda_base: float = 5.0, margin: float = 0.5, top_k: int = 2,
                 eta: float = 1.0, freeze_old: bool = True, imprint: bool = True):
        super().__init__(memory_size)
        for option, value in (("lambda_base", lambda_base), ("margin", margin)):
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"LUCIR's {option} must be a finite number >= 0, got {value!r} "
                                  "(the paper uses lambda_base=5, margin=0.5).")
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ConfigError(f"LUCIR's top_k (hard negative classes per exemplar) must be an integer >= 1, "
                              f"got {top_k!r} (the paper uses 2).")
        if not (isinstance(eta, numbers.Real) and math.isfinite(eta) and eta > 0):
            raise ConfigError(f"LUCIR's eta (the cosine classifier's starting scale) must be > 0, got {eta!r}.")
        self.lambda_base, self.margin, self.top_k, self.eta = float(lambda_base), float(margin), int(top_k), float(eta)
        self.freeze_old, self.imprint = bool(freeze_old), bool(imprint)
        self.lambda_ = 0.0
        self.old_rows: torch.Tensor | None = None

    def configure(self, learner) -> None:
        """Replace the Class-IL head with a (growing) cosine classifier."""
        head = learner.model.heads[HEAD]
        if not isinstance(head, CosineClassifier):
            device = next(head.parameters()).device
            learner.model.heads[HEAD] = CosineClassifier(head.in_features, head.num_classes, self.eta).to(device)

    def before_experience(self, learner, experience) -> None:
        super().before_experience(learner, experience)
        new_classes = len(experience.classes)
        # eq. 7: the constraint weighs more as old classes outnumber new ones
        self.lambda_ = self.lambda_base * math.sqrt(self.old_classes / new_classes)
        head = getattr(learner.model, "module", learner.model).heads[HEAD]
        if self.old_classes and self.imprint:
            self._imprint(learner, experience, head)
        self.old_rows = head.weight[: self.old_classes].detach().clone() if self.old_classes else None

    @torch.no_grad()
    def _imprint(self, learner, experience, head: CosineClassifier) -> None:
        data = ExperienceData(experience, learner, "train")
        features = features_of(learner, learner.model, data)
        for label in torch.unique(data.targets).tolist():
            mean = features[data.targets == label].mean(0)
            head.weight[label] = F.normalize(mean, dim=0).to(head.weight)

    def loss_weights(self):
        return {"less_forget": self.lambda_, "margin": 1.0}

    def extra_losses(self, learner, model, batch, z, logits):
        if not self.old_classes:
            return {"less_forget": logits.new_zeros(()), "margin": logits.new_zeros(())}
        x, y, task_ids = batch
        head = getattr(model, "module", model).heads[HEAD]
        return {"less_forget": less_forget_loss(z, self.old_features(learner, x, task_ids)),
                "margin": margin_ranking_loss(head.cosine(z), y, self.old_classes, self.margin, self.top_k)}

    @torch.no_grad()
    def after_step(self, learner, model) -> None:
        # put the old class embeddings back: exact under any optimiser (momentum, weight decay, Adam)
        if self.freeze_old and self.old_rows is not None:
            head = getattr(model, "module", model).heads[HEAD]
            head.weight[: self.old_classes] = self.old_rows.to(head.weight)


__all__ = ["CosineClassifier", "ExemplarData", "ExemplarMemory", "ExemplarStrategy", "ICaRL", "LUCIR",
           "icarl_loss", "less_forget_loss", "margin_ranking_loss", "normalised_features"]
