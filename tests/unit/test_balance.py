"""Unit tests for rawproxy.balance.pick: the order of SPEC 9, weights, ties,
and the power of two choices.  Seeded ``random.Random``; no sockets.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Optional

import pytest

from rawproxy.balance import Candidate, Choice, Verdict, pick


def tagged(candidates: list[Candidate]) -> list[Candidate]:
    for index, candidate in enumerate(candidates):
        candidate.tag = index
    return candidates


def tag_of(choice: Choice) -> object:
    """The index of the chosen candidate, or the verdict as it is."""
    return choice.tag if isinstance(choice, Candidate) else choice


def counts(candidates: list[Candidate], picks: int, seed: int = 1, *,
           least_connections: bool = False,
           limits: Optional[tuple[int, int]] = None) -> Counter[object]:
    rng = random.Random(seed)
    tagged(candidates)
    return Counter(tag_of(pick(candidates, rng, least_connections=least_connections,
                               limits=limits)) for _ in range(picks))


def test_nothing_to_try_is_none() -> None:
    assert pick([], random.Random(1)) is None
    assert pick([], random.Random(1), limits=(1, 2), least_connections=True) is None


# -- the order: below soft, then below hard, then wait ---------------------------

def test_below_soft_is_preferred_to_below_hard() -> None:
    # 0 and 2 are at or over the soft limit, 1 is below it: only 1.
    cands = [Candidate(1, 3), Candidate(1, 1), Candidate(1, 2)]
    assert counts(cands, 500, limits=(2, 4)) == Counter({1: 500})


def test_below_hard_when_none_is_below_soft() -> None:
    cands = [Candidate(1, 4), Candidate(1, 2), Candidate(1, 3)]
    got = counts(cands, 1000, limits=(2, 4))
    assert set(got) == {1, 2}  # 0 is at the hard limit: never
    assert 400 <= got[1] <= 600


def test_every_target_at_hard_limit_waits() -> None:
    cands = [Candidate(1, 4), Candidate(5, 9)]
    assert pick(cands, random.Random(1), limits=(2, 4)) is Verdict.WAIT
    assert pick(cands, random.Random(1), limits=(2, 4), least_connections=True) is Verdict.WAIT


def test_without_limits_load_does_not_matter_to_random() -> None:
    cands = [Candidate(1, 1000), Candidate(1, 0)]
    got = counts(cands, 2000)
    assert 900 <= got[0] <= 1100


def test_down_targets_are_skipped_even_when_less_loaded() -> None:
    cands = [Candidate(1, 0, down=True), Candidate(1, 3)]
    assert counts(cands, 200, limits=(1, 5)) == Counter({1: 200})


def test_a_full_up_target_waits_rather_than_trying_a_down_one() -> None:
    cands = [Candidate(1, 0, down=True), Candidate(1, 5)]
    assert pick(cands, random.Random(1), limits=(1, 5)) is Verdict.WAIT


def test_all_down_are_tried_anyway_in_the_same_order() -> None:
    cands = [Candidate(1, 2, down=True), Candidate(1, 0, down=True), Candidate(1, 5, down=True)]
    assert counts(cands, 200, limits=(1, 5)) == Counter({1: 200})
    assert set(counts(cands, 400)) == {0, 1, 2}


# -- weights -----------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weights_within_a_tier(seed: int) -> None:
    # 2 is over soft; 0 and 1 share the preferred tier 3:1.
    cands = [Candidate(3, 0), Candidate(1, 1), Candidate(10, 2)]
    got = counts(cands, 10_000, seed, limits=(2, 3))
    assert got[2] == 0
    assert 7_200 <= got[0] <= 7_800


def test_same_seed_same_choices() -> None:
    cands = [Candidate(2, 0), Candidate(1, 0), Candidate(1, 0)]
    first = [tag_of(pick(tagged(cands), random.Random(9))) for _ in range(50)]
    again = [tag_of(pick(cands, random.Random(9))) for _ in range(50)]
    assert first == again


# -- the power of two choices ---------------------------------------------------------

def test_p2c_with_two_always_takes_the_less_loaded() -> None:
    assert counts([Candidate(1, 7), Candidate(1, 2)], 500,
                  least_connections=True) == Counter({1: 500})


def test_p2c_compares_per_unit_of_weight() -> None:
    # 3 open on weight 4 (0.75 each) beats 1 open on weight 1.
    assert counts([Candidate(1, 1), Candidate(4, 3)], 500,
                  least_connections=True) == Counter({1: 500})


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_p2c_ties_split_by_weight(seed: int) -> None:
    # Equal load per unit of weight: the first drawn wins, drawn 3:1.
    got = counts([Candidate(3, 3), Candidate(1, 1)], 10_000, seed, least_connections=True)
    assert 7_200 <= got[0] <= 7_800


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_p2c_distribution_over_three(seed: int) -> None:
    # Equal weights, loads 0 < 5 < 10: a pair is two of three, the less
    # loaded of it wins, so the least loaded wins 2/3, the middle 1/3 and
    # the most loaded never.
    got = counts([Candidate(1, 0), Candidate(1, 5), Candidate(1, 10)], 9_000, seed,
                 least_connections=True)
    assert got[2] == 0
    assert 5_700 <= got[0] <= 6_300
    assert got[0] + got[1] == 9_000


def test_p2c_with_limits_picks_within_the_tier() -> None:
    # 0 is the least loaded but down; 1 and 2 are below soft (2 the less
    # loaded); 3 is below hard only, a tier that is not reached.
    cands = [Candidate(1, 0, down=True), Candidate(1, 1), Candidate(1, 0), Candidate(1, 2)]
    assert counts(cands, 300, least_connections=True, limits=(2, 3)) == Counter({2: 300})


def test_p2c_single_candidate() -> None:
    only = Candidate(5, 100)
    assert pick([only], random.Random(1), least_connections=True) is only
