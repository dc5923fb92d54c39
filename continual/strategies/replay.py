"""Replay strategies: a bounded memory of past samples, rehearsed while the new ones train.

The memory is a ``ReplayBuffer`` (per-sample reservoir sampling along the stream,
``buffer_size`` samples); each training batch first draws a memory batch of the same
size, then offers its own samples to the memory. Memory targets are head targets, with
the sample's task id, so Task-IL replay reads each sample's own head.

- ``er``: the current and the memory batch trained as one batch, one mean cross-entropy
  (Chaudhry et al. 2019, "On tiny episodic memories", Algorithm 1); one forward pass.
- ``agem``: the memory loss is A-GEM's reference gradient; the ``AGEM`` weighting
  projects the current gradient instead of adding (Chaudhry et al., ICLR 2019).
- ``gem``: one memory loss per past experience (its samples in the memory); the ``GEM``
  weighting projects onto every constraint at once (Lopez-Paz & Ranzato, NeurIPS 2017).
- ``der`` / ``derpp``: the memory keeps the logits the model gave each sample when it
  was seen; alpha * MSE between today's and the stored logits, plus (DER++) beta *
  cross-entropy on a second memory batch (Buzzega et al., NeurIPS 2020, eq. 4 and 6).

Under several processes each process keeps its own memory of the samples it saw.
"""

from __future__ import annotations

import torch

from mtl.errors import ConfigError

from ..buffer import ReplayBuffer
from ..projection import AGEMWeighting
from ..projection import GEMWeighting
from .base import CURRENT, Strategy, named_trainable


def _logits_of(learner, model, inputs, task_ids):
    return learner.logits(model, learner.encode(model, inputs, task_ids), task_ids)


class Replay(Strategy):
    """Base class: a reservoir memory filled along the stream; ``memory_losses`` says what it is used for."""

    extra_loss_names = ("memory",)
    store_logits = False

    def __init__(self, buffer_size: int = 200, seed: int = 0):
        super().__init__()
        self.buffer = ReplayBuffer(buffer_size, seed=seed)

    def extra_losses(self, learner, model, batch, z, logits):
        x, y, task_ids = batch
        losses = self.memory_losses(learner, model, len(x), z)
        self.buffer.add(x, y, task_ids, logits if self.store_logits else None)  # the buffer detaches and moves them
        return losses

    def memory_batch(self, size: int, device):
        """A batch drawn from the memory, on ``device``; None while the memory is empty."""
        if len(self.buffer) == 0:
            return None
        mem = self.buffer.sample(size)
        if mem.inputs.device == torch.device(device):
            return mem
        return mem._replace(**{k: getattr(mem, k).to(device) for k in ("inputs", "labels", "task_ids", "logits",
                                                                         "logits_mask") if getattr(mem, k) is not None})

    def memory_losses(self, learner, model, size: int, z) -> dict[str, torch.Tensor]:
        mem = self.memory_batch(size, z.device)
        if mem is None:
            return {"memory": z.new_zeros(())}
        return {"memory": learner.loss(_logits_of(learner, model, mem.inputs, mem.task_ids), mem.labels)}

    def get_extra_state(self):
        return {"buffer": self.buffer.state_dict()}

    def set_extra_state(self, state) -> None:
        self.buffer.load_state_dict(state["buffer"])


class ER(Replay):
    """Each step trains on the current batch and a memory batch of the same size as one batch: the mean
    cross-entropy over B u B_M, both forwarded in one pass (Chaudhry et al. 2019, Algorithm 1: the SGD
    step on B_n u B_M). To balance the current and the replayed loss with a weighting instead, see
    ``agem``, ``gem`` or ``Replay``, whose memory loss stays a loss of its own."""

    name = "er"
    extra_loss_names = ()

    def joint_batch(self, learner, batch):
        mem = self.memory_batch(len(batch[0]), batch[0].device)
        return None if mem is None else (mem.inputs, mem.labels, mem.task_ids)

    def memory_losses(self, learner, model, size, z):
        return {}  # the memory rows are part of the current batch


class AGEM(Replay):
    name = "agem"

    def weighting(self, learner, loss_names):
        return AGEMWeighting([CURRENT, "memory"], parameters=lambda: list(named_trainable(learner.model).values()))


class GEM(Replay):
    """The memory loss is a vector: one cross-entropy per past experience held in the memory."""

    name = "gem"

    def __init__(self, buffer_size: int = 200, seed: int = 0, margin: float = 0.0):
        super().__init__(buffer_size, seed)
        self.margin = margin

    def weighting(self, learner, loss_names):
        return GEMWeighting([CURRENT, "memory"], parameters=lambda: list(named_trainable(learner.model).values()), margin=self.margin)

    def before_experience(self, learner, experience) -> None:
        self.current_task = experience.task_id

    def memory_losses(self, learner, model, size, z):
        """One forward pass over the memory samples of every past experience, one mean loss each (the
        GEM paper's constraints use each task's whole episodic memory)."""
        if len(self.buffer) == 0:
            return {"memory": z.new_zeros(0)}
        mem = self.buffer.contents()
        past = [t for t in torch.unique(mem.task_ids).tolist() if t != self.current_task]
        if not past:
            return {"memory": z.new_zeros(0)}
        rows = torch.cat([(mem.task_ids == t).nonzero().flatten() for t in past])  # all of each task's memory
        task_ids = mem.task_ids[rows].to(z.device)
        logits = _logits_of(learner, model, mem.inputs[rows].to(z.device), task_ids)
        per_sample = learner.loss(logits, mem.labels[rows].to(z.device), reduction="none")
        return {"memory": torch.stack([per_sample[task_ids == t].mean() for t in past])}


class DER(Replay):
    """Dark Experience Replay: match the logits stored with each memory sample (alpha); DER++ adds beta * CE."""

    name = "der"
    store_logits = True
    extra_loss_names = ("logits",)

    def __init__(self, buffer_size: int = 200, seed: int = 0, alpha: float = 0.3, beta: float = 0.0):
        super().__init__(buffer_size, seed)
        if alpha < 0 or beta < 0:
            raise ConfigError(f"DER's alpha and beta must be >= 0, got alpha={alpha}, beta={beta}.")
        self.alpha, self.beta = alpha, beta

    def loss_weights(self):
        return {"logits": self.alpha, "labels": self.beta}

    def configure(self, learner) -> None:
        """Class-IL: give the head every class of the stream from the start.

        The stored logits must include the outputs of classes not seen yet: matching those
        (low) values is what keeps a new class from taking over an old sample's prediction.
        With a head that grows, the stored logits would cover the old outputs only. (The
        paper's experiments use a single head over all the stream's classes.)
        """
        if learner.setting == "class":
            head = getattr(learner.model, "module", learner.model).heads[learner.stream.head_name(0)]
            head.grow(learner.stream.num_classes)

    def memory_losses(self, learner, model, size, z):
        names = self.extra_loss_names
        mem = self.memory_batch(size, z.device)
        if mem is None:
            return {name: z.new_zeros(()) for name in names}
        now = _logits_of(learner, model, mem.inputs, mem.task_ids).float()
        width = min(now.shape[1], mem.logits.shape[1])
        mask = mem.logits_mask[:, :width].float()
        squared = (now[:, :width] - mem.logits[:, :width]) ** 2 * mask
        losses = {"logits": squared.sum() / mask.sum().clamp_min(1.0)}
        if "labels" in names:
            again = self.memory_batch(size, z.device)
            losses["labels"] = learner.loss(_logits_of(learner, model, again.inputs, again.task_ids), again.labels)
        return losses


class DERPlusPlus(DER):
    name = "derpp"
    extra_loss_names = ("logits", "labels")

    def __init__(self, buffer_size: int = 200, seed: int = 0, alpha: float = 0.1, beta: float = 0.5):
        super().__init__(buffer_size, seed, alpha, beta)
