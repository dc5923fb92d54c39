"""Bounded replay memory for rehearsal-based continual learning, and iCaRL's herding.

``ReplayBuffer`` keeps at most ``capacity`` SAMPLES (not batches) from the stream. Each
slot holds the input, its label, its task id and, optionally, the logits the model gave
it when it was seen (DER, Buzzega et al., NeurIPS 2020, replays those logits).

Two policies decide which samples stay:

- ``"reservoir"``: reservoir sampling per sample along the stream: the n-th sample offered
  (n > capacity) takes a uniformly chosen slot with probability capacity / n (Vitter's
  Algorithm R, ACM TOMS 1985). Every sample seen so far is then in memory with the same
  probability capacity / n, however the stream was cut into batches. (Doing this per
  batch, or keeping "the last ones", biases the memory towards recent tasks.) The draws
  follow Li's Algorithm L (ACM TOMS 1994), which has Algorithm R's law but draws the gap
  to the next sample that enters instead of one number per sample: a batch none of whose
  samples enters costs no random draw.
- ``"class_balanced"``: class-balanced reservoir sampling (CBRS, Chrysakis & Moens,
  ICML 2020): while the memory is full, a sample of a class that is not among the
  largest in memory replaces a random sample of a largest class (ties between largest
  classes broken at random); a sample of a largest class c replaces a random slot of its
  own class with probability (slots of c) / (samples of c seen so far), reservoir
  sampling within the class. Given enough samples of every class, the class counts end
  up within 1 of each other.

All random choices come from the buffer's own ``torch.Generator`` (seeded by ``seed``):
the global RNG is untouched, and ``state_dict()`` carries the generator's state, so a
resumed run makes exactly the choices an uninterrupted one would.

Logits: stored as float32, padded with zeros to the widest logits seen so far, with the
valid width of each slot kept beside them (``sample`` returns a boolean ``logits_mask``).
So in Class-IL a head that grows from task to task can store its wider logits later on;
the storage widens (one copy) the first time wider logits arrive. Either every ``add``
passes logits or none does.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from mtl.errors import CheckpointError, ConfigError, DataError

POLICIES = ("reservoir", "class_balanced")


class ReplayBatch(NamedTuple):
    """What ``ReplayBuffer.sample`` returns (on the buffer's device, ``indices`` on the CPU).

    ``indices`` are the slots drawn; ``logits`` and ``logits_mask`` are None without stored logits.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor
    logits: torch.Tensor | None
    logits_mask: torch.Tensor | None
    indices: torch.Tensor


class ReplayBuffer:
    """Replay memory of at most ``capacity`` samples; see the module docstring for the policies.

    Storage is preallocated at the first ``add`` (shapes and input dtype from that batch) on
    ``device`` (CPU by default). The bookkeeping behind the choices runs on the CPU.
    """

    def __init__(self, capacity: int, policy: str = "reservoir", seed: int = 0,
                 device: str | torch.device = "cpu"):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral):
            raise ConfigError(f"buffer size must be an integer number of samples, got {capacity!r}; "
                              "give --buffer-size as a whole number > 0.")
        if capacity <= 0:
            raise ConfigError(f"buffer size {capacity} cannot replay anything; give --buffer-size > 0 "
                              "(or use a strategy without replay).")
        if policy not in POLICIES:
            raise ConfigError(f"unknown buffer policy {policy!r}; choose one of {', '.join(POLICIES)}.")
        self.capacity = int(capacity)
        self.policy = policy
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._seen = 0
        # Algorithm L: the stream position of the next sample that enters the full memory, and
        # its W (the largest of the memory's random keys); -1 / 1.0 until the memory is full
        self._next_entry, self._w = -1, 1.0
        self._class_seen: dict[int, int] = {}  # class -> samples of it offered so far (CBRS)
        self._inputs: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._task_ids: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._logit_widths: torch.Tensor | None = None
        self._cpu_labels: torch.Tensor | None = None  # mirror of the labels for the CPU-side choices

    # ----- queries -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return min(self._seen, self.capacity)  # both policies store every sample until full

    @property
    def seen(self) -> int:
        """How many samples have been offered to ``add`` so far."""
        return self._seen

    @property
    def stores_logits(self) -> bool:
        return self._logits is not None

    def classes(self) -> list[int]:
        """The classes present in memory, sorted."""
        return sorted(self.class_counts())

    def class_counts(self) -> dict[int, int]:
        """Slots held by each class in memory."""
        if self._cpu_labels is None:
            return {}
        values, counts = torch.unique(self._cpu_labels[: len(self)], return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))

    # ----- adding ------------------------------------------------------------------------------

    def add(self, inputs: torch.Tensor, labels, task_ids, logits: torch.Tensor | None = None) -> None:
        """Offer a batch to the memory, sample by sample in stream order.

        ``labels``: integer class ids, one per sample. ``task_ids``: one int for the batch or
        one per sample. ``logits``: ``batch x width`` (any width; see the module docstring).
        """
        inputs, labels, task_ids, logits = self._check_batch(inputs, labels, task_ids, logits)
        b = len(labels)
        if b == 0:
            return
        if self._inputs is None:
            self._allocate(inputs, logits)
        if logits is not None and logits.shape[1] > self._logits.shape[1]:
            self._widen_logits(logits.shape[1])
        plan = self._plan_reservoir(b) if self.policy == "reservoir" else self._plan_balanced(labels)
        self._seen += b
        if not plan:
            return
        # One write per slot: when two samples of a batch pick the same slot, the later one won.
        slots = torch.tensor(list(plan.keys()), dtype=torch.int64)
        rows = torch.tensor(list(plan.values()), dtype=torch.int64)
        self._write(slots, rows, inputs, labels, task_ids, logits)

    def _plan_reservoir(self, b: int) -> dict[int, int]:
        """Reservoir sampling for the batch: slot -> row of the batch that ends up in it."""
        plan: dict[int, int] = {}
        fill = max(0, min(b, self.capacity - self._seen))
        for row in range(fill):
            plan[self._seen + row] = row
        if fill == b:
            return plan
        if self._next_entry < 0:  # the memory is full from this batch on
            u_w, u_gap = self._uniforms(2)
            self._w = _next_w(1.0, u_w, self.capacity)
            self._next_entry = self.capacity - 1 + _gap(self._w, u_gap)
        while self._next_entry < self._seen + b:
            u_slot, u_w, u_gap = self._uniforms(3)
            plan[min(int(u_slot * self.capacity), self.capacity - 1)] = self._next_entry - self._seen
            self._w = _next_w(self._w, u_w, self.capacity)
            self._next_entry += _gap(self._w, u_gap)
        return plan

    def _uniforms(self, n: int) -> list[float]:
        """``n`` uniform draws on (0, 1] from the buffer's generator."""
        return [1.0 - u for u in torch.rand(n, dtype=torch.float64, generator=self.generator).tolist()]

    def _plan_balanced(self, labels: torch.Tensor) -> dict[int, int]:
        """CBRS (Chrysakis & Moens 2020) for the batch: slot -> row of the batch."""
        plan: dict[int, int] = {}
        size = len(self)
        slot_labels = self._cpu_labels[:size].tolist()
        slots_of: dict[int, list[int]] = {}
        for slot, c in enumerate(slot_labels):
            slots_of.setdefault(c, []).append(slot)
        u = torch.rand(len(labels), 3, dtype=torch.float64, generator=self.generator).tolist()
        for row, c in enumerate(labels.tolist()):
            self._class_seen[c] = self._class_seen.get(c, 0) + 1
            if size < self.capacity:  # not full: store
                plan[size] = row
                slots_of.setdefault(c, []).append(size)
                size += 1
                continue
            counts = {k: len(v) for k, v in slots_of.items() if v}
            largest = max(counts.values())
            mine = counts.get(c, 0)
            if mine < largest:  # evict a random sample of a largest class
                biggest = sorted(k for k, n in counts.items() if n == largest)
                victim_class = biggest[_pick(u[row][1], len(biggest))]
                victims = slots_of[victim_class]
                i = _pick(u[row][2], len(victims))
                slot = victims[i]
                victims[i] = victims[-1]
                victims.pop()
                slots_of.setdefault(c, []).append(slot)
                plan[slot] = row
            elif u[row][0] * self._class_seen[c] < mine:  # reservoir within the class: mine / seen_c
                own = slots_of[c]
                plan[own[_pick(u[row][2], len(own))]] = row
        return plan

    def _write(self, slots, rows, inputs, labels, task_ids, logits) -> None:
        dev = self.device
        at = slots.to(dev)
        # index_copy_ / index_select: the slots are distinct, and both cost less than indexing with tensors
        self._inputs.index_copy_(0, at, inputs.index_select(0, rows.to(inputs.device)).to(dev))
        labels = labels.index_select(0, rows)
        self._labels.index_copy_(0, at, labels.to(dev))
        self._cpu_labels.index_copy_(0, slots, labels)
        self._task_ids.index_copy_(0, at, task_ids.index_select(0, rows).to(dev))
        if logits is not None:
            width = logits.shape[1]
            self._logits[at] = 0.0
            self._logits[at, :width] = logits[rows].to(dev, torch.float32)
            self._logit_widths[at] = width

    def _allocate(self, inputs: torch.Tensor, logits: torch.Tensor | None) -> None:
        cap, dev = self.capacity, self.device
        self._inputs = torch.zeros((cap, *inputs.shape[1:]), dtype=inputs.dtype, device=dev)
        self._labels = torch.zeros(cap, dtype=torch.int64, device=dev)
        self._task_ids = torch.zeros(cap, dtype=torch.int64, device=dev)
        self._cpu_labels = torch.zeros(cap, dtype=torch.int64)
        if logits is not None:
            self._logits = torch.zeros((cap, logits.shape[1]), dtype=torch.float32, device=dev)
            self._logit_widths = torch.zeros(cap, dtype=torch.int64, device=dev)

    def _widen_logits(self, width: int) -> None:
        wider = torch.zeros((self.capacity, width), dtype=torch.float32, device=self.device)
        wider[:, : self._logits.shape[1]] = self._logits
        self._logits = wider

    def _check_batch(self, inputs, labels, task_ids, logits):
        if not isinstance(inputs, torch.Tensor) or inputs.ndim < 1:
            raise DataError(f"inputs must be a tensor of shape (batch, ...), got {_describe(inputs)}.")
        b = inputs.shape[0]
        labels = _int_vector("labels", labels, b)
        if isinstance(task_ids, int) and not isinstance(task_ids, bool):
            task_ids = torch.full((b,), task_ids, dtype=torch.int64)
        else:
            task_ids = _int_vector("task_ids", task_ids, b)
        if self._inputs is not None:
            want, got = tuple(self._inputs.shape[1:]), tuple(inputs.shape[1:])
            if got != want:
                raise DataError(f"inputs of shape {tuple(inputs.shape)} do not fit this buffer, which stores "
                                f"samples of shape {want} (from the first batch added); give every batch the "
                                "same per-sample shape (resize the inputs, or use one buffer per input shape).")
            if inputs.dtype != self._inputs.dtype:
                raise DataError(f"inputs of dtype {inputs.dtype} do not fit this buffer, which stores "
                                f"{self._inputs.dtype} (from the first batch added); convert them first.")
        if logits is not None:
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != b:
                raise DataError(f"logits must be a tensor of shape ({b}, width), one row per sample; got "
                                f"{_describe(logits)}.")
            if not logits.is_floating_point() or not torch.isfinite(logits).all():
                raise DataError("logits must be finite floating-point values; got "
                                f"{logits.dtype} with non-finite or non-float entries.")
        if self._inputs is not None and (logits is not None) != self.stores_logits:
            have = "stores logits" if self.stores_logits else "stores no logits"
            raise DataError(f"this buffer {have} (decided by the first add), but this add passes "
                            f"{'logits' if logits is not None else 'none'}; pass logits on every add or on none.")
        return (inputs.detach() if inputs.requires_grad else inputs), labels, task_ids, \
            None if logits is None else logits.detach()

    # ----- sampling ----------------------------------------------------------------------------

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> ReplayBatch:
        """``min(batch_size, len(self))`` distinct slots drawn uniformly at random.

        Uses the buffer's own generator unless ``generator`` (a CPU generator) is given.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"replay batch size must be a positive integer, got {batch_size!r}; "
                              "give --replay-batch-size > 0.")
        if len(self) == 0:
            raise DataError("the replay buffer is empty: nothing to sample. Add samples first "
                            "(replay usually starts with the second experience, or after the first add).")
        k = min(batch_size, len(self))
        gen = self.generator if generator is None else generator
        return self._gather(torch.randperm(len(self), generator=gen)[:k])

    def contents(self) -> ReplayBatch:
        """Every stored sample, in slot order (GEM needs all of them; draws no random numbers)."""
        if len(self) == 0:
            raise DataError("the replay buffer is empty: it has no contents yet. Add samples first.")
        return self._gather(torch.arange(len(self)))

    def _gather(self, idx: torch.Tensor) -> ReplayBatch:
        dev_idx = idx.to(self.device)
        logits = mask = None
        if self.stores_logits:
            logits = self._logits.index_select(0, dev_idx)
            cols = torch.arange(logits.shape[1], device=self.device)
            mask = cols.unsqueeze(0) < self._logit_widths.index_select(0, dev_idx).unsqueeze(1)
        return ReplayBatch(self._inputs.index_select(0, dev_idx), self._labels.index_select(0, dev_idx),
                           self._task_ids.index_select(0, dev_idx), logits, mask, idx)

    # ----- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Tensors, numbers and the policy name only: loadable with ``torch.load(weights_only=True)``."""
        classes = sorted(self._class_seen)
        state = {
            "capacity": self.capacity,
            "policy": self.policy,
            "seen": self._seen,
            "next_entry": self._next_entry,
            "w": self._w,
            "generator": self.generator.get_state().clone(),
            "class_ids": torch.tensor(classes, dtype=torch.int64),
            "class_seen": torch.tensor([self._class_seen[c] for c in classes], dtype=torch.int64),
        }
        if self._inputs is not None:
            state.update(inputs=self._inputs.clone(), labels=self._labels.clone(), task_ids=self._task_ids.clone())
            if self.stores_logits:
                state.update(logits=self._logits.clone(), logit_widths=self._logit_widths.clone())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; checks it as untrusted input before touching the buffer."""
        if not isinstance(state, dict):
            raise CheckpointError(f"a replay-buffer state must be a dict, got {type(state).__name__}.")
        missing = [k for k in ("capacity", "policy", "seen", "generator", "class_ids", "class_seen")
                   if k not in state]
        if missing:
            raise CheckpointError(f"replay-buffer state lacks {', '.join(missing)}; it is not from "
                                  "ReplayBuffer.state_dict().")
        if state["capacity"] != self.capacity or state["policy"] != self.policy:
            raise CheckpointError(f"the checkpoint's buffer has size {state['capacity']} and policy "
                                  f"{state['policy']!r}, this one {self.capacity} and {self.policy!r}; resume with "
                                  f"--buffer-size {state['capacity']} and the same policy.")
        seen = state["seen"]
        if not isinstance(seen, int) or seen < 0:
            raise CheckpointError(f"replay-buffer state has an invalid 'seen' count {seen!r}.")
        next_entry, w = state.get("next_entry", -1), state.get("w", 1.0)
        if not (isinstance(next_entry, int) and isinstance(w, float) and 0.0 < w <= 1.0
                and (next_entry == -1 or next_entry >= seen)):
            raise CheckpointError(f"replay-buffer state has an invalid reservoir position {next_entry!r} / W {w!r}.")
        if self.policy == "reservoir" and seen > self.capacity and next_entry < 0:
            raise CheckpointError("replay-buffer state of a full reservoir lacks its 'next_entry' and 'w' (a state "
                                  "from an older version); start the run again.")
        stored = min(seen, self.capacity)
        has_data = "inputs" in state
        if stored > 0 and not has_data:
            raise CheckpointError(f"replay-buffer state says {seen} samples were seen but holds no stored tensors.")
        if has_data:
            for key in ("labels", "task_ids") + (("logit_widths",) if "logits" in state else ()):
                t = state.get(key)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != (self.capacity,):
                    raise CheckpointError(f"replay-buffer state entry '{key}' must be a tensor of shape "
                                          f"({self.capacity},), got {_describe(t)}.")
            for key in ("inputs",) + (("logits",) if "logits" in state else ()):
                t = state[key]
                if not isinstance(t, torch.Tensor) or t.ndim < 1 or t.shape[0] != self.capacity:
                    raise CheckpointError(f"replay-buffer state entry '{key}' must hold {self.capacity} slots, "
                                          f"got {_describe(t)}.")
        ids, counts = state["class_ids"], state["class_seen"]
        if not (isinstance(ids, torch.Tensor) and isinstance(counts, torch.Tensor) and ids.shape == counts.shape):
            raise CheckpointError("replay-buffer state entries 'class_ids' and 'class_seen' must be tensors of "
                                  "one shape.")
        gen = torch.Generator()
        try:
            gen.set_state(state["generator"])
        except (RuntimeError, TypeError) as e:
            raise CheckpointError(f"replay-buffer state holds an invalid generator state ({e}).") from None
        # Checked: now replace everything at once.
        self.generator, self._seen = gen, seen
        self._next_entry, self._w = next_entry, w
        self._class_seen = dict(zip(ids.tolist(), counts.tolist()))
        self._inputs = self._labels = self._task_ids = self._logits = self._logit_widths = None
        self._cpu_labels = None
        if has_data:
            dev = self.device
            self._inputs = state["inputs"].to(dev).clone()
            self._labels = state["labels"].to(dev, torch.int64).clone()
            self._task_ids = state["task_ids"].to(dev, torch.int64).clone()
            self._cpu_labels = self._labels.cpu().clone()
            if "logits" in state:
                self._logits = state["logits"].to(dev, torch.float32).clone()
                self._logit_widths = state["logit_widths"].to(dev, torch.int64).clone()


def _pick(u: float, n: int) -> int:
    """A uniform index in {0, ..., n-1} from a uniform float in [0, 1)."""
    return min(int(u * n), n - 1)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:200]


def _next_w(w: float, u: float, capacity: int) -> float:
    """Algorithm L's W after an entry: the largest of the ``capacity`` keys in memory (uniform on (0, 1)) once
    the key above them left; ``u`` uniform on (0, 1]."""
    return w * math.exp(math.log(u) / capacity)


def _gap(w: float, u: float) -> int:
    """1 + how many samples pass before the next one enters: geometric, each entering with probability ``w``."""
    return math.floor(math.log(u) / math.log1p(-w)) + 1 if w < 1.0 else 1


def _int_vector(name: str, values, b: int) -> torch.Tensor:
    """``values`` as an int64 CPU vector of length ``b``, or a DataError naming what is wrong."""
    if isinstance(values, torch.Tensor) and values.dtype == torch.int64 and values.shape == (b,) \
            and values.device.type == "cpu":
        return values  # already one (the strategies' batches)
    try:
        t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"{name} must be integer ids, one per sample; got {_describe(values)}.") from None
    if t.numel() == 0 and b == 0:
        return torch.zeros(0, dtype=torch.int64)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"{name} must be integer ids, got {_describe(t)}; convert them with .long().")
    if tuple(t.shape) != (b,):
        raise DataError(f"{name} must have one entry per sample, shape ({b},); got {_describe(t)}.")
    return t.detach().to("cpu", torch.int64)


# ----- herding (iCaRL) -------------------------------------------------------------------------


def herding_selection(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``count`` exemplars chosen by herding, in the order chosen.

    iCaRL (Rebuffi et al., CVPR 2017), Algorithm 4: with phi(x) the feature vector of x and
    mu the class mean, pick for k = 1, ..., count

        p_k = argmin over not-yet-picked x of || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||,

    so that the mean of the first k exemplars tracks mu as closely as a greedy choice can
    (an ordered list: dropping its tail later keeps the best m' < m exemplars).

    Choices: every feature vector is first scaled to unit L2 norm and mu is the mean of the
    normalised vectors, as in the paper, whose nearest-mean-of-exemplars classifier works on
    L2-normalised features (Sec. 2.1); mu itself is not renormalised (Algorithm 4 uses the
    plain mean). The search runs in float64; ties go to the lowest index. A zero feature
    vector stays zero.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or not features.is_floating_point():
        raise DataError(f"herding needs features as a float tensor (samples, dim), got {_describe(features)}.")
    n = features.shape[0]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= n:
        raise ConfigError(f"herding count must be an integer in [1, {n}] (the class has {n} samples), "
                          f"got {count!r}; lower the exemplars per class or give more samples.")
    if not torch.isfinite(features).all():
        raise DataError("herding features contain NaN or infinite values; check the model that produced them.")
    phi = torch.nn.functional.normalize(features.detach().to(torch.float64), dim=1)
    mu = phi.mean(0)
    picked: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(n, dtype=torch.bool, device=phi.device)
    for k in range(1, count + 1):
        dist = torch.linalg.vector_norm(mu - (phi + running) / k, dim=1)
        dist[~available] = math.inf
        i = int(torch.argmin(dist))
        picked.append(i)
        available[i] = False
        running += phi[i]
    return torch.tensor(picked, dtype=torch.int64)


__all__ = ["ReplayBuffer", "ReplayBatch", "herding_selection", "POLICIES"]
