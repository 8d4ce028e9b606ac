"""Flags shared by train.py and eval.py: config, mesh, faked devices, multi-process start-up, and
the restart with huge-page malloc that CPU steps need.

A run joins a multi-process job in one of two ways: explicit --coordinator/--num_processes/
--process_id flags (on one machine or many), or, with no flags, a cluster that
`jax.distributed.initialize()` recognises by itself (SLURM, Open MPI) when it has several tasks.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys

from megajax import config, mesh, watchdog
from megajax.config import ConfigError

CLUSTER_TASK_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"
KEEP_MALLOC = "MEGAJAX_SYSTEM_MALLOC"  # set to 1 to run under the malloc settings as given
# The process id that restarted itself: the restart keeps the id, so the process that carries
# its own id here has restarted already, whatever became of GLIBC_TUNABLES; its children have not.
RESTARTED = "MEGAJAX_MALLOC_RESTARTED"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def restart_with_huge_page_malloc() -> None:
    """Restart this process once with glibc's malloc putting large blocks on transparent huge
    pages, where the kernel gives them only on request ("madvise" mode, the usual default).

    XLA on CPU allocates a step's temporaries afresh and frees them when it ends; glibc returns
    blocks over 32 MB to the kernel at once, so every step faults them back in page by 4 KB page:
    270,000 faults and 0.9 s of kernel time a step in configs/bench_gpt_cpu.py, about 900 faults
    on 2 MB pages. glibc reads its settings only at start-up, hence the restart: the same
    program, arguments, environment (plus GLIBC_TUNABLES, and RESTARTED naming this process) and
    process id. Call it first thing in a script's main guard; it returns at once where it has
    nothing to do.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        os.environ.get(KEEP_MALLOC)
        or os.environ.get(RESTARTED) == str(os.getpid())
        or "glibc.malloc.hugetlb" in tunables  # set by the user, or by this restart
        or platform.libc_ver()[0] != "glibc"
        or _transparent_huge_pages() != "madvise"  # "always" has them already, "never" none
    ):
        return
    tunables = ":".join(filter(None, [tunables, HUGE_PAGE_MALLOC]))
    env = dict(os.environ, GLIBC_TUNABLES=tunables, **{RESTARTED: str(os.getpid())})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _transparent_huge_pages() -> str | None:
    """The kernel's transparent huge page mode (always, madvise, never), None where unknown."""
    try:
        text = open(THP_MODE).read()
    except OSError:
        return None
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else None


def add_flags(parser: argparse.ArgumentParser, *, config_required: bool) -> None:
    parser.add_argument("--config", required=config_required, help="a Python file in configs/")
    parser.add_argument(
        "--mesh",
        default="data=-1,model=1",
        help="degrees of the (pipeline, data, fsdp, expert, context, model) mesh, e.g. "
        "data=2,model=4, pipeline=2,data=2,model=2, data=2,fsdp=4, data=2,expert=2,model=2 or "
        "context=4,model=2 (a missing degree is 1); -1 = all remaining devices",
    )
    parser.add_argument(
        "--cpu_devices", type=int, default=0, help="fake this many CPU devices (per process)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=50 (repeatable)",
    )
    group = parser.add_argument_group("multi-process runs")
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordination service")
    group.add_argument("--num_processes", type=int, help="processes in the job")
    group.add_argument("--process_id", type=int, help="this process's index, 0 .. N-1")
    group.add_argument(
        "--init_timeout", type=int, default=300, help="seconds to wait for every process to join"
    )
    group.add_argument(
        "--heartbeat_timeout",
        type=int,
        default=100,
        help="seconds of silence after which a process is declared dead and the job stops",
    )
    group.add_argument(
        "--step_timeout",
        type=float,
        default=1800,
        help="seconds without a finished training step after which every process stops, "
        f"naming the one at fault ({watchdog.STRETCH}x for the first step, saves and "
        "evaluations; 0: never)",
    )


def start(args: argparse.Namespace) -> None:
    """Fake devices and join the multi-process job, before anything else touches JAX."""
    if args.cpu_devices:
        mesh.fake_cpu_devices(args.cpu_devices)
    explicit, joined = [args.coordinator, args.num_processes, args.process_id], False
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ConfigError(
                "--coordinator, --num_processes and --process_id go together: pass all three"
            )
        if not 0 <= args.process_id < args.num_processes:
            raise ConfigError(
                f"--process_id {args.process_id} is outside 0..{args.num_processes - 1}"
            )
        joined = _initialize(args, args.coordinator, args.num_processes, args.process_id)
    elif any(int(os.environ.get(v, "1")) > 1 for v in CLUSTER_TASK_COUNTS):
        joined = _initialize(args, None, None, None)  # JAX reads the cluster's own variables
    # JAX's own heartbeat aborts the survivors too, later and with a C++ stack trace; the
    # watchdog says first which process went silent or holds the others up.
    watchdog.start(
        step_timeout=args.step_timeout,
        peer_timeout=max(2, args.heartbeat_timeout // 2),
        multi_process=joined,
    )


def _initialize(args, coordinator, num_processes, process_id) -> bool:
    """Join the job; returns whether it has more than one process."""
    import jax

    if coordinator:
        print(
            f"process {process_id} joining a {num_processes}-process job at {coordinator} "
            f"(waiting up to {args.init_timeout}s for the others)",
            file=sys.stderr,
            flush=True,
        )
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=args.init_timeout,
            heartbeat_timeout_seconds=args.heartbeat_timeout,
        )
    except Exception as e:  # the coordination service reports failures as several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"could not join the {num_processes or 'cluster'}-process job at "
            f"{coordinator or 'the cluster coordinator'} within {args.init_timeout}s: {first}"
        ) from None
    # jax.distributed.initialize installs a SIGTERM handler of its own (for Orbax's preemption
    # sync, which megajax does not use) that swallows the signal: until the training loop
    # catches it, SIGTERM must end the process as it does a process alone.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        _drop_gloo_lines()
    return jax.process_count() > 1


GLOO_LINE = b"[Gloo] Rank "


def _drop_gloo_lines() -> None:
    """Gloo, the CPU collectives of a multi-process job, prints a line to stdout from C++ for
    each rank of each communicator it connects ("[Gloo] Rank 3 is connected to 7 peer ranks.
    ..."): sixteen lines on every process of a 2 x 4 job. Route file descriptor 1 through a pipe
    whose reader forwards every other line; at exit the descriptor is restored and the reader
    drains what is left."""
    import atexit
    import threading

    sys.stdout.flush()
    read, write = os.pipe()
    real = os.dup(1)
    os.dup2(write, 1)
    os.close(write)

    def forward():
        with os.fdopen(read, "rb") as lines, os.fdopen(os.dup(real), "wb", buffering=0) as out:
            for line in lines:
                if not line.startswith(GLOO_LINE):
                    out.write(line)

    reader = threading.Thread(target=forward, daemon=True, name="megajax-stdout")
    reader.start()

    def restore():
        sys.stdout.flush()
        os.dup2(real, 1)  # the pipe's last writer closes: the reader sees its end
        reader.join(timeout=5)

    atexit.register(restore)


def load_config(args: argparse.Namespace) -> config.Config:
    return config.override(config.load(args.config), args.set)


def lead_print(*values) -> None:
    """print on process 0 only: one copy of each line in a multi-process job."""
    import jax

    if jax.process_index() == 0:
        print(*values, flush=True)


def hf_weights(args: argparse.Namespace):
    """The --hf_checkpoint directory opened (megajax.hf.weights.HFWeights), or None without
    one; opened once and handed to trained_config and load_trained."""
    if not args.hf_checkpoint:
        return None
    from megajax.hf.weights import HFWeights

    return HFWeights(args.hf_checkpoint)


def trained_config(args: argparse.Namespace, weights=None) -> config.Config:
    """The config of the model that --workdir or --hf_checkpoint (opened as `weights`, see
    hf_weights) names: from --config, the work directory's config.json or the Hugging Face
    checkpoint's shape, plus --set."""
    import json
    from pathlib import Path

    saved = Path(args.workdir or "") / "config.json"
    if args.config:
        cfg = load_config(args)
    elif args.workdir and saved.is_file():
        cfg = config.override(config.from_dict(json.loads(saved.read_text())), args.set)
    elif args.hf_checkpoint:
        cfg = config.override(config.Config(), args.set)
    else:
        raise ConfigError(f"{saved} not found: pass --config, or a --workdir that train.py wrote")
    if weights is not None:
        from megajax.hf.weights import with_hf_model

        # A config file, the work directory's config or --set model.arch chose the family.
        chosen = bool(args.config) or (bool(args.workdir) and saved.is_file())
        chosen |= any(s.startswith("model.arch=") for s in args.set)
        cfg = with_hf_model(cfg, weights, arch_chosen=chosen)
    return cfg


def load_trained(args: argparse.Namespace, cfg: config.Config, weights=None):
    """(ShardedModel, params, step) of `cfg` (trained_config) on the --mesh: the parameters
    alone of the --workdir's newest (or --step) checkpoint, or of --hf_checkpoint (opened as
    `weights`, see hf_weights). Call after start(args)."""
    from pathlib import Path

    from megajax.checkpoint import Checkpointer
    from megajax.sharded_model import ShardedModel

    sharded = ShardedModel(cfg, mesh.make(args.mesh))
    if weights is not None:
        from megajax.hf.weights import load_params

        return sharded, load_params(sharded, weights, log=lead_print), args.hf_checkpoint
    ckpt = Checkpointer(Path(args.workdir) / "checkpoints", every=0, keep=1)
    try:
        step = args.step if args.step is not None else ckpt.latest_step()
        if step is None:
            raise ConfigError(f"no checkpoint in {ckpt.directory}: train first (train.py)")
        params = ckpt.restore_params(step, sharded.abstract_params())
    finally:
        ckpt.close()
    return sharded, params, step
