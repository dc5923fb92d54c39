"""Replay memory (continual/buffer.py): reservoir sampling is uniform per sample, class-balanced
memory stays balanced, checkpoints resume the exact choices, herding picks the exemplars worked
out by hand, and user mistakes raise clear errors."""

from __future__ import annotations

import io
import random

import pytest
import torch
from scipy import stats

from continual.buffer import ReplayBuffer, herding_selection
from mtl.errors import CheckpointError, ConfigError, DataError

ALPHA = 1e-3  # significance level of the uniformity tests (their seeds are fixed, so they are deterministic)


def stream_batches(n: int, rng: random.Random, max_batch: int = 9):
    """Sample ids 0..n-1 cut into batches of random sizes 1..max_batch."""
    ids = torch.arange(n)
    start = 0
    while start < n:
        b = min(rng.randint(1, max_batch), n - start)
        yield ids[start:start + b]
        start += b


def kept_counts(policy_fn, n: int, trials: int) -> torch.Tensor:
    """How often each of n stream samples is in memory at the end, over ``trials`` runs."""
    counts = torch.zeros(n)
    for trial in range(trials):
        kept = policy_fn(trial, stream_batches(n, random.Random(10_000 + trial)))
        counts[kept] += 1
    return counts


def uniformity_statistic(counts: torch.Tensor, trials: int, capacity: int) -> tuple[float, float]:
    """Chi-square statistic and p-value of "every sample kept with probability capacity / N".

    Each trial keeps exactly ``capacity`` distinct samples out of N, so the indicators are not
    multinomial: Cov(O) = T p (1 - p) (N / (N - 1)) (I - 11^T / N), with p = capacity / N. Dividing
    sum (O_i - T p)^2 by T p (1 - p) N / (N - 1) gives a chi-square with N - 1 degrees of freedom
    (the plain Pearson statistic would be too small by the factor (1 - p) (N - 1) / N).
    """
    n = len(counts)
    p = capacity / n
    scale = trials * p * (1 - p) * n / (n - 1)
    statistic = float(((counts - trials * p) ** 2).sum() / scale)
    return statistic, float(stats.chi2.sf(statistic, df=n - 1))


def run_buffer(policy: str, capacity: int):
    def keep(trial, batches):
        buf = ReplayBuffer(capacity, policy=policy, seed=trial)
        for ids in batches:
            # one class only: class-balanced memory then reduces to reservoir sampling within the class
            buf.add(ids.float().unsqueeze(1), torch.zeros_like(ids), 0)
        return buf.sample(capacity).inputs.squeeze(1).long()
    return keep


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_reservoir_keeps_every_sample_with_equal_probability(policy):
    capacity, n, trials = 10, 50, 2000
    counts = kept_counts(run_buffer(policy, capacity), n, trials)
    assert counts.sum() == capacity * trials
    statistic, p_value = uniformity_statistic(counts, trials, capacity)
    assert p_value > ALPHA, (statistic, p_value, counts.tolist())
    # every frequency near 10 / 50 = 0.2 (binomial sd 0.009 at 2,000 trials)
    assert (counts / trials - 0.2).abs().max() < 0.04


def test_reservoir_admits_the_nth_sample_with_probability_capacity_over_n_into_a_uniform_slot():
    """Algorithm R's law, which the gap draws of Algorithm L reproduce: sample n (n > capacity) enters with
    probability capacity / n, independently of the samples before it, into a uniformly chosen slot."""
    capacity, n, trials = 4, 16, 1500
    entered = torch.zeros(n)
    slots = torch.zeros(capacity)
    for trial in range(trials):
        buf = ReplayBuffer(capacity, seed=trial)
        for i in range(n):
            buf.add(torch.tensor([[float(i)]]), torch.zeros(1, dtype=torch.long), 0)
            where = (buf.contents().inputs.squeeze(1) == i).nonzero().flatten()
            entered[i] += len(where)
            if i >= capacity and len(where):
                slots[where] += 1
    positions = torch.arange(capacity + 1, n + 1, dtype=torch.float64)  # 1-based stream positions
    p = capacity / positions
    observed = entered[capacity:].double()
    statistic = float(((observed - trials * p) ** 2 / (trials * p * (1 - p))).sum())
    assert stats.chi2.sf(statistic, df=len(p)) > ALPHA, (statistic, (observed / trials).tolist())
    assert torch.equal(entered[:capacity], torch.full((capacity,), float(trials)))  # the first ones fill it
    expected = slots.sum() / capacity
    assert stats.chisquare(slots.numpy(), [expected] * capacity).pvalue > ALPHA, slots.tolist()


def test_uniformity_test_rejects_biased_policies():
    capacity, n, trials = 10, 50, 2000

    def keep_last(trial, batches):  # a FIFO memory: only the most recent samples survive
        return torch.cat(list(batches))[-capacity:]

    def per_batch_reservoir(trial, batches):
        # A subtle bug: the acceptance probability uses the count at the START of the batch for the
        # whole batch (capacity / n_batch_start instead of capacity / n per sample).
        rng = random.Random(trial)
        memory, seen = [], 0
        for ids in batches:
            n_start = seen
            for i in ids.tolist():
                seen += 1
                if len(memory) < capacity:
                    memory.append(i)
                elif rng.random() < capacity / max(n_start, 1):
                    memory[rng.randrange(capacity)] = i
        return torch.tensor(memory)

    statistic, p_value = uniformity_statistic(kept_counts(keep_last, n, trials), trials, capacity)
    assert p_value < 1e-12 and statistic > 1000
    statistic, p_value = uniformity_statistic(kept_counts(per_batch_reservoir, n, trials), trials, capacity)
    assert p_value < ALPHA, statistic


def test_first_samples_fill_the_memory_in_order_and_len_and_seen():
    buf = ReplayBuffer(5, seed=3)
    assert len(buf) == 0 and buf.seen == 0 and buf.classes() == []
    buf.add(torch.arange(3.0).unsqueeze(1), torch.tensor([0, 1, 1]), 0)
    assert len(buf) == 3 and buf.seen == 3 and buf.classes() == [0, 1]
    buf.add(torch.arange(3.0, 10.0).unsqueeze(1), torch.full((7,), 2), torch.full((7,), 1))
    assert len(buf) == 5 and buf.seen == 10
    batch = buf.sample(100)
    assert len(batch.indices) == 5 and sorted(batch.indices.tolist()) == [0, 1, 2, 3, 4]  # without replacement
    assert batch.logits is None and batch.logits_mask is None


def test_global_rng_untouched():
    before = torch.random.get_rng_state()
    buf = ReplayBuffer(4, seed=1)
    for start in range(0, 40, 5):
        buf.add(torch.randn(5, 2, generator=torch.Generator().manual_seed(start)), torch.arange(5), 0)
        buf.sample(3)
    assert torch.equal(before, torch.random.get_rng_state())


def test_sample_returns_consistent_slots():
    buf = ReplayBuffer(8, seed=0)
    ids = torch.arange(30)
    buf.add(ids.float().view(-1, 1, 1).expand(-1, 2, 3).contiguous(), ids % 4, ids // 10,
            logits=torch.stack([ids.float(), -ids.float()], 1))
    batch = buf.sample(5, generator=torch.Generator().manual_seed(7))
    assert batch.inputs.shape == (5, 2, 3) and batch.labels.dtype == torch.int64
    sample_id = batch.inputs[:, 0, 0].long()
    assert torch.equal(batch.labels, sample_id % 4) and torch.equal(batch.task_ids, sample_id // 10)
    assert torch.equal(batch.logits, torch.stack([sample_id.float(), -sample_id.float()], 1))
    assert batch.logits_mask.all()
    # the same explicit generator seed gives the same draw
    again = buf.sample(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(batch.indices, again.indices)
    # contents(): every slot in order, without touching the buffer's generator
    state = buf.generator.get_state()
    everything = buf.contents()
    assert torch.equal(everything.indices, torch.arange(8)) and torch.equal(buf.generator.get_state(), state)
    assert torch.equal(everything.inputs[batch.indices], batch.inputs)
    assert torch.equal(everything.logits[batch.indices], batch.logits)


def test_logits_are_copied_padded_and_masked():
    buf = ReplayBuffer(4, seed=0)
    first = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    buf.add(torch.zeros(2, 1), [0, 1], 0, logits=first)
    first.add_(100)  # the memory keeps the logits seen at add time (DER)
    buf.add(torch.ones(2, 1), [2, 3], 1, logits=torch.tensor([[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]]))
    batch = buf.sample(4)
    order = torch.argsort(batch.indices)
    logits, mask = batch.logits[order], batch.logits_mask[order]
    assert torch.equal(logits, torch.tensor([[1.0, 2, 0], [3, 4, 0], [5, 6, 7], [8, 9, 10]]))
    assert torch.equal(mask, torch.tensor([[True, True, False], [True, True, False], [True] * 3, [True] * 3]))


def test_class_balanced_keeps_classes_within_one():
    capacity = 20
    buf = ReplayBuffer(capacity, policy="class_balanced", seed=5)
    reservoir = ReplayBuffer(capacity, policy="reservoir", seed=5)
    gen = torch.Generator().manual_seed(0)
    # three tasks of two classes each; the second class of every task is five times rarer
    for task in range(3):
        labels = torch.cat([torch.full((250,), 2 * task), torch.full((50,), 2 * task + 1)])
        labels = labels[torch.randperm(300, generator=gen)]
        for chunk in labels.split(32):
            buf.add(torch.randn(len(chunk), 3, generator=gen), chunk, task)
            reservoir.add(torch.randn(len(chunk), 3, generator=gen), chunk, task)
        counts = buf.class_counts()
        assert sorted(counts) == list(range(2 * task + 2)) == buf.classes()
        assert sum(counts.values()) == capacity
        assert max(counts.values()) - min(counts.values()) <= 1, counts
    # 20 slots over 6 classes: two classes with 4, four with 3
    assert sorted(buf.class_counts().values()) == [3, 3, 3, 3, 4, 4]
    # plain reservoir mirrors the stream instead (sanity check of the test's stream)
    res = reservoir.class_counts()
    assert max(res.values()) - min(res.values(), default=0) > 1 or len(res) < 6


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_state_round_trip_resumes_identical_choices(policy):
    def batch(i):
        gen = torch.Generator().manual_seed(i)
        b = 3 + i % 5
        width = 2 if i < 6 else 4  # the head grows: wider logits later in the stream
        return (torch.randn(b, 1, 4, 4, generator=gen), torch.randint(6, (b,), generator=gen), i // 4,
                torch.randn(b, width, generator=gen))

    full = ReplayBuffer(12, policy=policy, seed=11)
    for i in range(5):
        full.add(*batch(i))
    saved = io.BytesIO()
    torch.save(full.state_dict(), saved)
    saved.seek(0)
    resumed = ReplayBuffer(12, policy=policy, seed=999)  # the seed is overridden by the state
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for i in range(5, 14):
        full.add(*batch(i))
        resumed.add(*batch(i))
        a, b = full.sample(6), resumed.sample(6)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert full.seen == resumed.seen and full.class_counts() == resumed.class_counts()
    for key, value in full.state_dict().items():
        other = resumed.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_state_of_an_empty_buffer_round_trips():
    saved = io.BytesIO()
    torch.save(ReplayBuffer(3).state_dict(), saved)
    saved.seek(0)
    buf = ReplayBuffer(3)
    buf.load_state_dict(torch.load(saved, weights_only=True))
    assert len(buf) == 0 and buf.seen == 0
    buf.add(torch.zeros(2, 1), [0, 1], 0)
    assert len(buf) == 2


def test_herding_picks_the_hand_worked_exemplars():
    # Raw features; after L2 normalisation they are the unit vectors
    #   p0 = (1, 0), p1 = (0.8, 0.6), p2 = (0.6, 0.8), p3 = (0, 1), p4 = (0.28, 0.96).
    # Their mean is mu = (2.68, 3.36) / 5 = (0.536, 0.672). Squared distances ||mu - (p + S) / k||^2:
    # k = 1 (S = 0): p0 0.66688, p1 0.07488, p2 0.02048, p3 0.39488, p4 0.14848          -> p2
    # k = 2 (S = p2 = (0.6, 0.8)): means p0 (0.8, 0.4) 0.14368, p1 (0.7, 0.7) 0.02768,
    #        p3 (0.3, 0.9) 0.10768, p4 (0.44, 0.88) 0.05248                                 -> p1
    # k = 3 (S = (1.4, 1.4)): p0 (0.8, 0.4667) 0.11186, p3 (0.4667, 0.8) 0.02119,
    #        p4 (0.56, 0.7867) 0.01372                                                      -> p4
    # k = 4 (S = (1.68, 2.36)): p0 (0.67, 0.59) 0.02468, p3 (0.42, 0.84) 0.04168            -> p0
    # k = 5: p3, and the five exemplars' mean is mu exactly.
    # Sorting by distance to mu alone would give 2, 1, 4, 3, 0: herding differs at k = 4.
    features = torch.tensor([[3.0, 0.0], [4.0, 3.0], [0.3, 0.4], [0.0, 7.0], [0.7, 2.4]])
    assert herding_selection(features, 5).tolist() == [2, 1, 4, 0, 3]
    assert herding_selection(features, 3).tolist() == [2, 1, 4]  # a prefix: the order is the ranking
    assert herding_selection(features.double(), 1).dtype == torch.int64


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match=r"buffer size 0 cannot replay anything; give --buffer-size > 0"):
        ReplayBuffer(0)
    with pytest.raises(ConfigError, match="buffer size -3"):
        ReplayBuffer(-3)
    with pytest.raises(ConfigError, match="whole number"):
        ReplayBuffer(2.5)
    with pytest.raises(ConfigError, match="unknown buffer policy 'fifo'"):
        ReplayBuffer(4, policy="fifo")
    buf = ReplayBuffer(4)
    with pytest.raises(DataError, match="empty"):
        buf.sample(2)
    with pytest.raises(DataError, match="empty"):
        buf.contents()
    buf.add(torch.zeros(2, 1, 28, 28), [0, 1], 0)
    with pytest.raises(DataError, match=r"inputs of shape \(2, 1, 32, 32\).*\(1, 28, 28\)"):
        buf.add(torch.zeros(2, 1, 32, 32), [0, 1], 0)
    with pytest.raises(DataError, match="dtype torch.uint8"):
        buf.add(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), [0, 1], 0)
    with pytest.raises(DataError, match="labels must be integer ids"):
        buf.add(torch.zeros(2, 1, 28, 28), torch.tensor([0.0, 1.0]), 0)
    with pytest.raises(DataError, match=r"labels must have one entry per sample, shape \(2,\)"):
        buf.add(torch.zeros(2, 1, 28, 28), [0, 1, 2], 0)
    with pytest.raises(DataError, match=r"task_ids must have one entry per sample"):
        buf.add(torch.zeros(2, 1, 28, 28), [0, 1], [0])
    with pytest.raises(DataError, match="stores no logits"):
        buf.add(torch.zeros(2, 1, 28, 28), [0, 1], 0, logits=torch.zeros(2, 10))
    with pytest.raises(ConfigError, match="replay batch size must be a positive integer, got 0"):
        buf.sample(0)
    assert buf.seen == 2 and len(buf) == 2  # the rejected batches changed nothing
    with_logits = ReplayBuffer(4)
    with_logits.add(torch.zeros(2, 3), [0, 1], 0, logits=torch.zeros(2, 5))
    with pytest.raises(DataError, match="stores logits"):
        with_logits.add(torch.zeros(2, 3), [0, 1], 0)
    with pytest.raises(DataError, match=r"logits must be a tensor of shape \(2, width\)"):
        with_logits.add(torch.zeros(2, 3), [0, 1], 0, logits=torch.zeros(3, 5))
    with pytest.raises(CheckpointError, match="--buffer-size 4"):
        ReplayBuffer(8).load_state_dict(with_logits.state_dict())
    full = ReplayBuffer(2)
    full.add(torch.zeros(5, 3), [0, 1, 0, 1, 0], 0)
    for change, message in (({"w": 0.0}, "invalid reservoir position"), ({"next_entry": 1}, "invalid reservoir position"),
                            ({"next_entry": -1}, "lacks its 'next_entry' and 'w'")):
        target = ReplayBuffer(2)
        with pytest.raises(CheckpointError, match=message):
            target.load_state_dict({**full.state_dict(), **change})
        assert target.seen == 0  # a refused state changes nothing
    with pytest.raises(ConfigError, match=r"herding count must be an integer in \[1, 3\]"):
        herding_selection(torch.randn(3, 2), 4)
    with pytest.raises(ConfigError, match="herding count"):
        herding_selection(torch.randn(3, 2), 0)
    with pytest.raises(DataError, match="herding needs features"):
        herding_selection(torch.randn(3), 1)
    with pytest.raises(DataError, match="NaN"):
        herding_selection(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), 1)
