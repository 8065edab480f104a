"""Fault injection: an uploaded problem.npz damaged in transfer (cut short, a flipped byte, a zeroed block, also
inside each member's npy header) is refused with a clear 400 naming what is wrong, or it is bitwise the
undamaged problem (same job id, so the same result). Never a crash, a dropped connection or another problem."""
import json
import urllib.error
import urllib.request

import pytest

from damage import flip_byte, standard_damages, zero_block
from solver_service import Problem, ProblemError, SolverClient
from solver_service.service import SolverService
from solver_service.synthetic import random_problem

TOKEN = "s3cret"
PROBLEM = random_problem(12, 5, 6, 2, seed=0).with_options(backend="fast", seed=1)
BYTES = PROBLEM.to_bytes()
FIELDS = ("problem.npz", "A:", "R:", "b:", "n_features:", "n_per_class:", "option_")


def _header_damages():
    """A flipped byte in each member's npy header (its dict holds dtype and shape) and a zeroed local zip
    header: the places where damage could change what the arrays are rather than their values."""
    damages = []
    start = 0
    while (at := BYTES.find(b"{'descr'", start)) >= 0:
        damages += [flip_byte(at + 11), flip_byte(BYTES.find(b"'shape'", at) + 10)]
        start = at + 1
    return damages + [zero_block(0, 30), flip_byte(lambda size: size - 22)]  # local header; end of central dir


DAMAGES = standard_damages() + _header_damages()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = SolverService(tmp_path_factory.mktemp("faults") / "work", port=0, token=TOKEN).start()
    client = SolverClient(svc.url, token=TOKEN, timeout=30)
    reference = client.solve(PROBLEM, poll_interval=0.05, wait_timeout=120)
    yield svc, client.submit(PROBLEM)["job_id"], reference
    svc.close()


@pytest.mark.parametrize("damage", DAMAGES, ids=repr)
def test_damaged_upload_is_refused_or_unchanged(service, damage, tmp_path):
    svc, job_id, reference = service
    path = tmp_path / "problem.npz"
    path.write_bytes(BYTES)
    damage.apply(path)
    request = urllib.request.Request(svc.url + "/jobs", data=path.read_bytes(), method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            state = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = json.loads(exc.read())["error"]
        assert exc.code == 400, (exc.code, message)
        assert message.startswith("invalid problem: ") and any(f in message for f in FIELDS), message
        return
    # accepted: it must be the very same problem, answered from the cache with the same result
    assert state["job_id"] == job_id and state["cached"] is True, state
    result = SolverClient(svc.url, token=TOKEN).result(job_id)
    assert (result.selected == reference.selected).all() and result.objective == reference.objective


@pytest.mark.parametrize("damage", DAMAGES, ids=repr)
def test_damaged_problem_file_is_refused_naming_it_or_unchanged(damage, tmp_path):
    """The same for a problem.npz on disk (a job folder after a crash, a run folder): the error names the file."""
    path = tmp_path / "problem.npz"
    path.write_bytes(BYTES)
    damage.apply(path)
    try:
        loaded = Problem.load(path)
    except ProblemError as exc:
        assert str(path) in str(exc), exc
        return
    assert loaded.job_id() == PROBLEM.job_id()
