"""`asyncgrpo up --config run.yaml [--steps N] [overrides]`: the whole system on one machine as processes.

Validates the config and reads the training and held-out data before anything starts, then starts in order:
a private redis-server (AOF, a generated password, loopback only) unless --redis-url is given, the
genserver(s), weight-sync, rollout, the control plane and the trainer, each waited for until healthy. The
run's api key and admin key are generated per run and reach the services through the environment only (never
a file or a command line); the Redis password is in config.yaml and redis/redis.conf, both readable by you
only. The weight snapshot lives in a shared-memory directory of this run's own.

While it trains, a live display (plain lines when the output is not a terminal, or with --no-live) shows
step / total with the ETA, the policy version, run state, rewards, held-out accuracy, queue depth,
staleness and throughput; with evaluator.freq_steps = K the policy the genserver serves is evaluated on
held-out prompts at versions 0, K, 2K, ... When any service exits early, everything else stops at once and
that service's last log lines are printed. When the trainer has taken its steps everything stops in reverse
order, the warm start and the final model are evaluated on the held-out prompts and one line says
before -> after; then the curves are drawn. SIGINT / SIGTERM / SIGHUP stop everything the same way (a second
one kills at once); if `up` itself is killed, the kernel stops its services (PR_SET_PDEATHSIG), and
`up --resume RUN_DIR` continues from the last checkpoint.

Run directory: config.yaml (mode 600, keys removed), logs/*.log, redis/ (AOF), checkpoints/, metrics.jsonl
(one row per step), evals.jsonl (held-out evaluations), eval.json (before/after), curves/*.png,
hf/version_N (the final model), weight_sync/ (disk-transport checkpoints).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ACCEPTS_OVERRIDES = True

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from asyncgrpo.config.command import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps to train (default: trainer.max_steps)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: FILEROOT/EXPERIMENT-YYYYmmdd-HHMMSS)")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting a private redis-server")
    parser.add_argument("--dry-run", action="store_true", help="print what would be started, start nothing")
    parser.add_argument("--no-live", action="store_true", help="plain lines (one per step) instead of the live display, "
                                                                 "also when the output is a terminal")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue a stopped or crashed run from its directory: its config, Redis data (AOF) and "
                             "last checkpoint (--steps raises the target; other overrides still apply)")


def _fail(msg: str) -> int:
    print(f"asyncgrpo up: {msg}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from asyncgrpo.config import ConfigError, load_config
    from asyncgrpo.launch.procs import ServiceFailed, Stopped, Supervisor

    resume_dir = _resume_dir(args) if args.resume else None
    configs = [str(resume_dir / "config.yaml"), *args.config] if resume_dir else args.config
    cfg = load_config(configs, overrides)  # a typo fails here, before anything starts (ConfigError: one line)
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {args.steps}")
        cfg.trainer.max_steps = args.steps
    if cfg.trainer.max_steps is None:
        raise ConfigError("the run needs an end: pass --steps N or set trainer.max_steps")
    _check_inputs(cfg, args)
    eval_data = _eval_data(cfg)

    if resume_dir is not None:
        run_dir = resume_dir
        private_redis = (run_dir / "redis" / "redis.conf").is_file()  # else the run used the Redis in its config
        redis_url = args.redis_url or (None if private_redis else cfg.redis.url)
    else:
        run_dir = Path(args.run_dir or Path(cfg.fileroot) / f"{cfg.experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        redis_url = args.redis_url
    plan = plan_run(cfg, run_dir, redis_url=redis_url)
    if args.dry_run:
        for svc in plan.services:
            gpus = svc.env.get("CUDA_VISIBLE_DEVICES")
            print(f"{svc.name:<12} {'' if gpus is None else f'CUDA_VISIBLE_DEVICES={gpus} '}{svc.command_line()}")
        print(f"{'snapshot':<12} {plan.snapshot_dir}")
        return 0

    log_start = _log_sizes(run_dir / "logs")
    plan.write()
    (run_dir / "up.pid").write_text(f"{os.getpid()}\n")  # --resume refuses a run that is still running
    sup = Supervisor({**os.environ, **plan.env})

    def on_signal(signum: int, _frame: Any) -> None:
        if sup.stop_requested is None:  # first: stop every service in order
            sup.stop_requested = signal.Signals(signum).name
        else:  # second: now
            sup.kill_all()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    print(f"asyncgrpo up: {plan.cfg.trainer.max_steps} steps, logs in {run_dir / 'logs'}", flush=True)
    print(f"asyncgrpo up: control plane http://{plan.cfg.control.host}:{plan.cfg.control.port}/ (run "
          f"{plan.cfg.run_id}; token in {run_dir / 'control_token'})", flush=True)
    code = 0
    evals = None
    try:
        for svc in plan.services:
            sup.start(svc)
        evals = _start_periodic_eval(plan, eval_data)
        _watch(sup, plan, evals, live=not args.no_live)
    except ServiceFailed as e:
        code = _fail(str(e))
    except Stopped as e:
        print(f"asyncgrpo up: {e}: stopping every service", file=sys.stderr)
        code = 130
    finally:
        if evals is not None:
            evals.stop()
        sup.stop_all()  # whatever ended the run, nothing it started outlives it
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(plan.snapshot_dir, ignore_errors=True)
        (run_dir / "up.pid").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            plan.snapshot_dir.parent.rmdir()  # /dev/shm/asyncgrpo, if no other run uses it
    _report_log_problems(run_dir / "logs", log_start)
    if code:
        _write_curves(run_dir, cfg)  # a stopped run's curves so far
        return code
    final = _final_model(run_dir)
    reached = int(final.name.removeprefix("version_")) if final is not None else 0
    if reached < cfg.trainer.max_steps:
        print(f"asyncgrpo up: the run ended at version {reached} of {cfg.trainer.max_steps}: "
              f"{_early_end_reason(run_dir / 'logs' / 'trainer.log', log_start)}", file=sys.stderr)
    if final is None:
        return _fail(f"no final HF model under {run_dir / 'hf'}: the trainer took no step")
    print(f"final model: {final}")
    code = 0
    if eval_data is not None:
        try:
            _evaluate(cfg, Path(cfg.actor.path), final, eval_data, run_dir)
        except Exception as e:  # noqa: BLE001 - the trained model is saved; say what failed, still draw the curves
            code = _fail(f"the before/after evaluation failed ({type(e).__name__}: {e}); the final model is {final}")
    _write_curves(run_dir, cfg)
    return code


# -- planning ------------------------------------------------------------------------------------------------
def _check_inputs(cfg: Any, args: argparse.Namespace) -> None:
    from asyncgrpo.config import ConfigError

    if not (Path(cfg.actor.path) / "config.json").is_file():
        raise ConfigError(f"actor.path {cfg.actor.path!r} is not an HF checkpoint directory (no config.json); "
                          "for the tiny example run `asyncgrpo prepare --out runs/tiny` first")
    if not Path(cfg.train_dataset.path).is_file():
        raise ConfigError(f"train_dataset.path {cfg.train_dataset.path!r} does not exist; "
                          "for the tiny example run `asyncgrpo prepare --out runs/tiny` first")
    from asyncgrpo.rollout.dataset import load_records
    from asyncgrpo.tasks.jsonl import TaskDataError

    try:  # the rollout service would find a bad record only after everything started
        records = load_records(cfg.train_dataset.path, cfg.train_dataset.prompt_key, cfg.train_dataset.answer_key)
    except TaskDataError as e:
        raise ConfigError(str(e)) from None
    # every trained group uses up a prompt (dynamic filtering uses up more): a run that needs more prompts than
    # the epochs hold would wait for data forever at the end
    need, have = cfg.trainer.max_steps * cfg.train_dataset.batch_size, len(records) * cfg.total_train_epochs
    if need > have:
        raise ConfigError(f"{cfg.trainer.max_steps} steps x train_dataset.batch_size {cfg.train_dataset.batch_size} "
                          f"need {need} prompts, but {len(records)} records x total_train_epochs "
                          f"{cfg.total_train_epochs} give {have}; raise total_train_epochs to "
                          f"{-(-need // len(records))} or more (dynamic filtering uses up prompts too)")
    if args.redis_url is None and shutil.which("redis-server") is None:
        raise ConfigError("redis-server not found on PATH: apt-get install -y redis-server, or pass --redis-url")
    from asyncgrpo.rewards import resolve_reward_fn

    for spec in cfg.reward.fns:  # a plug-in that does not import would stop the rollout after everything started
        try:
            resolve_reward_fn(spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_launch(cfg.launch, cfg.rollout.server_urls, probe=not args.dry_run)


def _check_launch(launch: Any, server_urls: list[str], *, probe: bool) -> None:
    """The generation engine and the GPUs `launch` asks for, before anything starts. probe: also ask this
    machine (GPU count, sglang importable, external servers answering); --dry-run checks only the config."""
    import subprocess

    import httpx

    from asyncgrpo.config import ConfigError

    if launch.engine == "sglang" and launch.trainer_gpus < 1:
        raise ConfigError("launch.engine sglang needs launch.trainer_gpus >= 1 (the weights reach SGLang over NCCL "
                          "from the trainer's GPU); set launch.trainer_gpus")
    if not probe:
        return
    need = _gpu_plan(launch)["total"]
    if need:
        import torch

        have = torch.cuda.device_count()
        if have < need:
            raise ConfigError(f"launch asks for {need} GPUs (launch.trainer_gpus {launch.trainer_gpus} + launch.servers "
                              f"{launch.servers if launch.engine == 'sglang' else 0} x launch.gpus_per_server "
                              f"{launch.gpus_per_server}), this machine shows {have}; lower them")
    if launch.engine == "sglang":
        py = launch.sglang_python or sys.executable
        try:
            ok = subprocess.run([py, "-c", "import sglang"], capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if not ok:
            raise ConfigError(f"launch.engine sglang: {py} cannot import sglang; pip install 'sglang[all]' there, or set "
                              "launch.sglang_python to an interpreter that has it")
    if launch.engine == "external":
        for i, url in enumerate(server_urls):
            try:
                ok = httpx.get(f"{url.rstrip('/')}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                raise ConfigError(f"launch.engine external: rollout.server_urls[{i}] {url} does not answer GET /health; "
                                  "start it first, or let up start the servers (launch.engine genserver or sglang)")


def _resume_dir(args: argparse.Namespace) -> Path:
    """The run directory `--resume` names, checked: written by `asyncgrpo up`, not running now."""
    from asyncgrpo.config import ConfigError

    run_dir = Path(args.resume).resolve()
    if args.run_dir:
        raise ConfigError("--resume RUN_DIR continues that directory; leave out --run-dir")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; give the directory `asyncgrpo up` printed "
                          "(it holds config.yaml, logs/, checkpoints/)")
    pid_file = run_dir / "up.pid"
    if pid_file.is_file():
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            raise ConfigError(f"--resume {run_dir}: another user's process {pid_file.read_text().strip()} runs it") from None
        else:
            if _is_up(pid):
                raise ConfigError(f"--resume {run_dir}: asyncgrpo up (pid {pid}) is still running this run; stop it "
                                  "first (Ctrl-C or kill it)")
    return run_dir


def _is_up(pid: int) -> bool:
    try:
        return b"asyncgrpo" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _eval_data(cfg: Any) -> Path | None:
    """The held-out records: evaluator.data_path, checked now, or test.jsonl beside the training data."""
    from asyncgrpo.config import ConfigError
    from asyncgrpo.rollout.dataset import load_records
    from asyncgrpo.tasks.jsonl import TaskDataError

    if cfg.evaluator.prompts == 0:
        return None
    if cfg.evaluator.data_path:
        path = Path(cfg.evaluator.data_path)
        if not path.is_file():
            raise ConfigError(f"evaluator.data_path {str(path)!r} does not exist; give a JSONL of held-out records, or null "
                              "for test.jsonl beside train_dataset.path")
    else:
        path = Path(cfg.train_dataset.path).with_name("test.jsonl")
        if not path.is_file():
            return None
    try:  # a bad held-out file fails now, not after training
        load_records(path, cfg.train_dataset.prompt_key, cfg.train_dataset.answer_key)
    except TaskDataError as e:
        raise ConfigError(f"evaluator.data_path: {e}") from None
    return path


def _snapshot_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@dataclass
class RunPlan:
    """What `up` starts: the run's config (ports, paths filled in), its services in start order, the
    environment they share (the run's keys) and the files to write before starting (mode 600)."""

    run_dir: Path
    cfg: Any
    services: list[Any]
    env: dict[str, str]
    snapshot_dir: Path
    files: dict[Path, str] = field(default_factory=dict)

    def service(self, name: str) -> Any:
        return next(s for s in self.services if s.name == name)

    def write(self) -> None:
        from asyncgrpo.config import dump_config

        self.run_dir.mkdir(parents=True, exist_ok=True)
        # config.yaml holds the private Redis password (in redis.url): readable by this user only
        for path, text in {self.run_dir / "config.yaml": dump_config(self.cfg), **self.files}.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # also when the file existed with wider permissions
            with os.fdopen(fd, "w") as f:
                f.write(text)


def _gpu_plan(launch: Any) -> dict[str, Any]:
    """CUDA_VISIBLE_DEVICES of each process: the trainer takes the first trainer_gpus devices (weight-sync shares
    the trainer's first, where its snapshot's NCCL broadcast starts), SGLang server i the next gpus_per_server.
    A trainer with no GPU is kept off every GPU."""
    t = launch.trainer_gpus
    trainer = ",".join(str(d) for d in range(t))
    servers = []
    if launch.engine == "sglang":
        k = launch.gpus_per_server
        servers = [",".join(str(t + i * k + j) for j in range(k)) for i in range(launch.servers)]
    return {"trainer": {"CUDA_VISIBLE_DEVICES": trainer}, "weight_sync": {"CUDA_VISIBLE_DEVICES": trainer[:1] if t else ""},
            "servers": servers, "total": t + launch.gpus_per_server * len(servers)}


def plan_run(cfg: Any, run_dir: Path, *, redis_url: str | None = None) -> RunPlan:
    """The run's config (ports, paths, secrets filled in) and its services in start order."""
    import httpx
    import yaml

    from asyncgrpo.launch.procs import Service
    from asyncgrpo.queue import make_redis
    from asyncgrpo.utils.net import free_port

    cfg = cfg.model_copy(deep=True)
    logs = run_dir / "logs"
    exe = [sys.executable, "-m", "asyncgrpo.cli"]
    # Servers up starts get fresh keys; external ones keep what they were started with (config or environment).
    fresh = cfg.launch.engine != "external"
    api_key = cfg.auth.api_key or os.environ.get("ASYNCGRPO_API_KEY") or (secrets.token_urlsafe(24) if fresh else None)
    admin_key = (cfg.auth.admin_api_key or os.environ.get("ASYNCGRPO_ADMIN_API_KEY")
                 or (secrets.token_urlsafe(24) if fresh else None))
    keys = {k for k in (cfg.reward.orm.api_key, cfg.reward.prm.api_key) if k}
    if len(keys) > 1:
        raise ValueError("reward.orm.api_key and reward.prm.api_key differ: up passes one reward-server key "
                         "(ASYNCGRPO_REWARD_API_KEY); give both servers the same key")
    reward_key = next(iter(keys), None) or os.environ.get("ASYNCGRPO_REWARD_API_KEY")
    cfg.auth.api_key = cfg.auth.admin_api_key = None  # the keys travel in the environment, never in config.yaml
    cfg.reward.orm.api_key = cfg.reward.prm.api_key = None
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: v for k, v in (("ASYNCGRPO_API_KEY", api_key), ("ASYNCGRPO_ADMIN_API_KEY", admin_key),
                                  ("ASYNCGRPO_REWARD_API_KEY", reward_key)) if v})
    host = "127.0.0.1"
    services: list[Service] = []
    files: dict[Path, str] = {}  # written (mode 600) by run() before anything starts

    if redis_url:
        cfg.redis.url = redis_url
    else:
        port, password = free_port(host), secrets.token_urlsafe(24)
        cfg.redis.url = f"redis://:{password}@{host}:{port}/0"
        # the password stays off redis-server's command line (visible to every local user): in files only
        # this user can read (redis.conf, and config.yaml's redis.url), written by RunPlan.write()
        conf = run_dir / "redis" / "redis.conf"
        files[conf] = f"requirepass {password}\n"
        services.append(Service(
            "redis", ["redis-server", str(conf), "--port", str(port), "--bind", host, "--protected-mode", "yes",
                      "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(conf.parent)],
            logs / "redis.log", health=lambda url=cfg.redis.url: make_redis(url).ping(), start_timeout_s=30))

    gpus = _gpu_plan(cfg.launch)
    gen_urls = list(cfg.rollout.server_urls) if cfg.launch.engine == "external" else []
    n = cfg.launch.servers
    for i in range(n if cfg.launch.engine != "external" else 0):
        port = free_port(host)
        url = f"http://{host}:{port}"
        gen_urls.append(url)
        name = f"{cfg.launch.engine}{i}" if n > 1 else cfg.launch.engine
        if cfg.launch.engine == "genserver":
            argv = [*exe, "genserver", "--model", str(cfg.actor.path), "--host", host, "--port", str(port), "--weight-version", "0",
                    "--num-continuous-decode-steps", str(cfg.launch.num_continuous_decode_steps)]
            server_env: dict[str, str] = {}
        else:  # SGLang reads its keys from a YAML --config (mode 600), so they stay off its command line
            conf = run_dir / "sglang" / f"{name}.yaml"
            files[conf] = yaml.safe_dump({"api_key": api_key, "admin_api_key": admin_key})
            argv = [cfg.launch.sglang_python or sys.executable, "-m", "sglang.launch_server", "--config", str(conf),
                    "--model-path", str(cfg.actor.path), "--host", host, "--port", str(port),
                    "--tp-size", str(cfg.launch.gpus_per_server), "--weight-version", "0", *cfg.launch.sglang_args]
            server_env = {"CUDA_VISIBLE_DEVICES": gpus["servers"][i]}
        services.append(Service(
            name, argv, logs / f"{name}.log", health=lambda url=url: httpx.get(f"{url}/health", timeout=2).status_code == 200,
            start_timeout_s=cfg.launch.server_start_timeout_s, env=server_env))
    cfg.rollout.server_urls = gen_urls
    cfg.weight_sync.host = host
    cfg.weight_sync.port = free_port(host)
    snapshot_dir = _snapshot_root() / "asyncgrpo" / f"{run_dir.name}-{secrets.token_hex(4)}"
    cfg.weight_sync.snapshot_dir = str(snapshot_dir)
    cfg.weight_sync.checkpoint_dir = str(run_dir / "weight_sync")
    cfg.trainer.checkpoint_dir = str(run_dir / "checkpoints")
    if not cfg.trainer.hf_save_interval:
        cfg.trainer.hf_save_interval = cfg.trainer.max_steps
    cfg.fileroot = str(run_dir)

    conf_args = ["--config", str(run_dir / "config.yaml")]
    ws_url = f"http://{host}:{cfg.weight_sync.port}"
    services.append(Service("weight-sync", [*exe, "weight-sync", *conf_args], logs / "weight_sync.log",
                            health=lambda: httpx.get(f"{ws_url}/health", timeout=2).status_code == 200, start_timeout_s=60,
                            env=gpus["weight_sync"]))
    # rollout: the first SIGTERM lets running groups finish and be queued, a second cuts them short
    services.append(Service("rollout", [*exe, "rollout", *conf_args], logs / "rollout.log",
                            stop_sequence=((signal.SIGTERM, 15.0), (signal.SIGTERM, 10.0))))
    # control plane: stateless; its token travels in the environment and in a file only this user can read
    control_token = os.environ.get("ASYNCGRPO_CONTROL_TOKEN") or secrets.token_urlsafe(24)
    files[run_dir / "control_token"] = control_token + "\n"
    cfg.control.host, cfg.control.port, cfg.control.token = host, free_port(host), None
    cfg.control.grpc_port = free_port(host)
    ctl_url = f"http://{host}:{cfg.control.port}"
    services.append(Service("control", [*exe, "control", *conf_args], logs / "control.log",
                            health=lambda: httpx.get(f"{ctl_url}/health", timeout=2).status_code == 200, start_timeout_s=60,
                            env={"ASYNCGRPO_CONTROL_TOKEN": control_token}))  # the control plane's alone
    # trainer: SIGTERM stops after the current step and checkpoints
    trainer_argv = [*exe, "trainer", *conf_args]
    if cfg.launch.trainer_gpus > 1:  # one rank per GPU; torchrun passes SIGTERM on to the ranks
        trainer_argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={cfg.launch.trainer_gpus}", "-m", "asyncgrpo.cli", "trainer", *conf_args]
    services.append(Service("trainer", trainer_argv, logs / "trainer.log", stop_sequence=((signal.SIGTERM, 120.0),),
                            env=gpus["trainer"]))
    return RunPlan(run_dir, cfg, services, env, snapshot_dir, files)


# -- running -------------------------------------------------------------------------------------------------
def _start_periodic_eval(plan: RunPlan, eval_data: Path | None) -> Any:
    """The held-out evaluation thread (evaluator.freq_steps > 0), on the first generation server."""
    from asyncgrpo.launch.periodic_eval import PeriodicEval
    from asyncgrpo.queue import make_redis
    from asyncgrpo.queue.run_control import RunControl
    from asyncgrpo.queue.run_state import RunState

    cfg = plan.cfg
    if cfg.evaluator.freq_steps < 1 or cfg.evaluator.prompts < 1:
        return None
    if eval_data is None:
        print(f"asyncgrpo up: evaluator.freq_steps is {cfg.evaluator.freq_steps} but there is no held-out data "
              f"(no test.jsonl beside {cfg.train_dataset.path}); set evaluator.data_path", file=sys.stderr)
        return None
    client = make_redis(cfg.redis.url)
    ctl = RunControl(client, cfg.run_id)
    try:
        start = RunState(client, cfg.run_id).get_version()  # a resumed run evaluates from its next point on
    except Exception:  # noqa: BLE001 - a fresh Redis: version 0
        start = 0
    evals = PeriodicEval(cfg, cfg.rollout.server_urls[0], plan.env.get("ASYNCGRPO_API_KEY"), eval_data,
                         plan.run_dir / "evals.jsonl", record=ctl.record_eval, start_version=start)
    evals.start()
    return evals


def _watch(sup: Any, plan: RunPlan, evals: Any, *, live: bool) -> None:
    """Until the trainer exits 0 (done) or any service exits early (ServiceFailed), with the progress display."""
    from asyncgrpo.launch.monitor import RunMonitor
    from asyncgrpo.launch.progress import ProgressView

    cfg = plan.cfg
    trainer = next(s for s in sup.services if s.name == "trainer")
    monitor = RunMonitor(plan.run_dir, cfg.redis.url, cfg.run_id, cfg.trainer.max_steps)
    with ProgressView(cfg.trainer.max_steps, live=None if live else False) as view:
        try:
            _watch_loop(sup, trainer, monitor, evals, view)
        finally:
            view.save_svg(plan.run_dir / "progress.svg")  # the last panel, for the record


def _watch_loop(sup: Any, trainer: Any, monitor: Any, evals: Any, view: Any) -> None:
    """Feed the display; return when the trainer exited 0, raise ServiceFailed when another service died."""
    from asyncgrpo.launch.procs import ServiceFailed, tail

    seen_evals = seen_errors = 0
    while True:
        sup.check_stop()
        if evals is not None and len(evals.results) > seen_evals:
            for res in evals.results[seen_evals:]:
                monitor.eval = res.row()
                view.note(_eval_line(res))
            seen_evals = len(evals.results)
        if evals is not None and len(evals.errors) > seen_errors:
            for msg in evals.errors[seen_errors:]:
                view.note(f"asyncgrpo up: {msg}")
            seen_errors = len(evals.errors)
        for snap in monitor.poll():
            view.update(snap)
        for svc in sup.exited():
            code = svc.proc.returncode
            if svc is trainer and code == 0:
                for snap in monitor.poll():
                    view.update(snap)
                return
            if svc.name == "rollout" and code == 0:  # drained or stopped from the control plane: the trainer follows
                continue
            raise ServiceFailed(f"{svc.name} exited with code {code}; stopping the others. Last lines of {svc.log}:\n"
                                f"{tail(svc.log)}")
        time.sleep(0.5)


def _eval_line(res: Any) -> str:
    greedy = f", greedy {res.greedy_reward:.3f} +- {res.greedy_ci95:.3f}" if res.greedy_reward is not None else ""
    return (f"held-out at version {res.version}: sampled {res.reward:.3f} +- {res.reward_ci95:.3f}{greedy} "
            f"({res.prompts} prompts x {res.samples}, {res.seconds:.0f} s)")


def _log_sizes(logs: Path) -> dict[Path, int]:
    return {log: log.stat().st_size for log in logs.glob("*.log")} if logs.is_dir() else {}


def _report_log_problems(logs: Path, since: dict[Path, int] | None = None) -> None:
    """A clean run leaves no ERROR line and no traceback in any log; say so when one does (only lines written
    after `since`: a resumed run's logs begin with the earlier run's)."""
    for log in sorted(logs.glob("*.log")):
        with log.open("rb") as f:
            f.seek((since or {}).get(log, 0))
            text = f.read().decode(errors="replace")
        bad = sum(1 for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback"))
        if bad:
            print(f"asyncgrpo up: {bad} ERROR/traceback line(s) in {log}", file=sys.stderr)


def _early_end_reason(log: Path, since: dict[Path, int]) -> str:
    """What the trainer said when it ended before max_steps (its 'run ended early:' line), else where to look."""
    try:
        with log.open("rb") as f:
            f.seek(since.get(log, 0))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    said = [line.split("run ended early: ", 1)[1] for line in lines if "run ended early: " in line]
    return said[-1] if said else f"see {log}"


def _final_model(run_dir: Path) -> Path | None:
    versions = sorted(((int(p.name.removeprefix("version_")), p) for p in (run_dir / "hf").glob("version_*")
                       if p.name.removeprefix("version_").isdigit()), reverse=True)
    return versions[0][1] if versions else None


def _evaluate(cfg: Any, before: Path, after: Path, data: Path, run_dir: Path) -> None:
    """The warm start and the final model on the held-out prompts (in this process, after the services are
    gone: nothing competes for the CPU); eval.json, and both as rows of evals.jsonl for the curves."""
    import torch
    from transformers.utils import logging as hf_logging

    from asyncgrpo.tiny.evaluate import EvalConfig, evaluate

    hf_logging.disable_progress_bar()  # two "Loading weights" bars would break the one-line summary's neighbourhood
    torch.set_num_threads(os.cpu_count() or 1)
    ev = cfg.evaluator
    from asyncgrpo.rewards import is_async, resolve_reward_fn

    # the offline before/after scores with the rule rewards: a served reward model (orm) may be gone by now
    rule_fns = tuple(f for f in cfg.reward.fns if not is_async(resolve_reward_fn(f)))
    if not rule_fns:
        print(f"asyncgrpo up: no before -> after evaluation: reward.fns {cfg.reward.fns} has no rule reward "
              "(the served ones are not evaluated offline); add one, e.g. gsm8k with weight 0", flush=True)
        return
    ecfg = EvalConfig(temperature=cfg.actor.temperature, n_samples=ev.samples, max_new_tokens=cfg.rollout.max_new_tokens,
                      max_prompts=ev.prompts, seed=ev.seed, greedy=ev.greedy, reward_fns=rule_fns,
                      prompt_key=cfg.train_dataset.prompt_key, answer_key=cfg.train_dataset.answer_key,
                      prompt_template=cfg.train_dataset.prompt_template)
    print(f"evaluating before and after on {ev.prompts} held-out prompts x {ev.samples} samples ...", flush=True)
    res: dict[str, Any] = {"before": asdict(evaluate(before, data, ecfg)), "after": asdict(evaluate(after, data, ecfg))}
    fn = rule_fns[0]
    b, a = res["before"], res["after"]
    res["gain"] = {"sampled": paired_gain(b["per_prompt"][fn], a["per_prompt"][fn]),
                   "greedy": paired_gain(b["greedy_per_prompt"][fn], a["greedy_per_prompt"][fn]) if ev.greedy else None}
    (run_dir / "eval.json").write_text(json.dumps(res, indent=1))
    final_version = int(after.name.removeprefix("version_")) if after.name.startswith("version_") else None
    with (run_dir / "evals.jsonl").open("a") as f:
        for version, r in ((0, b), (final_version, a)):
            f.write(json.dumps({"version": version, "time": time.time(), "prompts": r["prompts"], "samples": ev.samples,
                                "reward": r["reward"][fn], "reward_ci95": None,
                                "greedy_reward": r["greedy_reward"].get(fn), "greedy_ci95": None,
                                "source": "final"}) + "\n")
    greedy = ""
    if ev.greedy:
        greedy = (f", greedy {b['greedy_reward'][fn]:.3f} -> {a['greedy_reward'][fn]:.3f} "
                  f"({_gain_text(res['gain']['greedy'])})")
    print(f"held-out {fn} reward, {ev.prompts} prompts x {ev.samples} samples: sampled {b['reward'][fn]:.3f} -> "
          f"{a['reward'][fn]:.3f} ({_gain_text(res['gain']['sampled'])}){greedy}; +- is the paired 95% interval "
          f"over prompts; {run_dir / 'eval.json'}")


def paired_gain(before: list[float], after: list[float]) -> dict[str, float]:
    """The mean per-prompt gain of `after` over `before` (the same prompts) and its 95% half-width. Pairing
    removes the prompt-to-prompt spread of difficulty, which dominates two unpaired intervals."""
    from asyncgrpo.rollout.evaluation import mean_ci95

    m, ci = mean_ci95([x - y for x, y in zip(after, before, strict=True)])
    return {"mean": m, "ci95": ci}


def _gain_text(g: dict[str, float]) -> str:
    return f"{g['mean']:+.3f} +- {g['ci95']:.3f}"


def _write_curves(run_dir: Path, cfg: Any) -> None:
    from asyncgrpo.launch.curves import write_curves

    try:
        paths = write_curves(run_dir / "metrics.jsonl", run_dir / "evals.jsonl", run_dir / "curves", title=cfg.run_id)
    except Exception as e:  # noqa: BLE001 - the run's results are on disk whatever the plot does
        print(f"asyncgrpo up: could not draw the curves ({type(e).__name__}: {e})", file=sys.stderr)
        return
    if paths:
        print(f"curves: {run_dir / 'curves'} ({', '.join(p.name for p in paths)})")
