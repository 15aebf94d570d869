"""Pairwise (all-pairs) covering arrays: a few cases in which every pair of values of any
two axes appears together at least once (tests/test_combinations.py builds its cases with
it). Deterministic: the same axes give the same cases, in the same order.

Own code rather than a package, because it finds fewer cases, and each case of the
combination suite is several trainer processes. For its 11 axes (four of 3 values, seven
of 2) and one constraint, 2026-12-07: allpairspy 2.5.1 and a plain greedy pass 15 cases,
covertable 3.2.0 13, the greedy pass then shrunk by annealing (below) 11.
"""

import itertools
import math
import random
from collections.abc import Callable

Case = dict[str, object]
Allowed = Callable[[Case], bool]
# Annealing moves tried to cover every pair with one case fewer (about a second each).
SHRINK_MOVES = 20_000


def covering_cases(axes: dict[str, tuple], allowed: Allowed = lambda _: True,
                   seed: int = 0, shrink: bool = True) -> list[Case]:
  """Cases covering every allowed pair of values of two axes.

  Args:
    axes: axis name -> its values, in order.
    allowed: whether a case, or the part of one built so far (a dict holding some of the
      axes), may be run; a pair it refuses on its own needs no case.
    seed: of the annealing's moves.
    shrink: whether to anneal the greedy pass's cases to fewer.
  Returns:
    the cases, each a dict of every axis (in the axes' order), each one `allowed`.
  Raises:
    ValueError: when no allowed case holds a pair that `allowed` accepts.
  """
  cases = _greedy(axes, allowed)
  rng = random.Random(seed)
  while shrink and len(cases) > 1:
    smaller = _anneal(axes, allowed, [dict(c) for c in cases[:-1]], rng)
    if smaller is None:
      break
    cases = smaller
  return cases


def uncovered_pairs(axes: dict[str, tuple], cases: list[Case],
                    allowed: Allowed = lambda _: True) -> set:
  """The allowed pairs that no case holds (empty for covering_cases' answer)."""
  covered = {pair for case in cases for pair in _pairs_of(case)}
  return {pair for pair in _pairs(axes) if allowed(dict(pair)) and pair not in covered}


def _pairs(axes: dict[str, tuple]):
  """Every pair ((axis, value), (later axis, value))."""
  for a, b in itertools.combinations(axes, 2):
    for x, y in itertools.product(axes[a], axes[b]):
      yield ((a, x), (b, y))


def _pairs_of(case: Case):
  """The pairs a case holds (its items in the axes' order, as _pairs makes them)."""
  return itertools.combinations(case.items(), 2)


def _greedy(axes: dict[str, tuple], allowed: Allowed) -> list[Case]:
  """One case at a time, each grown from every uncovered pair in turn; the one covering
  the most uncovered pairs wins (the first in the axes' order on a tie)."""
  names = list(axes)
  order = lambda pair: tuple(i for name, value in pair
                             for i in (names.index(name), axes[name].index(value)))
  uncovered = {pair for pair in _pairs(axes) if allowed(dict(pair))}
  cases = []
  while uncovered:
    candidates = [_grow(axes, pair, uncovered, allowed)
                  for pair in sorted(uncovered, key=order)]
    case = max(candidates, key=lambda case: len(uncovered & set(_pairs_of(case))))
    uncovered -= set(_pairs_of(case))
    cases.append(case)
  return cases


def _grow(axes: dict[str, tuple], pair, uncovered: set, allowed: Allowed) -> Case:
  """A whole case holding `pair`, each other axis taking the first allowed value that
  covers the most uncovered pairs with the values chosen before it."""
  names = list(axes)
  case = dict(pair)
  for name in names:
    if name in case:
      continue
    gains = [(sum(_pair(names, (other, chosen), (name, value)) in uncovered
                  for other, chosen in case.items()), -i, value)
             for i, value in enumerate(axes[name]) if allowed({**case, name: value})]
    if not gains:
      raise ValueError(f"no allowed value of {name} completes the case {case}")
    case[name] = max(gains)[2]
  return {name: case[name] for name in names}


def _pair(names: list[str], first: tuple, second: tuple) -> tuple:
  """Two (axis, value) items as _pairs orders them."""
  return (first, second) if names.index(first[0]) < names.index(second[0]) else (second, first)


def _anneal(axes: dict[str, tuple], allowed: Allowed, cases: list[Case],
            rng: random.Random) -> list[Case] | None:
  """Changes single values of `cases` (simulated annealing on the number of uncovered
  pairs) until they cover every allowed pair; None if SHRINK_MOVES moves do not."""
  names = list(axes)
  wanted = {pair for pair in _pairs(axes) if allowed(dict(pair))}
  counts = dict.fromkeys(wanted, 0)
  for case in cases:
    for pair in _pairs_of(case):
      if pair in counts:
        counts[pair] += 1
  missing = sum(count == 0 for count in counts.values())
  temperature = 2.0
  for _ in range(SHRINK_MOVES):
    if missing == 0:
      return cases
    case = rng.choice(cases)
    name = rng.choice(names)
    value = rng.choice(axes[name])
    old = case[name]
    if value == old or not allowed({**case, name: value}):
      continue
    change = _move(names, case, name, value, counts)
    if change <= 0 or rng.random() < math.exp(-change / temperature):
      missing += change
    else:
      _move(names, case, name, old, counts)
    temperature = max(0.05, temperature * 0.9997)
  return cases if missing == 0 else None


def _move(names: list[str], case: Case, name: str, value, counts: dict) -> int:
  """Sets case[name] to value, updating the pair counts; returns the change in the number
  of uncovered pairs."""
  change = 0
  for other in names:
    if other == name:
      continue
    for sign, current in ((-1, case[name]), (1, value)):
      pair = _pair(names, (other, case[other]), (name, current))
      if pair in counts:
        before = counts[pair]
        counts[pair] += sign
        change += (counts[pair] == 0) - (before == 0)
  case[name] = value
  return change
