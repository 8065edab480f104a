"""Command line: `python -m solver_service {solve,serve,submit,status,fetch,cancel,generate,run-job} ...`.

Exit codes: 0 success, 2 bad input (a missing or invalid file, a request the service refuses: wrong token,
unknown job), 69 the service is unreachable or gave no usable answer (retry later). Errors are one line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .util import LOGGER_NAME

TOKEN_ENV = "SOLVER_SERVICE_TOKEN"
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 69  # sysexits.h EX_UNAVAILABLE


def _solver_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["auto", "fast", "highs", "gurobi"], help="default: auto (or the problem's)")
    p.add_argument("--time-limit", type=float, help="seconds (hard cap for the backend)")
    p.add_argument("--mip-gap", type=float, help="relative gap for exact backends (default 1e-6)")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--effort", type=float, help="multiplies the iteration budgets of fast (default 1)")
    p.add_argument("--tau", type=float, help="penalise exactly the pairs with R+ >= tau")
    p.add_argument("--penalty", choices=["clique", "all"])
    p.add_argument("--prefer-gurobi", action="store_true", default=None)


def _options(args) -> dict:
    keys = ("backend", "time_limit", "mip_gap", "threads", "seed", "effort", "tau", "penalty", "prefer_gurobi")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _token(args) -> str | None:
    """From --token-file, else --token (clients only), else $SOLVER_SERVICE_TOKEN: a file or the environment
    keep the token out of `ps`, which shows every user the command lines on the node."""
    if getattr(args, "token_file", None):
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {args.token_file} is empty")
        return token
    return getattr(args, "token", None) or os.environ.get(TOKEN_ENV)


def _client(args):
    from .client import SolverClient

    try:
        token = _token(args)
    except (ValueError, OSError) as exc:
        raise SystemExit(_fail(f"{args.command}: {exc}", EXIT_BAD_INPUT)) from None
    return SolverClient(args.url, token=token, timeout=args.timeout, retries=args.retries)


def _serve_options(p: argparse.ArgumentParser) -> None:
    from .limits import ServiceLimits

    d = ServiceLimits()
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (see workdir/service.json)")
    p.add_argument("--token-file", help=f"file holding the bearer token clients must send (or ${TOKEN_ENV}; "
                                        "never on the command line, where `ps` shows it)")
    p.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS only; clients trust it via SSL_CERT_FILE")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert (if not inside that file)")
    p.add_argument("--workdir", default="solver_work")
    p.add_argument("--workers", type=int, default=1, help="jobs solved at the same time")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="largest accepted request body (bytes)")
    p.add_argument("--max-uncompressed-bytes", type=int, default=d.max_uncompressed_bytes,
                   help="largest total size of a problem's arrays once expanded (bytes)")
    p.add_argument("--max-features", type=int, default=d.max_features, help="largest F of a problem")
    p.add_argument("--max-classes", type=int, default=d.max_classes, help="largest C of a problem")
    p.add_argument("--max-threads", type=int, default=d.max_threads,
                   help="largest `threads` option (default: the cores this process may use)")
    p.add_argument("--default-time-limit", type=float, default=d.default_time_limit,
                   help="seconds, for jobs that name no time limit")
    p.add_argument("--max-time-limit", type=float, default=d.max_time_limit, help="largest time limit a job may name")
    p.add_argument("--max-queued", type=int, default=d.max_queued,
                   help="jobs waiting for a worker; more are refused with 503")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help="seconds a connection may stay silent before it is closed")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="connections served at once; more are refused with 503")
    p.add_argument("--keep-days", type=float, default=d.keep_seconds / 86400,
                   help="finished jobs older than this are removed")
    p.add_argument("--keep-gb", type=float, default=d.keep_bytes / 1024 ** 3,
                   help="the oldest finished jobs are removed while all jobs hold more than this")


def _serve(args) -> int:
    from .limits import ServiceLimits
    from .service import SolverService

    try:
        limits = ServiceLimits(
            max_bytes=args.max_bytes, max_uncompressed_bytes=args.max_uncompressed_bytes,
            max_features=args.max_features, max_classes=args.max_classes, max_threads=args.max_threads,
            max_queued=args.max_queued,
            default_time_limit=args.default_time_limit, max_time_limit=args.max_time_limit,
            read_timeout=args.read_timeout, max_connections=args.max_connections,
            keep_seconds=args.keep_days * 86400, keep_bytes=max(1, int(args.keep_gb * 1024 ** 3)))
        service = SolverService(args.workdir, args.host, args.port, _token(args), workers=args.workers,
                                limits=limits, tls_cert=args.tls_cert, tls_key=args.tls_key)
    except (ValueError, OSError) as exc:  # a bad limit, a missing certificate, a port in use
        return _fail(f"serve: {exc}", EXIT_BAD_INPUT)
    print(f"listening on {service.url}", flush=True)
    service.serve_forever()
    return 0


def main(argv=None) -> int:
    """The command's exit code; errors the user can act on are one line on stderr, not a traceback."""
    from .client import SolverServiceError
    from .problem import ProblemError

    try:
        return _main(argv)
    except SolverServiceError as exc:
        bad_input = exc.http_status is not None and 400 <= exc.http_status < 500
        return _fail(str(exc), EXIT_BAD_INPUT if bad_input else EXIT_UNAVAILABLE)
    except (ProblemError, OSError) as exc:  # a missing/unreadable/invalid file, a port in use, ...
        return _fail(str(exc), EXIT_BAD_INPUT)


def _fail(message: str, code: int) -> int:
    print(f"solver_service: error: {message}", file=sys.stderr, flush=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m solver_service", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("solve", help="solve a problem.npz locally")
    p.add_argument("problem")
    p.add_argument("--out", required=True, help="result .npz to write")
    _solver_options(p)

    # no abbreviations: `--token SECRET` must not be taken for `--token-file`
    p = sub.add_parser("serve", help="run the HTTP solver service", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _serve_options(p)

    for name, help_ in (("submit", "submit a problem.npz to a service"), ("status", "show a job's state"),
                        ("fetch", "download a job's result"), ("cancel", "stop a queued or running job")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--url", required=True)
        p.add_argument("--token", help=f"bearer token (or --token-file, or ${TOKEN_ENV})")
        p.add_argument("--token-file", help="file holding the bearer token")
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--retries", type=int, default=3)
        if name == "submit":
            p.add_argument("problem")
            _solver_options(p)
        else:
            p.add_argument("job_id")
        if name == "fetch":
            p.add_argument("--out", required=True)
            p.add_argument("--wait", action="store_true", help="poll until the job is done")

    p = sub.add_parser("generate", help="write a realistic synthetic problem (see synthetic.py)")
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--n-features", type=int, default=50)
    p.add_argument("--n-per-class", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = sub.add_parser("run-job", help=argparse.SUPPRESS)
    p.add_argument("job_dir")

    return parser


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s" if args.command == "serve" else "%(message)s")
    logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING if args.quiet else logging.INFO)

    if args.command == "solve":
        from .problem import Problem
        from .solve import solve

        result = solve(Problem.load(args.problem), **_options(args))
        result.save(args.out)
        print(result.summary())
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "submit":
        from .problem import Problem

        print(json.dumps(_client(args).submit(Problem.load(args.problem), **_options(args)), indent=2))
        return 0
    if args.command == "status":
        print(json.dumps(_client(args).status(args.job_id), indent=2))
        return 0
    if args.command == "cancel":
        print(json.dumps(_client(args).cancel(args.job_id), indent=2))
        return 0
    if args.command == "fetch":
        import time

        from .client import SolverServiceError

        client = _client(args)
        while True:
            while args.wait and client.status(args.job_id)["state"] in ("queued", "running"):
                time.sleep(1.0)
            try:
                result = client.result(args.job_id)
                break
            except SolverServiceError as exc:  # 409 after done: the service re-solves a missing/damaged result
                if not (args.wait and exc.http_status == 409):
                    raise
        result.save(args.out)
        print(result.summary())
        return 0
    if args.command == "generate":
        from .synthetic import realistic_problem

        realistic_problem(args.features, args.classes, args.n_features, args.n_per_class, seed=args.seed).save(args.out)
        print(f"wrote {args.out}")
        return 0
    if args.command == "run-job":
        from .jobs import run_job

        return run_job(Path(args.job_dir))
    return 2
