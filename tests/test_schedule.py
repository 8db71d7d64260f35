"""FNGD's epoch schedule on its own: every way a host tells epochs, which epochs solve, checkpoints."""

import pytest
import torch

from fngd_plugin.schedule import EpochSchedule


def make(reuse="position", collect_epochs=1, steps_per_epoch=None, refresh_every=None):
    ended, warned = [], []
    s = EpochSchedule(reuse, collect_epochs, steps_per_epoch, refresh_every, on_epoch_end=ended.append,
                      warn=lambda key, msg: warned.append((key, msg)))
    return s, ended, warned


def test_counted_epochs_place_batches_and_end_each_epoch_once():
    s, ended, _ = make(steps_per_epoch=3)
    placed = [s.next_batch(None) for _ in range(7)]
    assert placed == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2)]
    assert ended == [0, 1] and s.current == 2 and s.position == 1
    s.position = 3
    assert s.epoch == 3  # the next batch starts epoch 3


def test_host_signals_set_epoch_and_begin_epoch():
    s, ended, _ = make()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        s.next_batch(None)  # position keying with no way to tell epochs
    s.begin_epoch()  # nothing ran yet: only marks that the host signals epochs
    assert (s.current, ended) == (0, [])
    assert [s.next_batch(None) for _ in range(2)] == [(0, 0), (1, 0)]
    s.begin_epoch()
    assert (s.current, s.position, ended) == (1, 0, [0])
    s.next_batch(None)
    s.set_epoch(5)
    assert (s.current, s.position, ended) == (5, 0, [0, 1])
    s.set_epoch(5)  # the same epoch again (a resume): no epoch ended
    assert ended == [0, 1]
    with pytest.raises(ValueError, match="epoch=-1"):
        s.set_epoch(-1)


def test_repeated_sample_id_starts_an_epoch_only_while_collecting():
    s, ended, _ = make(reuse="sample")
    with pytest.raises(ValueError, match="sample ids"):
        s.next_batch(None)
    assert s.next_batch(torch.tensor([0, 1])) == (0, 0)
    assert s.next_batch(torch.tensor([7, 2])) == (1, 0)
    assert s.next_batch(torch.tensor([1, 3])) == (0, 1)  # id 1 again: epoch 1
    assert ended == [0]
    # epoch 1 is a reuse epoch: ids say nothing there (a host signal or a count is needed)
    assert s.next_batch(torch.tensor([1, 3])) == (1, 1)


def test_which_epochs_solve():
    s, _, _ = make(collect_epochs=2, refresh_every=3)
    assert [s.is_collect(e) for e in range(7)] == [True, True, False, True, False, False, True]
    assert s.solves(2, store_empty=True) and not s.solves(2, store_empty=False)
    off, _, _ = make(reuse="off")
    assert all(off.is_collect(e) for e in range(5))


def test_wrong_steps_per_epoch_is_warned_once_per_key():
    s, _, warned = make(steps_per_epoch=4)
    s.set_epoch(0)
    for _ in range(3):
        s.next_batch(None)
    s.set_epoch(1)
    assert warned and warned[0][0] == "epoch_length" and "steps_per_epoch=3" in warned[0][1]


def test_state_dict_round_trip_continues_identically():
    a, _, _ = make(reuse="sample")
    for ids in ([0, 1], [2, 3], [1, 4], [5, 6]):
        a.next_batch(torch.tensor(ids))
    b, ended, _ = make(reuse="sample")
    b.load_state_dict(a.state_dict())
    assert (b.current, b.position, b.signalled, b.since_signal) == (a.current, a.position, a.signalled,
                                                                      a.since_signal)
    assert torch.equal(a.seen_ids, b.seen_ids)
    for ids in ([6, 7], [0, 9]):
        assert a.next_batch(torch.tensor(ids)) == b.next_batch(torch.tensor(ids))
    spe, _, _ = make(steps_per_epoch=None)
    spe.load_state_dict({**make(steps_per_epoch=5)[0].state_dict()})
    assert spe.steps_per_epoch == 5  # taken from the checkpoint when not given
