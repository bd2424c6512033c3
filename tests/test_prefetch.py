"""Device prefetch for torch (`cubebench.loading.torch.to_device`): the queue's order, its
exactly-once property and its bound on copies in flight (with a fake copier that records what
it is asked), the staging ring's reuse rule, the CPU identity path, and the loops using it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cubebench.case import Context
from cubebench.loading.torch import Staging, check_prefetch, prefetched, to_device

N_BATCHES = 5
PREFETCHES = [1, 2, 3, N_BATCHES, N_BATCHES + 4]


def host_batches(n: int = N_BATCHES, rows: int = 4, mask: bool = False) -> list[tuple]:
    """Distinct float32 batches: batch i holds the value i everywhere (a mask: i + 0.5)."""
    out = []
    for i in range(n):
        batch = [np.full((rows, 3), i, np.float32), np.full(rows, i, np.float32)]
        if mask:
            batch.append(np.full((rows, 1, 2, 2), i + 0.5, np.float32))
        out.append(tuple(batch))
    return out


class Upstream:
    """An iterator over `batches` that records how many were taken and whether it was closed."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.taken = 0
        self.closed = False
        self._gen = self._generate()

    def _generate(self):
        try:
            for batch in self.batches:
                self.taken += 1
                yield batch
        finally:
            self.closed = True

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


class FakeCopier:
    """Records every start and finish; a copy is 'in flight' from start to finish."""

    def __init__(self):
        self.log: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    def start(self, batch):
        key = int(batch[0].flat[0])
        self.log.append(("start", key))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return key, batch

    def finish(self, handle):
        key, batch = handle
        self.log.append(("finish", key))
        self.in_flight -= 1
        return batch

    def keys(self, what: str) -> list[int]:
        return [k for w, k in self.log if w == what]


def values(batches) -> list[int]:
    return [int(np.asarray(b[0]).flat[0]) for b in batches]


# --- the queue ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", PREFETCHES)
def test_the_queue_yields_every_batch_once_in_order(prefetch):
    source = Upstream(host_batches())
    copier = FakeCopier()
    got = []
    for batch in prefetched(source, copier, prefetch):
        # when the consumer holds batch k, batches up to k + prefetch have been started
        started = copier.keys("start")
        assert max(started) == min(values([batch])[0] + prefetch, N_BATCHES - 1)
        got.append(batch)
    assert values(got) == list(range(N_BATCHES))
    assert all(a is b for a, b in zip(got, source.batches))  # the copier's results, as given
    assert copier.keys("start") == list(range(N_BATCHES))
    assert copier.keys("finish") == list(range(N_BATCHES))
    assert copier.most_in_flight == min(prefetch, N_BATCHES)  # the bound, and reached
    assert copier.in_flight == 0
    assert source.taken == N_BATCHES and source.closed


@pytest.mark.parametrize("prefetch", PREFETCHES)
def test_a_batch_is_finished_before_the_one_prefetch_later_starts(prefetch):
    copier = FakeCopier()
    list(prefetched(host_batches(), copier, prefetch))
    log = copier.log
    for k in range(N_BATCHES - prefetch):
        assert log.index(("finish", k)) < log.index(("start", k + prefetch))


@pytest.mark.parametrize("prefetch", [1, 3])
def test_an_empty_iterator_gives_nothing(prefetch):
    source = Upstream([])
    copier = FakeCopier()
    assert list(prefetched(source, copier, prefetch)) == []
    assert copier.log == [] and source.closed
    assert list(to_device(iter([]), "cpu", prefetch)) == []


@pytest.mark.parametrize("prefetch", [1, 2, N_BATCHES + 4])
def test_a_consumer_that_stops_early_closes_the_upstream(prefetch):
    source = Upstream(host_batches())
    copier = FakeCopier()
    batches = prefetched(source, copier, prefetch)
    first = next(batches)
    assert values([first]) == [0]
    batches.close()  # no error
    assert source.closed
    assert source.taken == min(prefetch + 1, N_BATCHES)  # nothing read past the queue
    assert copier.keys("finish") == [0]
    with pytest.raises(StopIteration):
        next(batches)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_an_upstream_error_reaches_the_consumer(prefetch):
    def broken():
        yield from host_batches(2)
        raise OSError("a chunk failed to decode")

    got = []
    with pytest.raises(OSError, match="decode"):
        for batch in prefetched(broken(), FakeCopier(), prefetch):
            got.append(batch)
    assert values(got) == [0, 1][: max(0, 2 - prefetch)]  # raised when read ahead


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None, "2"])
def test_prefetch_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="prefetch"):
        check_prefetch(bad)
    with pytest.raises(ValueError, match="prefetch"):
        to_device(host_batches(), "cpu", bad)  # at the call, not at the first batch
    with pytest.raises(ValueError, match="prefetch"):
        prefetched(host_batches(), FakeCopier(), bad)


def test_prefetch_accepts_integers_of_any_kind():
    assert check_prefetch(np.int64(3)) == 3
    assert check_prefetch(1) == 1


# --- the CPU path: the identity ------------------------------------------------------------


@pytest.mark.parametrize("prefetch", PREFETCHES)
@pytest.mark.parametrize("mask", [False, True])
def test_on_the_cpu_batches_pass_unchanged_without_a_copy(prefetch, mask):
    batches = host_batches(mask=mask)
    source = Upstream(batches)
    got = list(to_device(source, "cpu", prefetch))
    assert len(got) == N_BATCHES and source.closed
    for tensors, arrays in zip(got, batches):
        assert len(tensors) == (3 if mask else 2)
        for t, a in zip(tensors, arrays):
            assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
            assert t.dtype == torch.float32 and tuple(t.shape) == a.shape
            assert np.shares_memory(t.numpy(), a)  # zero copy


def test_on_the_cpu_a_consumer_that_stops_early_closes_the_upstream():
    source = Upstream(host_batches())
    batches = to_device(source, "cpu")
    next(batches)
    batches.close()
    assert source.closed and source.taken == 1  # no read-ahead on the CPU


# --- the staging ring (the CUDA copier's host side, unpinned here) --------------------------


class LazyCopy:
    """A copy out of a staging buffer that only happens when waited for, as an asynchronous
    copy may: a staging ring that rewrites a buffer before waiting corrupts the batch."""

    def __init__(self, staged: tuple[torch.Tensor, ...]):
        self.staged = staged
        self.result: tuple[torch.Tensor, ...] | None = None

    def synchronize(self) -> None:
        if self.result is None:
            self.result = tuple(t.clone() for t in self.staged)


class LazyCopier:
    """`CudaCopier` without CUDA: the staging ring, copies that complete late."""

    def __init__(self, prefetch: int):
        self.staging = Staging(prefetch + 1, pin=False)
        self.copies: list[LazyCopy] = []

    def start(self, batch):
        slot, staged = self.staging.stage(batch)
        copy = LazyCopy(staged)
        self.staging.staged(slot, copy)
        self.copies.append(copy)
        return copy

    def finish(self, copy: LazyCopy):
        return copy  # the consumer's stream waits: the copy is not done on the host yet


@pytest.mark.parametrize("prefetch", [1, 2, 4])
@pytest.mark.parametrize("mask", [False, True])
def test_the_staging_ring_waits_for_a_copy_before_reusing_its_buffer(prefetch, mask):
    batches = host_batches(8, mask=mask)
    copier = LazyCopier(prefetch)
    handed = list(prefetched(batches, copier, prefetch))
    for copy in handed:
        copy.synchronize()  # the consumer's work runs after the copy
    for copy, arrays in zip(handed, batches):
        for t, a in zip(copy.result, arrays):
            np.testing.assert_array_equal(t.numpy(), a)
    # every copy but the last ring's was completed by the ring before it reused the buffer
    early = copier.copies[: len(batches) - (prefetch + 1)]
    assert all(copy.result is not None for copy in early)


def test_the_staging_ring_reuses_its_buffers_and_grows_them():
    staging = Staging(2, pin=False)
    waited = []

    class Event:
        def __init__(self, name):
            self.name = name

        def synchronize(self):
            waited.append(self.name)

    big = (np.ones((8, 3), np.float32), np.ones(8, np.float32))
    slot_a, staged_a = staging.stage(big)
    staging.staged(slot_a, Event("a"))
    slot_b, _ = staging.stage(big)
    staging.staged(slot_b, Event("b"))
    assert waited == []
    small = (np.full((2, 3), 7, np.float32), np.full(2, 7, np.float32))
    slot_c, staged_c = staging.stage(small)  # back to slot a: waits for copy a first
    assert (slot_a, slot_b, slot_c) == (0, 1, 0) and waited == ["a"]
    assert staged_c[0].data_ptr() == staged_a[0].data_ptr()  # the same buffer, reused
    assert tuple(staged_c[0].shape) == (2, 3) and float(staged_c[0].sum()) == 42.0
    staging.staged(slot_c, Event("c"))
    bigger = (np.ones((16, 3), np.float32), np.ones(16, np.float32))
    _, staged_d = staging.stage(bigger)  # slot b, grown
    assert waited == ["a", "b"] and tuple(staged_d[0].shape) == (16, 3)
    _, staged_e = staging.stage((np.zeros((0, 3), np.float32), np.zeros(0, np.float32)))
    assert waited == ["a", "b", "c"] and tuple(staged_e[0].shape) == (0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prefetch", [1, 2, N_BATCHES + 4])
def test_on_cuda_batches_arrive_on_the_device_in_order(prefetch):
    batches = host_batches(rows=1 << 16, mask=True)
    got = [tuple(t.cpu().numpy() for t in b) for b in to_device(batches, "cuda", prefetch)]
    assert len(got) == N_BATCHES
    for tensors, arrays in zip(got, batches):
        for t, a in zip(tensors, arrays):
            np.testing.assert_array_equal(t, a)


# --- the loops -----------------------------------------------------------------------------


class FakeStream:
    def __init__(self, batches):
        self.upstreams: list[Upstream] = []
        self._batches = batches

    def batches(self, epoch: int):
        self.upstreams.append(Upstream(self._batches))
        return self.upstreams[-1]


def test_timed_batches_times_the_prepared_batches_and_closes_them_early():
    context = Context(None, {})
    stream = FakeStream(host_batches())
    prepared = context.timed_batches(stream, 0, prepare=lambda b: to_device(b, "cpu"))
    got = list(prepared)
    assert all(isinstance(b[0], torch.Tensor) for b in got) and values(got) == [0, 1, 2, 3, 4]
    assert context.loop.steps == N_BATCHES and stream.upstreams[0].closed
    for _ in context.timed_batches(stream, 1, prepare=lambda b: to_device(b, "cpu")):
        break
    assert context.loop.steps == N_BATCHES + 1 and stream.upstreams[1].closed


def test_the_trainer_takes_the_same_step_on_numpy_and_on_device_batches():
    from cubebench.models import torch as tm

    xs = [np.random.default_rng(i).normal(size=(16, 3)).astype(np.float32) for i in range(3)]
    batches = [(x, x.sum(1)) for x in xs]
    models = [tm.build_mlp(3, (8,), seed=1) for _ in range(2)]
    trainers = [tm.Trainer(m, "cpu", 1e-2, 3, 0.0) for m in models]
    for batch in batches:
        trainers[0].step(batch)
    for batch in trainers[1].batches(batches):
        trainers[1].step(batch)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(trainers[0].total) == float(trainers[1].total) > 0.0
    assert trainers[1].samples == 48


def test_evaluate_takes_any_float_batches():
    from cubebench.models import torch as tm

    model = tm.build_mlp(3, (4,), seed=0)
    x = np.random.default_rng(0).normal(size=(10, 3))  # float64, then a strided view
    y = np.zeros(10)
    with torch.no_grad():
        pred = model(torch.from_numpy(x.astype(np.float32))).squeeze(-1).numpy()
    expected = float(np.mean(pred.astype(np.float64) ** 2))
    batches = [(x[:6], y[:6]), (x[6:], y[6:]), (x[:0], y[:0])]
    assert tm.evaluate(model, batches, "cpu", prefetch=1) == pytest.approx(expected, rel=1e-6)
    strided = [(np.asfortranarray(x), y)]
    assert tm.evaluate(model, strided, "cpu") == pytest.approx(expected, rel=1e-6)
