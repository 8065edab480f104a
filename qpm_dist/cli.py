"""`qpm-dist` command line: run | check | demo | iis | compare | make-synthetic | print-config | launch.

Exit codes: 0 success, 2 bad input (config, paths, files; reported before any training starts; a damaged
output of a finished stage; only errors naming such input: any other error inside a stage, a missing file
included, is a crash), 3 training diverged (NaN/inf loss, or a stage's weights/results are NaN/inf: nothing
of it was saved or marked finished; rerunning the same command would diverge again), 75 stopped by
SIGTERM/SIGUSR1 in any stage (rerun the same command: a training stage resumes from its checkpoint, any other
stage restarts), 69 the solver service failed with qpm.solver.fallback_local=false, 1 a bug or crash.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from qpm_dist.launching import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_UNAVAILABLE


def _fail(message: str) -> int:
    print(f"qpm-dist: error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def missing_inputs(cfg) -> list[str]:
    """Every file or folder the run names that is not there, one message each (key, path, what is expected)."""
    problems = []
    if cfg.data.backend != "folder":
        if not Path(cfg.data.converted).is_dir():
            problems.append(f"data.converted: folder not found: {cfg.data.converted} (create it with "
                            f"`python -m data_prep to-{cfg.data.backend}`)")
    elif not Path(cfg.data.root).exists():
        hint = " (create it with `qpm-dist make-synthetic`)" if cfg.data.dataset == "synthetic" else ""
        problems.append(f"data.root: dataset folder not found: {cfg.data.root}{hint}")
    # travelingbirds' CUB folder (its attributes are read on every backend); pre-cropped images (folder backend)
    read = ("cub_root", "crop_root") if cfg.data.backend == "folder" else ("cub_root",)
    for key in read:
        folder = getattr(cfg.data, key)
        if folder and not Path(folder).is_dir():
            problems.append(f"data.{key}: folder not found: {folder}")
    if cfg.model.weights and not Path(cfg.model.weights).expanduser().is_file():
        problems.append(f"model.weights: file not found: {cfg.model.weights}")
    elif cfg.model.weights:  # readable, and fits model.arch: not a traceback from every rank once a stage starts
        from qpm_dist.models.backbones import check_weights_file

        check_weights_file(cfg.model)  # raises BadInput: a file that is there but unusable is not "missing"
    if cfg.engine.strategy == "deepspeed" and not Path(cfg.engine.deepspeed_config).is_file():
        problems.append(f"engine.deepspeed_config: file not found: {cfg.engine.deepspeed_config}")
    return problems


def _preflight(cfg) -> None:
    """Check the files a run names, so a typo fails in seconds and not after hours."""
    problems = missing_inputs(cfg)
    if problems:
        raise FileNotFoundError(problems[0])


def _load_config(args: argparse.Namespace, path, overrides):
    """The plugins named by --plugin (they may register methods), then the config."""
    from qpm_dist import methods
    from qpm_dist.config import load_config

    methods.load_plugins(args.plugin)
    return load_config(path, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    # Config and paths are checked before any data is read or any process group is formed.
    from qpm_dist.config import ConfigError
    from qpm_dist.errors import BadInput

    try:
        cfg = _load_config(args, args.config, args.overrides)
        _preflight(cfg)
    except (ConfigError, BadInput, FileNotFoundError, ImportError) as exc:
        return _fail(str(exc))
    return execute(cfg, args.stage)


def execute(cfg, stage: str | None = None, done=None) -> int:
    """Run a loaded, checked config's stages (or `stage` and what it needs) in this process group; on success
    `done(ctx, summaries)` runs before the group is shut down (e.g. to print results). Returns the exit code."""
    from qpm_dist import dist, methods
    from qpm_dist.config import save_config
    from qpm_dist.data.integrity import plain_message
    from qpm_dist.data.sources import build_datasets
    from qpm_dist.errors import BadInput
    from qpm_dist.engine.preemption import PREEMPTED_EXIT_CODE, Preempted
    from qpm_dist.engine.trainer import NonFiniteError
    from qpm_dist.stages.runner import RunContext, run_stages
    from qpm_dist.utils import log, setup_logging
    from solver_service import SolverServiceError

    spec = methods.get(cfg.method)
    stages = spec.stages(cfg)
    if stage is not None and stage not in [s.name for s in stages]:
        return _fail(f"--stage: unknown stage {stage!r}; {cfg.method} has: {', '.join(s.name for s in stages)}")

    info = dist.init(cfg.engine.device, cfg.engine.timeout_s)
    setup_logging(info.rank)
    try:
        try:
            data = build_datasets(cfg.data, cfg.run.seed)
        except (FileNotFoundError, ValueError) as exc:
            return _fail(str(exc))
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        log.info("run %s: %d ranks (%s), %s, %d train / %d test images, %d classes", run_dir, info.world_size,
                 info.backend, info.device, data.num_samples("train"), data.num_samples("test"), data.num_classes)
        ctx = RunContext(cfg=cfg, info=info, run_dir=run_dir, data=data, method=spec)
        try:
            summaries = run_stages(stages, ctx, stage)
        except Preempted as exc:
            log.warning("%s", exc)
            return PREEMPTED_EXIT_CODE
        except BadInput as exc:  # not any FileNotFoundError: an unexpected one is a crash (exit 1)
            return _fail(plain_message(exc))  # also a damaged image met in a loader worker
        except NonFiniteError as exc:
            print(f"qpm-dist: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_NONFINITE
        except SolverServiceError as exc:  # only with qpm.solver.fallback_local=false, else it solves in process
            print(f"qpm-dist: error: the solver service failed: {exc}", file=sys.stderr, flush=True)
            return EXIT_UNAVAILABLE
        for name, record in summaries.items():
            test = (record.get("summary") or {}).get("test")
            if test:
                log.info("stage %s: test top-1 %.2f%% (%s)", name, test["acc"], ctx.outputs[name])
        if done is not None:
            done(ctx, summaries)
        return 0
    finally:
        dist.shutdown()


def check_run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """What `qpm-dist run` with these arguments would do, without doing it: (lines describing the run, the
    input files and folders that are missing). A bad config, plugin or --stage raises ConfigError/ImportError/
    ValueError; missing inputs are returned apart, so a caller can tell "the config is valid" from "the
    files are here" (the README's commands name files of the user's machine)."""
    from qpm_dist import methods

    cfg = _load_config(args, args.config, args.overrides)
    stages = [s.name for s in methods.get(cfg.method).stages(cfg)]
    if args.stage is not None and args.stage not in stages:
        raise ValueError(f"--stage: unknown stage {args.stage!r}; {cfg.method} has: {', '.join(stages)}")
    source = (f"{cfg.data.backend} data at {cfg.data.converted}" if cfg.data.backend != "folder"
              else f"{cfg.data.dataset} images at {cfg.data.root}")
    lines = [f"config {args.config}: valid",
             f"method {cfg.method}, stages {', '.join(stages)}" + (f" (--stage {args.stage})" if args.stage else ""),
             f"data: {source}",
             f"model: {cfg.model.arch}, weights {cfg.model.weights or 'none (random initialisation)'}",
             f"engine: {cfg.engine.strategy} on {cfg.engine.device}, outputs in {Path(cfg.run.out_dir) / cfg.run.name}"]
    return lines, missing_inputs(cfg)


def cmd_check(args: argparse.Namespace) -> int:
    """`qpm-dist check`: the config and the input paths of a run, checked in a second; nothing is started."""
    from qpm_dist.config import ConfigError
    from qpm_dist.errors import BadInput

    try:
        lines, missing = check_run(args)
    except (ConfigError, BadInput, ImportError, ValueError) as exc:  # BadInput: an input file that is unfit
        return _fail(str(exc))
    print("\n".join(lines), flush=True)
    if missing:
        return _fail("; ".join(missing))
    print("inputs: all found", flush=True)
    return 0


def cmd_print_config(args: argparse.Namespace) -> int:
    import yaml

    from qpm_dist.config import ConfigError, to_dict

    try:
        cfg = _load_config(args, args.config, args.overrides)
    except (ConfigError, ImportError) as exc:
        return _fail(str(exc))
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_make_synthetic(argv: list[str]) -> int:
    from data_prep.__main__ import main as data_prep_main

    return data_prep_main(["make-synthetic", *argv])


def demo_methods() -> list[str]:
    """The registered methods that have a demo config, in registry order."""
    from qpm_dist import methods

    return [spec.name for spec in methods.all_specs() if spec.demo_config]


def demo_configs(config: str, names: str) -> list[tuple[str, Path]]:
    """(method, config) for `qpm-dist demo --methods`: each method's demo config (its spec's `demo_config`) from
    the folder of --config, and --config itself for the method whose demo config has its file name (QPM's
    demo.yaml by default). The demo configs share the dense stage: same data, model and dense settings, same
    run directory."""
    from qpm_dist import methods

    available = demo_methods()
    chosen = [m.strip() for m in names.split(",") if m.strip()] if names else available
    out = []
    for method in chosen:
        if method not in available:
            raise ValueError(f"--methods: unknown method {method!r}; expected some of {','.join(available)}")
        demo = methods.get(method).demo_config
        out.append((method, Path(config) if demo == Path(config).name else Path(config).parent / demo))
    if not out:
        raise ValueError(f"--methods: expected at least one of {','.join(available)}")
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the embedded dataset (once), run each method's stages with `nproc` CPU processes under
    torchrun (every method with a demo config, on the same dense model), then print the headline numbers, the
    methods side by side and where the reports are."""
    from data_prep.synthetic import generate
    from qpm_dist import methods
    from qpm_dist.config import ConfigError, load_config

    root = Path(args.data)
    try:
        methods.load_plugins(args.plugin)
        runs = demo_configs(args.config, args.methods)
        configs = [(method, path, load_config(path, [f"data.root={root}", *args.overrides])) for method, path in runs]
    except (ConfigError, ValueError, ImportError) as exc:
        return _fail(str(exc))
    if not (root / "synthetic.json").is_file():
        print(f"qpm-dist demo: generating the synthetic dataset in {root}", flush=True)
        generate(root, progress=True)
    iis_file = Path(args.config).parent / DEMO_IIS_CONFIG
    if args.iis and not iis_file.is_file():
        return _fail(f"--iis: {iis_file} not found (its iis section sets how the demo scores backbones)")
    env = {**os.environ, **demo_environment(os.environ)}
    plugins = [f"--plugin={name}" for name in args.plugin]
    for method, path, _ in configs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "qpm_dist", "run", str(path), *plugins, f"data.root={root}", *args.overrides]
        print(f"qpm-dist demo ({method}):", " ".join(cmd), flush=True)
        code = subprocess.call(cmd, env=env)
        if code != 0:
            return code
    if args.iis:
        for path, backbone in demo_iis_runs(configs):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   "-m", "qpm_dist", "iis", str(path), "--backbone", backbone, *plugins, f"data.root={root}",
                   *iis_overrides(iis_file), *args.overrides]
            print(f"qpm-dist demo (IIS of {backbone}, {path.name}):", " ".join(cmd), flush=True)
            code = subprocess.call(cmd, env=env)
            if code != 0:
                return code
    method, _, cfg = configs[0]
    print(demo_summary(Path(cfg.run.out_dir) / cfg.run.name), flush=True)
    if len(configs) > 1:
        from qpm_dist.report.compare import write_comparison

        text, page = write_comparison(Path(cfg.run.out_dir))
        print(f"\n  methods side by side (also in every report and {page}):\n{text}", flush=True)
    return 0


DEMO_IIS_CONFIG = "demo_iis.yaml"  # next to --config: its `iis` section is what `qpm-dist demo --iis` scores with


def demo_iis_runs(configs: list[tuple[str, Path, Any]]) -> list[tuple[Path, str]]:
    """(config, backbone) of every IIS `qpm-dist demo --iis` runs: the first config's architecture at random
    initialisation, then for each method its evaluated dense baseline (once per distinct dense model: the sparse-head
    methods share one) and its final model, each under the method's own config, so the IIS scores the very stage
    the method's evaluation scored (same content key) and its row lands in that column of the comparison."""
    from qpm_dist import methods
    from qpm_dist.config import to_dict

    runs, dense_models = [(configs[0][1], "random")], set()
    for method, path, cfg in configs:
        for stage in methods.get(method).stages(cfg):
            final = getattr(stage, "final_stage", None)
            if stage.name != f"{method}_evaluate" or final is None:
                continue
            baseline = getattr(stage, "baseline", None)
            dense = json.dumps([to_dict(cfg.data), to_dict(cfg.model), to_dict(getattr(cfg, baseline or "dense"))],
                               sort_keys=True, default=str)
            if baseline and dense not in dense_models:
                dense_models.add(dense)
                runs.append((path, baseline))
            runs.append((path, final))
    return runs


def iis_overrides(path: Path) -> list[str]:
    """The `iis` section of `path` (configs/demo_iis.yaml) as dotted overrides, except the backbone it names."""
    import yaml

    def flat(prefix: str, value: Any) -> list[str]:
        if isinstance(value, dict):
            return [line for key, sub in value.items() for line in flat(f"{prefix}.{key}", sub)]
        return [f"{prefix}={json.dumps(value, separators=(',', ':'))}"]  # no spaces: copyable

    section = dict((yaml.safe_load(path.read_text()) or {}).get("iis") or {})
    section.pop("backbone", None)
    return flat("iis", section)


def demo_environment(current: dict) -> dict[str, str]:
    """What the demo pins (unless already set) so that a seed prints the same numbers on every machine it can:
    one thread per rank, and on x86 the AVX2 kernels of PyTorch and oneDNN (the same float rounding on AVX2 and
    AVX-512 CPUs: with AVX-512 kernels the demo's dense accuracy moves from 86.3 to 86.1 %). wandb keeps its
    records in the run folders but prints no run summary after every stage."""
    pinned = {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    if platform.machine().lower() in ("x86_64", "amd64"):
        pinned.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    return {key: current.get(key, value) for key, value in pinned.items()}


POINTING_HEADLINE = ("pointing_game", "stochastic_pointing", "content_heatmap")
POINTING_NAMES = {"pointing_game": "pointing game", "stochastic_pointing": "stochastic pointing game",
                  "content_heatmap": "content heatmap"}


# prototype methods (PixPNet): each score for the receptive-field mapping, ProtoPNet's upsampling and a random one
MAPPING_HEADLINE = (("consistency_hard", "consistency"), ("stability_hard", "stability"), ("rot_area", "ROT area"))
MAPPINGS = {"ours": "receptive field", "upsample": "upsampling", "random": "random"}


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def demo_summary(run_dir: Path) -> str:
    """Per method: dense vs method accuracy, then its headline interpretability numbers (part recovery vs a random
    assignment; the pointing games and content heatmap; a prototype method's consistency, stability and relevance
    ordering area per pixel-space mapping), and the report's path."""
    from qpm_dist import methods

    def newest(pattern: str) -> Path | None:
        found = sorted(run_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    lines = ["", "qpm-dist demo: done."]
    for spec in methods.all_specs():
        metrics_file = newest(f"{spec.name}_evaluate-*/metrics.json")
        report = newest(f"{spec.name}_report-*/report.html")
        if metrics_file:
            m = json.loads(metrics_file.read_text())
            d, q, label = m.get("dense"), m[spec.name], spec.label
            dense = f"dense {d['accuracy']:.1f}% -> " if d else ""
            lines.append(f"  {label}: test top-1 {dense}{label} {q['accuracy']:.1f}%  "
                         f"({q['NFfeatures']} {spec.units}, {q['PerClass']:.1f} per class)")
            if "part_recovery" in spec.headline and q.get("part_recovery") is not None:
                lines.append(f"    ground-truth class-part links recovered by {label}'s assignment: "
                             f"{100 * q['part_recovery']:.1f}% (a random head with the same links per class: "
                             f"{100 * q['part_recovery_random']:.1f}%), precision {100 * q['part_precision']:.1f}%")
            pointing = [k for k in POINTING_HEADLINE if k in spec.headline and q.get(k) is not None]
            if pointing:
                scores = lambda model: " / ".join(f"{model[k]:.3f}" for k in pointing)  # noqa: E731
                before = f"dense {scores(d)} -> " if d and all(d.get(k) is not None for k in pointing) else ""
                lines.append(f"    {' / '.join(POINTING_NAMES[k] for k in pointing)}: {before}{label} {scores(q)}")
            mapped = [(k, name) for k, name in MAPPING_HEADLINE
                      if any(f"{k}_{m}" in spec.headline and q.get(f"{k}_{m}") is not None for m in MAPPINGS)]
            if mapped:
                scores = lambda key: " / ".join(_number(q.get(f"{key}_{m}")) for m in MAPPINGS)  # noqa: E731
                lines.append(f"    prototypes by mapping, {' / '.join(MAPPINGS.values())}: "
                             + ", ".join(f"{name} {scores(k)}" for k, name in mapped))
            if report:
                lines.append(f"    report: {report.resolve()}")
    lines += iis_summary(run_dir)
    return "\n".join(lines)


def iis_summary(run_dir: Path) -> list[str]:
    """One line per model IIS scored in run_dir (`qpm-dist demo --iis`), in the order they were scored: its IIS
    (first concept library) and its dense probe's accuracy, which an IIS must be read next to."""
    from qpm_dist import methods
    from qpm_dist.report.compare import find_iis

    scored = [s for s in find_iis(run_dir.parent) if Path(s.path).parent.parent == run_dir]
    if not scored:
        return []
    lines = ["  IIS of the backbones (area under accuracy retention; prototype concepts unless configured):"]
    for s in scored:
        name = methods.label(s.name) if s.name in methods.names() else s.name
        lines.append(f"    {name} ({s.stage} @{(s.key or '?')[:8]}): IIS {s.metrics.get('iis', float('nan')):.3f}, "
                     f"dense probe {s.metrics.get('iis_dense_probe', float('nan')):.1f}%")
    return lines


def iis_config(args: argparse.Namespace):
    """The config of `qpm-dist iis`: CONFIG and overrides with method=iis, then --backbone: an existing file is
    model.weights (iis.backbone=null), an existing folder a stage folder with a model.pt, anything else the name of
    a model stage of the run (or 'random')."""
    from qpm_dist.config import ConfigError, validate

    cfg = _load_config(args, args.config, [*args.overrides, "method=iis"])
    if args.backbone is not None:
        path = Path(args.backbone).expanduser()
        if path.is_file():
            cfg.model.weights, cfg.iis.backbone = str(path), None
        elif path.is_dir():
            if not (path / "model.pt").is_file():
                raise ConfigError(f"--backbone: folder {path} has no model.pt; expected a stage folder that wrote a "
                                  f"model (e.g. runs/demo/dense-<key>)")
            cfg.iis.backbone = str(path)
        elif "/" in args.backbone or args.backbone.startswith("."):
            raise ConfigError(f"--backbone: {args.backbone}: no such file or folder; expected a weights file, a stage "
                              f"folder, a model stage name or 'random'")
        else:
            cfg.iis.backbone = args.backbone
    if args.job is not None:
        cfg.iis.heads.job = args.job
    validate(cfg)
    return cfg


def cmd_iis(args: argparse.Namespace) -> int:
    """Score a backbone with IIS (qpm_dist.methods.iis); print the IIS per library and where the report is."""
    from qpm_dist.config import ConfigError
    from qpm_dist.errors import BadInput

    try:
        cfg = iis_config(args)
        _preflight(cfg)
    except (ConfigError, BadInput, FileNotFoundError, ImportError) as exc:
        return _fail(str(exc))
    from qpm_dist.methods.iis import head_jobs, resolve_backbone, scores_of

    if args.sweep_file is not None:
        jobs = head_jobs(cfg.iis)
        lines = [f"# IIS grid of {args.config}: one run line per job (iis.heads.job=I), {len(jobs)} jobs"]
        for i, job in enumerate(jobs):
            lines += [f"# job {i}: library {job.library}, ratio {job.ratio}, lr {job.lr:g}", f"iis.heads.job={i}"]
        try:
            Path(args.sweep_file).write_text("\n".join(lines) + "\n")
        except OSError as exc:
            return _fail(f"--sweep-file: cannot write {args.sweep_file} ({exc.strerror})")
        extra = " ".join(args.overrides)
        print(f"written {args.sweep_file} ({len(jobs)} jobs); submit the array, then collect and score:\n"
              f"  sbatch --array=0-{len(jobs) - 1} slurm/sweep_array.sbatch {args.sweep_file} {args.config} "
              f"method=iis {extra}".rstrip() + "\n"
              f"  qpm-dist iis {args.config} iis.heads.array=true {extra}".rstrip())
        return 0

    def done(ctx, summaries) -> None:
        if not ctx.info.is_main:
            return
        if cfg.iis.heads.job is not None:
            record = summaries["iis_head_job"]["summary"]["record"]
            print(f"iis job {record['job']}: {record['library']}, ratio {record['ratio']}, lr {record['lr']:g}: "
                  f"test top-1 {100 * record['accuracy']:.2f}% ({ctx.outputs['iis_head_job']})", flush=True)
            return
        name = resolve_backbone(cfg).name
        for library, score in scores_of(ctx.outputs["iis_score"]).items():
            print(f"IIS of {name}, {library} concepts: {score['iis']:.4f} (normalised "
                  f"{score['iis_normalised'] or 0:.4f}; dense probe {100 * score['dense_accuracy']:.2f}%)", flush=True)
        print(f"report: {ctx.outputs['iis_report'] / 'report.html'}", flush=True)

    return execute(cfg, None, done)


def cmd_compare(args: argparse.Namespace) -> int:
    """Every method evaluated under an output folder side by side, from its metrics.json files."""
    from qpm_dist import methods
    from qpm_dist.report.compare import write_comparison

    if not Path(args.out_dir).is_dir():
        return _fail(f"compare: output folder not found: {args.out_dir}")
    try:
        methods.load_plugins(args.plugin)
    except ImportError as exc:
        return _fail(str(exc))
    text, path = write_comparison(Path(args.out_dir), args.html)
    print(text)
    if path is not None:
        print(f"written {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpm-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (repeatable): a method defined outside qpm_dist registers itself "
                             "there (see README, 'Adding a method')")

    run = sub.add_parser("run", parents=[plugin], help="run a method's stages (under torchrun for several processes)")
    run.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    run.add_argument("--stage", help="run only this stage (and unfinished stages it depends on)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dense.optim.lr=0.1")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", parents=[plugin],
                           help="check a run's config and input paths and say what it would run; starts nothing")
    check.add_argument("config")
    check.add_argument("--stage", help="as for run")
    check.add_argument("overrides", nargs="*")
    check.set_defaults(func=cmd_check)

    show = sub.add_parser("print-config", parents=[plugin], help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=cmd_print_config)

    demo = sub.add_parser("demo", parents=[plugin],
                          help="every method with a demo config on the embedded synthetic dataset, 2 CPU processes")
    demo.add_argument("--config", default="configs/demo.yaml")
    demo.add_argument("--data", default="data/synthetic")
    demo.add_argument("--nproc", type=int, default=2)
    demo.add_argument("--methods", default="",
                      help="comma-separated, run in this order (default: every method with a demo config, "
                           "in registry order: qpm first); each uses its demo config next to --config")
    demo.add_argument("--iis", action="store_true",
                      help="then score every method's dense baseline and final model, and a random init, with IIS "
                           "(the iis section of demo_iis.yaml next to --config; about 2 minutes each)")
    demo.add_argument("overrides", nargs="*")
    demo.set_defaults(func=cmd_demo)

    iis = sub.add_parser("iis", parents=[plugin],
                         help="score a backbone with IIS (the run's model stage, a stage folder or a weights file)")
    iis.add_argument("config", help="YAML config, e.g. configs/demo_iis.yaml (method is set to iis)")
    iis.add_argument("--backbone", metavar="PATH_OR_STAGE",
                     help="a weights file, a stage folder with model.pt, a model stage of the run or 'random' "
                          "(default: the config's iis.backbone)")
    iis.add_argument("--job", type=int, metavar="I", help="train only job I of the grid (a SLURM array task)")
    iis.add_argument("--sweep-file", metavar="FILE",
                     help="write the grid as a sweep file for slurm/sweep_array.sbatch and print the commands")
    iis.add_argument("overrides", nargs="*")
    iis.set_defaults(func=cmd_iis)

    compare = sub.add_parser("compare", parents=[plugin], help="the metrics of every method run under OUT_DIR side by side")
    compare.add_argument("out_dir", nargs="?", default="runs", help="the runs' run.out_dir (default: runs)")
    compare.add_argument("--html", help="where to write the HTML table (default: OUT_DIR/compare.html)")
    compare.set_defaults(func=cmd_compare)

    sub.add_parser("make-synthetic", help="generate the synthetic dataset (see --help)", add_help=False)
    sub.add_parser("launch", help="print or --run the torchrun/deepspeed command for one or more nodes (see --help)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "make-synthetic":
        return cmd_make_synthetic(argv[1:])
    if argv and argv[0] == "launch":
        from qpm_dist.launching import main as launch_main

        return launch_main(argv[1:])
    parser = build_parser()
    # Overrides may come before or after options (`run CFG --stage dense dense.epochs=5`): argparse stops
    # collecting a positional list at the first option, so key=value leftovers are overrides too.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
