"""Every shell command of README.md's ```bash blocks, checked as far as this machine allows (issue 14, item 5).

A command is parsed by the real parser of the program it calls (qpm-dist, torchrun, DeepSpeed's launcher,
data_prep, solver_service, sbatch scripts); a `qpm-dist run` it starts, directly or through a launcher or a
batch script, is checked like `qpm-dist check`: the config with its overrides must be valid, and the only
inputs allowed to be missing are the user's own files listed in USER_FILES. What cannot be checked further is
said per command kind in NOT_RUN; a command of a kind not handled here fails the test (no silent skip).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO

# Inputs the README's commands name that exist on the user's machine, not in a checkout.
USER_FILES = {
    "/data/weights/resnet50.pth": "torchvision's ImageNet ResNet-50 checkpoint, downloaded by the user",
    "data/imagenet": "ImageNet in its official layout (configs/imagenet_*.yaml data.root)",
    "data/CUB_200_2011": "CUB-200-2011 as distributed (configs/cub_*.yaml data.root)",
    "data/synthetic": "written by `make demo` / `qpm-dist make-synthetic` before any demo run",
}

# What is not run, per command kind, and why; the arguments are still parsed where a parser exists.
NOT_RUN = {
    "make": "builds .venv and runs the demo or the suite for minutes: only checked that the target exists",
    "qpm-dist make-synthetic": "writes a dataset (minutes at 1000 classes): arguments parsed only",
    "qpm-dist compare": "reads runs/, which the runs above write: arguments parsed only",
    "python -m data_prep": "reads the user's dataset under /data: arguments parsed only",
    "python -m solver_service": "needs a problem.npz from a run, or a running service and its job id: "
                                "arguments parsed only",
    "sbatch slurm/solver_service.sbatch": "starts a service and writes its URL to the cluster's shared file "
                                          "system (/shared): the script's syntax and its argument count only "
                                          "(tests/test_slurm.py runs it against a stand-in service)",
}


@dataclass
class Command:
    line: int
    argv: list[str]

    def __str__(self) -> str:
        return f"README.md:{self.line}: {shlex.join(self.argv)}"


def readme_commands() -> list[Command]:
    """The commands of every ```bash block: continuation lines joined, comments and VAR=value prefixes dropped."""
    commands, in_block, pending, start = [], False, "", 0
    for number, text in enumerate((REPO / "README.md").read_text().splitlines(), 1):
        if text.startswith("```"):
            in_block = text == "```bash"
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        pending += text
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        argv = shlex.split(pending, comments=True)
        pending = ""
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
            argv = argv[1:]
        if argv:
            commands.append(Command(start, argv))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_test_is_about():
    kinds = {c.argv[0] for c in COMMANDS}
    assert {"qpm-dist", "torchrun", "deepspeed", "sbatch", "python", "make"} <= kinds, kinds
    assert len(COMMANDS) >= 25, [str(c) for c in COMMANDS]


def check_run_args(argv: list[str]) -> None:
    """`qpm-dist run|check ARGS`: the config and overrides valid, only the user's own inputs missing."""
    from qpm_dist import cli

    args = parse_qpm_dist(["check", *argv])
    lines, missing = cli.check_run(args)  # raises on a bad config, --plugin or --stage
    assert lines[0].endswith(": valid")
    for message in missing:
        found = re.search(r"not found: (\S+)", message)
        assert found and found.group(1) in USER_FILES, f"missing input that is not the user's: {message}"


def parse_qpm_dist(argv: list[str]) -> argparse.Namespace:
    """As `qpm_dist.cli.main` parses: overrides may follow options."""
    from qpm_dist import cli

    parser = cli.build_parser()
    args, extra = parser.parse_known_args(argv)
    assert not extra or (hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra)), extra
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def check_qpm_dist(argv: list[str]) -> None:
    from qpm_dist import launching

    command = argv[0]
    if command == "make-synthetic":
        from data_prep.__main__ import build_parser

        build_parser().parse_args(argv)  # NOT_RUN["qpm-dist make-synthetic"]
        return
    if command == "launch":
        opts = launching.build_parser().parse_args(argv[1:])
        launching._check_config(opts)
        launching.build_command(opts)  # the torchrun / deepspeed command line, as printed or run
        check_run_args([opts.config, *opts.run_args])
        return
    args = parse_qpm_dist(argv)
    if command in ("run", "check"):
        check_run_args(argv[1:])
    elif command == "print-config":
        assert args.func(args) == 0
    elif command == "demo":
        from qpm_dist import cli
        from qpm_dist.config import load_config

        for _, path in cli.demo_configs(args.config, args.methods):
            load_config(path, [f"data.root={args.data}", *args.overrides])
        assert args.data in USER_FILES
    elif command == "compare":
        pass  # NOT_RUN["qpm-dist compare"]
    elif command == "iis":
        from qpm_dist import cli

        cli.iis_config(args)  # the config, overrides and --backbone resolved and validated; nothing runs
    else:
        raise AssertionError(f"qpm-dist {command}: not handled by this test")


def check_torchrun(argv: list[str]) -> None:
    from torch.distributed.run import parse_args

    args = parse_args(argv)
    assert args.module and args.training_script == "qpm_dist", argv
    check_qpm_dist(args.training_script_args)


def check_deepspeed(argv: list[str]) -> None:
    from deepspeed.launcher.runner import parse_args

    args = parse_args(argv)
    assert (REPO / args.user_script).is_file() and args.user_script == "launch/train.py", args.user_script
    check_qpm_dist([a for a in args.user_args if not a.startswith(("--local_rank", "--local-rank"))])


def check_sbatch(argv: list[str], tmp_path: Path) -> None:
    """The batch script runs as sbatch would run it, against the stand-in SLURM commands of tests/fake_slurm
    (srun records its command and exits 0); each `qpm-dist launch --run ...` it hands to srun is then checked."""
    from test_slurm import FakeSlurm

    script = next(a for a in argv if not a.startswith("-"))
    assert (REPO / script).is_file(), script
    if Path(script).name == "solver_service.sbatch":  # NOT_RUN["sbatch slurm/solver_service.sbatch"]
        subprocess.run(["bash", "-n", str(REPO / script)], check=True)
        assert len(argv) - argv.index(script) - 1 == 1, argv
        return
    slurm = FakeSlurm(tmp_path)
    proc = slurm.sbatch(*argv)
    assert proc.returncode == 0, proc.stderr
    launches = [c["argv"][c["argv"].index("qpm_dist") + 1:] for c in slurm.calls("srun")]
    (submitted,) = slurm.calls("sbatch")
    if "array" in submitted["options"]:  # one task per run line of the sweep file, none left out
        first, _, last = submitted["options"]["array"].partition("%")[0].partition("-")
        sweep = (REPO / submitted["args"][0]).read_text().splitlines()
        runs = [line for line in sweep if line.strip() and not line.lstrip().startswith("#")]
        assert (int(first), int(last)) == (0, len(runs) - 1), f"--array for {len(runs)} run lines"
        assert len(launches) == len(runs), launches
    assert launches and all(launch[0] == "launch" for launch in launches), launches
    for launch in launches:
        check_qpm_dist(launch)


def check_python_module(argv: list[str]) -> None:
    assert argv[0] == "-m", argv
    module, rest = argv[1], argv[2:]
    if module == "qpm_dist":
        check_qpm_dist(rest)
    elif module == "data_prep":
        from data_prep.__main__ import build_parser

        build_parser().parse_args(rest)  # NOT_RUN["python -m data_prep"]
    elif module == "solver_service":
        from solver_service.cli import build_parser

        build_parser().parse_args(rest)  # NOT_RUN["python -m solver_service"]
    else:
        raise AssertionError(f"python -m {module}: not handled by this test")


def check_make(argv: list[str]) -> None:
    # NOT_RUN["make"]: `make -n` prints what the target would run, and fails for a target that does not exist.
    subprocess.run(["make", "-n", "-C", str(REPO), *argv], check=True, capture_output=True)


CHECKERS = {"qpm-dist": check_qpm_dist, "torchrun": check_torchrun, "deepspeed": check_deepspeed,
            "sbatch": check_sbatch, "python": check_python_module, "make": check_make}


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_readme_command(command, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the README's commands run from the repository root
    program, *argv = command.argv
    assert program in CHECKERS, f"{command}: a command this test does not check; add a checker or a NOT_RUN reason"
    try:
        CHECKERS[program](*([argv, tmp_path] if program == "sbatch" else [argv]))
    except SystemExit as exc:  # argparse's exit on bad arguments
        pytest.fail(f"{command}: arguments rejected (exit {exc.code})")
    except Exception as exc:
        pytest.fail(f"{command}: {type(exc).__name__}: {exc}")
