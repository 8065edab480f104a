import io

import numpy as np
import pytest

from solver_service import Problem, ProblemError
from solver_service.synthetic import random_problem


def base(**changes):
    rng = np.random.default_rng(0)
    A = rng.uniform(-1, 1, (6, 3))
    R = np.corrcoef(A)
    fields = dict(A=A, R=R, b=rng.uniform(-0.3, 0.3, 6), n_features=4, n_per_class=2)
    fields.update(changes)
    return fields


@pytest.mark.parametrize("changes, field, words", [
    (dict(A=np.zeros(6)), "A", "2-D"),
    (dict(A=np.full((6, 3), np.nan)), "A", "finite"),            # bug 15: zero-variance features give NaN
    (dict(A=np.full((6, 3), 2.0)), "A", "[-1, 1]"),
    (dict(A=np.zeros((6, 3), dtype=complex)), "A", "real numeric"),
    (dict(A=np.zeros((0, 3))), "A", "at least one"),
    (dict(R=np.eye(5)), "R", "(6, 6)"),
    (dict(R=np.triu(np.ones((6, 6)))), "R", "symmetric"),
    (dict(R=np.full((6, 6), np.inf)), "R", "finite"),
    (dict(b=np.zeros(5)), "b", "(6,)"),
    (dict(b=np.array([0, 0, 0, np.inf, 0, 0])), "b", "finite"),
    (dict(n_features=0), "n_features", "1 <= n_features"),
    (dict(n_features=7), "n_features", "<= F = 6"),
    (dict(n_features=2.5), "n_features", "integer"),
    (dict(n_per_class=0), "n_per_class", "1 <= n_per_class"),
    (dict(n_per_class=5), "n_per_class", "<= n_features = 4"),
    (dict(n_features=3, n_per_class=3), "n_per_class", "C(3,3) = 1"),   # 3 classes, 1 possible set
])
def test_each_bad_field_is_named(changes, field, words):
    with pytest.raises(ProblemError) as err:
        Problem.create(**base(**changes))
    assert err.value.field == field
    assert words in str(err.value)


@pytest.mark.parametrize("options, field", [
    (dict(colour="red"), "colour"),
    (dict(backend="cplex"), "backend"),
    (dict(penalty="some"), "penalty"),
    (dict(time_limit=-1.0), "time_limit"),
    (dict(seed="1"), "seed"),
    (dict(mip_gap=1.5), "mip_gap"),
    (dict(tau=0.5, penalty="all"), "tau"),
])
def test_bad_options_are_named(options, field):
    with pytest.raises(ProblemError) as err:
        Problem.create(**base(), options=options)
    assert err.value.field == field


def test_round_trip_keeps_arrays_options_and_hash(tmp_path):
    p = random_problem(12, 5, 6, 2, seed=1, backend="fast", time_limit=3.5, tau=0.2)
    p.save(tmp_path / "p.npz")
    q = Problem.load(tmp_path / "p.npz")
    assert q.content_hash() == p.content_hash() and q.job_id() == p.job_id()
    assert dict(q.options) == {"backend": "fast", "time_limit": 3.5, "tau": 0.2}
    np.testing.assert_array_equal(q.A, p.A)


def test_hash_sees_every_byte_dtype_and_integer_field():
    p = random_problem(12, 5, 6, 2, seed=1)
    A = p.A.copy()
    A[3, 2] = np.nextafter(A[3, 2], 2)
    variants = [
        Problem.create(A, p.R, p.b, 6, 2),
        Problem.create(p.A.astype(np.float32), p.R, p.b, 6, 2),
        Problem.create(p.A, p.R, p.b, 7, 2),
        Problem.create(p.A, p.R, p.b, 6, 3),
    ]
    hashes = {p.content_hash()} | {v.content_hash() for v in variants}
    assert len(hashes) == 5
    assert p.with_options(seed=1).job_id() != p.job_id()
    assert p.with_options(seed=1).content_hash() == p.content_hash()


def test_npz_with_pickled_objects_is_refused():
    p = random_problem(8, 3, 4, 2, seed=0)
    buf = io.BytesIO()
    np.savez(buf, A=p.A, R=p.R, b=np.array([object()] * 8, dtype=object), n_features=4, n_per_class=2)
    with pytest.raises(ProblemError, match="object arrays"):
        Problem.from_bytes(buf.getvalue())


def test_npz_missing_or_unknown_entries():
    p = random_problem(8, 3, 4, 2, seed=0)
    buf = io.BytesIO()
    np.savez(buf, A=p.A, R=p.R, n_features=4, n_per_class=2)
    with pytest.raises(ProblemError) as err:
        Problem.from_bytes(buf.getvalue())
    assert err.value.field == "b"
    buf = io.BytesIO()
    np.savez(buf, A=p.A, R=p.R, b=p.b, n_features=4, n_per_class=2, extra=1)
    with pytest.raises(ProblemError, match="unknown entry"):
        Problem.from_bytes(buf.getvalue())
    with pytest.raises(ProblemError, match="npz"):
        Problem.from_bytes(b"not a zip file")
