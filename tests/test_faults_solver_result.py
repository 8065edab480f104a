"""Fault injection for the solver's result.npz (tests/damage.py), where it is kept and where it travels:

* cached by the service: a damaged file is never served; it is dropped and its job queued to be solved again
  (with the digest recorded when the result was checked, and for a job recorded before digests, by the full
  check), unless the file still reads as exactly the undamaged selection;
* received by the client: a damaged answer is a SolverServiceError naming the job and the URL (the trainer then
  falls back or stops with that message), unless it still reads as exactly the undamaged selection.
"""

import json
import shutil

import numpy as np
import pytest

from damage import standard_damages
from fake_solver_service import JOB_ID, FakeSolverService
from solver_service import Result, SolverClient, SolverServiceError
from solver_service.jobs import JobManager
from solver_service.service import SolverService
from solver_service.synthetic import random_problem

DAMAGES = standard_damages()


@pytest.fixture(scope="module")
def solved_job(tmp_path_factory):
    """A service workdir holding one solved job; (problem, job id, pristine job folder copy)."""
    workdir = tmp_path_factory.mktemp("faults") / "work"
    service = SolverService(workdir, port=0).start()
    try:
        problem = random_problem(12, 5, 6, 2, seed=0)
        client = SolverClient(service.url, timeout=10)
        client.solve(problem, backend="fast", seed=1, poll_interval=0.05, wait_timeout=60)
        job_id = client.submit(problem, backend="fast", seed=1)["job_id"]
    finally:
        service.close()
    pristine = workdir.parent / "pristine"
    shutil.copytree(workdir / "jobs" / job_id, pristine)
    return problem, job_id, pristine


def _same_selection(data: bytes, reference: Result) -> bool:
    got = Result.from_bytes(data)
    return np.array_equal(got.selected, reference.selected) and np.array_equal(got.assignment, reference.assignment)


@pytest.mark.parametrize("with_digest", [True, False], ids=["digest", "no-digest"])
@pytest.mark.parametrize("damage", DAMAGES, ids=repr)
def test_damaged_cached_result_is_never_served(solved_job, tmp_path, damage, with_digest):
    problem, job_id, pristine = solved_job
    job_dir = tmp_path / "jobs" / job_id
    shutil.copytree(pristine, job_dir)
    state = json.loads((job_dir / "state.json").read_text())
    assert state["state"] == "done" and "result_sha256" in state
    if not with_digest:  # a job finished before digests were recorded: the full check decides
        del state["result_sha256"]
        (job_dir / "state.json").write_text(json.dumps(state))
    damage.apply(job_dir / "result.npz")
    jobs = JobManager(tmp_path)  # not started: a queued job stays queued, nothing is solved here

    data, state = jobs.result_bytes(job_id)
    if data is None:  # detected: dropped and queued to be solved again
        assert state["state"] == "queued" and state["requeued"] == "result missing or damaged"
        assert not (job_dir / "result.npz").exists()
        assert jobs.queue.get_nowait() == job_id
        assert jobs.submit(problem.with_options(backend="fast", seed=1))["cached"] is False
    else:  # served: only if it is exactly the undamaged selection
        assert _same_selection(data, Result.load(pristine / "result.npz"))


@pytest.mark.parametrize("damage", DAMAGES, ids=repr)
def test_damaged_result_received_by_the_client_is_an_error_naming_the_job(solved_job, tmp_path, damage):
    problem, _, pristine = solved_job
    path = tmp_path / "result.npz"
    shutil.copyfile(pristine / "result.npz", path)
    damage.apply(path)
    with FakeSolverService(result=path.read_bytes()) as fake:
        client = SolverClient(fake.url, timeout=5, retries=0)
        try:
            result = client.solve(problem, wait_timeout=10)
        except SolverServiceError as exc:
            assert JOB_ID in str(exc) and fake.url in str(exc)
        else:
            assert _same_selection(result.to_bytes(), Result.load(pristine / "result.npz"))
