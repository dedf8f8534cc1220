# -*- test-case-name: tests.properties.test_lb -*-
"""
Every load-balancing policy, under any sequence of health, drain, ejection,
breaker and panic changes, exclusions, keys, starts and finishes: a pick is
always an eligible backend outside C{exclude}, and it is L{None} only when
there is no such backend.
"""

from __future__ import annotations

from random import Random

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster import lb
from balance.cluster.lb.options import Options
from tests.cluster.support import backends

FLAGS = ("healthy", "ejected", "drained", "circuit_open", "panic")

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("flag"), st.integers(0, 7), st.sampled_from(FLAGS), st.booleans()),
        st.tuples(
            st.just("pick"),
            st.one_of(st.none(), st.binary(max_size=8)),
            st.sets(st.integers(0, 7), max_size=4),
        ),
        st.tuples(st.just("finish"), st.integers(0, 20)),
        st.tuples(st.just("tick"), st.floats(0, 5)),
        st.tuples(st.just("update"), st.integers(1, 8)),
    ),
    max_size=60,
)


class PolicyProperties(SynchronousTestCase):
    def run_policy(self, name, weights, steps, seed):
        clock = Clock()
        pool = backends(*weights)
        current = list(pool)
        policy = lb.make(name, current, Options(rng=Random(seed), clock=clock))
        in_flight = []
        for step in steps:
            kind = step[0]
            if kind == "flag":
                _, i, flag, value = step
                setattr(pool[i % len(pool)], flag, value)
            elif kind == "tick":
                clock.advance(step[1])
            elif kind == "update":
                current = pool[: step[1]]
                policy.update(current)
            elif kind == "finish":
                if in_flight:
                    backend = in_flight.pop(step[1] % len(in_flight))
                    backend.active -= 1
                    policy.finished(backend)
                    policy.observe(backend, 0.01 * (1 + step[1]))
            else:
                _, key, excluded = step
                exclude = {current[i] for i in excluded if i < len(current)}
                choice = policy.pick(key, exclude)
                allowed = [b for b in current if b.eligible and b not in exclude]
                if choice is None:
                    self.assertEqual(allowed, [], (name, key, exclude))
                    continue
                self.assertIn(choice, current, name)
                self.assertTrue(choice.eligible, (name, choice))
                self.assertNotIn(choice, exclude, name)
                choice.active += 1
                policy.started(choice)
                in_flight.append(choice)

    @given(
        st.sampled_from(sorted(lb.POLICIES)),
        st.lists(st.integers(1, 10), min_size=1, max_size=8),
        STEPS,
        st.integers(0, 2**32),
    )
    def test_never_an_unavailable_backend(self, name, weights, steps, seed):
        self.run_policy(name, weights, steps, seed)
