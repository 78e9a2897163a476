"""All of rdscale's Ray wiring, and nothing else.

- fit pass: plain Ray actors (`FitWorker`, one per GPU) each accumulate moments over their share of the sample on
  their device; only the (K, K) accumulators travel, and the driver merges them (Chan et al.), so the result does
  not depend on how the sample was split.
- apply pass: a Ray Data pipeline: `FastaDatasource` (one read task per byte-range shard) -> `map_batches` with
  the `ApplyStage` callable class on an actor pool (`num_gpus` per actor, fractional allowed). Actors write Lance
  fragments themselves and return only fragment descriptions; the driver commits shard by shard. The pool's actors
  are never restarted by Ray (max_restarts=0: Ray Data hands them their map function through the object store, and
  an actor restarted after that object is lost cannot start). When an actor or a node is lost, the driver starts a
  new pool over the shards not yet committed (up to ray.max_restarts times); fragments written by the failed
  attempt were never reported, so they are never committed (nothing lost, nothing duplicated).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from rdscale.config import Config
from rdscale.errors import RdscaleError, error_chain
from rdscale.fit.moments import Moments
from rdscale.io.fasta import Shard, ValidationOptions
from rdscale.io.location import set_storage_options, set_worker_context
from rdscale.io.store import ShardResult
from rdscale.run.stages import (
    SHARD_BATCH_SCHEMA,
    ApplyStage,
    FitWorker,
    FragmentExtender,
    shard_batches,
)

log = logging.getLogger(__name__)

class FastaDatasource(Datasource):
    """One read task per shard; each yields the shard's rows (records and rejects) in blocks."""

    def __init__(self, shards: Sequence[Shard], options: ValidationOptions, rows_per_block: int = 1024,
                 storage: dict | None = None):
        self.shards = list(shards)
        self.options = options
        self.rows_per_block = rows_per_block
        self.storage = dict(storage or {})  # storage.options: read tasks run in fresh worker processes

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(((s.end or s.start) - s.start) for s in self.shards) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        tasks = []
        for shard in self.shards:
            size = (shard.end - shard.start) if shard.end is not None else None
            meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=(shard.path,))
            tasks.append(ReadTask(_shard_reader(shard, self.options, self.rows_per_block, self.storage), meta,
                                  schema=SHARD_BATCH_SCHEMA))
        return tasks


def _shard_reader(shard: Shard, options: ValidationOptions, rows_per_block: int, storage: dict | None = None):
    def read() -> Iterator[pa.Table]:
        worker_entry(storage)
        yield from shard_batches(shard, options, rows_per_block)

    return read


def as_actor(cls: type) -> type:
    """A stage class (rdscale.run.stages) for a Ray actor: its constructor keeps the small arguments and runs the
    stage's `setup()` (storage options, models, fit) once, in the actor. An rdscale error of the setup (a
    checkpoint that does not load, a device that is not there) is kept and raised by the actor's first method
    call instead: raised in the constructor it reaches the driver as an ActorDiedError that keeps only text (a
    traceback the CLI cannot word as one line), after max_restarts restarts that fail the same way; raised by a
    method it is a RayTaskError whose cause is the rdscale error itself."""

    def __init__(self, *args, **kwargs):
        self._init_error = None
        _as_worker()  # an actor's object-store errors name the node it runs on
        try:
            cls.__init__(self, *args, **kwargs)
            self.setup()
        except RdscaleError as err:
            self._init_error = err

    def guarded(name: str):
        method = getattr(cls, name)

        def call(self, *args, **kwargs):
            if self._init_error is not None:
                raise self._init_error
            return method(self, *args, **kwargs)

        call.__name__, call.__doc__ = name, method.__doc__
        return call

    names = [n for n in dir(cls) if (not n.startswith("_") or n == "__call__") and callable(getattr(cls, n))
             and not isinstance(inspect.getattr_static(cls, n), (staticmethod, classmethod))]
    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": cls.__doc__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, **{n: guarded(n) for n in names}})


def worker_entry(storage: dict | None) -> None:
    """Where a Ray task (a shard reader, a map_shards task) starts: the run's storage options, given in the config
    and not only in every node's environment, become this process's. Actors take them in their stage's setup."""
    set_storage_options(storage)
    _as_worker()


def _with_storage(storage: dict, fn, *args):
    worker_entry(storage)
    return fn(*args)


def _as_worker() -> None:
    """Tell rdscale.io.location that this process is a Ray worker, and on which node (for its S3 errors)."""
    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        set_worker_context(f"Ray worker on node {ray.util.get_node_ip_address()}")


class ResourceError(RdscaleError, ValueError):
    """A resource request no node of the Ray cluster can satisfy; the message says what to change."""


class ActorLostError(RdscaleError, RuntimeError):
    """Actors were lost more often than a pass can redo; running the same command again resumes."""


def lost_worker(err: BaseException) -> str | None:
    """What the cluster lost, in a few words ("actor 1a2b3c4d on node 10.0.0.7"), when `err` says that an actor,
    a worker process, a node or an object on a lost node went away: work that a new actor can redo. None for any
    other error, among them the work's own (an rdscale error, a user code exception, an actor whose constructor
    raised), which would fail again the same way."""
    chain = list(error_chain(err))
    if any(isinstance(e, (RdscaleError, ray.exceptions.UserCodeException)) for e in chain):
        return None
    for e in chain:
        if isinstance(e, ray.exceptions.RayActorError) and not e.actor_init_failed:
            ip = re.search(r"\bip: (\S+)", str(e))
            return (f"actor {(e.actor_id or '?')[:8]}" + (f" on node {ip.group(1)}" if ip else "")
                    + (" (node preempted)" if e.preempted else ""))
        if isinstance(e, ray.exceptions.NodeDiedError):
            return f"a node ({next(iter(str(e).splitlines()), '').strip()[:120]})"
        if isinstance(e, ray.exceptions.WorkerCrashedError):
            return "a worker process"
        if isinstance(e, ray.exceptions.ObjectLostError) and not isinstance(
                e, (ray.exceptions.ObjectFreedError, ray.exceptions.ReferenceCountingAssertionError)):
            return f"object {(e.object_ref_hex or '?')[:8]} (its node or owner)"
    return None


# Read tasks and side tasks (dedupe partitions, merges) take no whole CPU: on a cluster whose CPUs all went to the
# actor pool (or whose free CPU is split across nodes in fractions) a task asking for one CPU is never scheduled.
SIDE_TASK_CPUS = 0

# An elastic pool's upscaling threshold (Ray Data's actor_pool_util_upscaling_threshold, tasks in flight per actor):
# 1.0 = grow whenever every actor has work (see RayExecutor._apply_once).
ELASTIC_UPSCALING_THRESHOLD = 1.0


def _alive_nodes() -> list[dict[str, float]]:
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def actor_slots(nodes: Sequence[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many actors of `cpus` CPU and `gpus` GPU the nodes hold at once (each node on its own: an actor cannot
    span nodes)."""
    return sum(int(min(n.get("CPU", 0.0) / cpus if cpus else 1e9, n.get("GPU", 0.0) / gpus if gpus else 1e9))
               for n in nodes if n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus)


REDO_BACKOFF_S = 2.0  # the first redo's wait; doubled on each further one, up to REDO_BACKOFF_MAX_S
REDO_BACKOFF_MAX_S = 30.0


_pause = time.sleep  # tests record the waits instead


def redo_backoff(retry: int) -> float:
    """Seconds to wait before the apply pass's ``retry``-th redo (1-based). A node that is going away takes the
    cluster a while to declare dead (longer on a loaded head); a pool started at once can be placed on it again
    and lose its actors too, spending the redo budget (ray.max_restarts) on one loss."""
    return min(REDO_BACKOFF_S * 2 ** (retry - 1), REDO_BACKOFF_MAX_S)


def read_concurrency(cluster_cpus: float, actors: int | None, shards: int) -> int:
    """Read tasks the apply pass keeps in flight. They take no whole CPU (SIDE_TASK_CPUS), so unbounded Ray Data
    runs as many as its object-store budget allows, each in a worker process of its own (~0.4 GB with rdscale
    imported): a 1e5-record run on a 2-CPU machine started ~70 and ran the node out of memory. A reader parses a
    shard thousands of times faster than an actor embeds it, so two per actor keep every actor fed; at most one
    per CPU, and no more than the `shards` there are to read (Ray warns on the user's terminal when the bound
    exceeds its read tasks). `actors`: the pool's largest size (None: no cap, bounded by the CPUs alone)."""
    cap = int(cluster_cpus) if actors is None else min(int(cluster_cpus), 2 * max(1, actors))
    return max(1, min(max(2, cap), shards))


def pool_sizes(num_actors: int | str, max_actors: int | None, slots: int) -> tuple[int, int, int | None]:
    """(min, initial, max) of the apply pass's actor pool; max None = no cap. A number: that many actors, growing
    up to max_actors when it is set. "auto": the actors the cluster holds now (at least one), then as many as join,
    up to max_actors; at least one so a run starts on the first node that can hold an actor (autoscaling)."""
    if num_actors == "auto":
        start = max(1, slots)
        if max_actors is not None:
            start = min(start, max_actors)
        return 1, start, max_actors
    n = int(num_actors)
    return n, n, max(n, max_actors) if max_actors is not None else n


def _is_local_path(text: str) -> bool:
    return "://" not in str(text)


def tree_merge(workers: Sequence[Any]) -> dict:
    """Merge the accumulators held by `workers` (actors with `export() -> arrays` and `absorb(arrays)`) as a binary
    tree: in round r, actor i absorbs actor i + 2^r's accumulator, handed actor to actor through the object store.
    ceil(log2 n) rounds; the driver receives only the final (K, K) accumulator."""
    n, step = len(workers), 1
    while step < n:
        ray.get([workers[i].absorb.remote(workers[i + step].export.remote()) for i in range(0, n - step, 2 * step)])
        step *= 2
    return ray.get(workers[0].export.remote())


class _FitActor(FitWorker):
    """FitWorker that keeps its accumulator for a merge tree instead of returning it."""

    def accumulate(self, assignments) -> dict[str, Any]:
        out = self.run(assignments)
        out.pop("moments")
        return out

    def export(self) -> dict:
        return self.moments.to_arrays()

    def absorb(self, arrays: dict) -> None:
        self.moments = self.moments.merge(Moments.from_arrays(arrays, device=self.moments.device))


# What the memory monitor's kills look like in forwarded worker output (the raylet's notice, the task's error)
_OOM_KILL = ("Ray killed this worker", "exceeds the memory usage threshold", "OutOfMemoryError",
             "killed by the memory monitor")
_RAY_INTERNALS = ("Traceback (most recent call last)", "/ray/_private/", "/ray/data/_internal/", "(raylet)")
# Ray Serve's processes log their start-up and every request at INFO (`rdscale serve`'s access log): the file
# keeps those; their warnings and errors still reach the terminal
_SERVE_ACTORS = ("ProxyActor", "ServeController", "ServeReplica")
_SERVE_INFO = re.compile(r"^(INFO|DEBUG) \d{4}-\d\d-\d\d ")


class WorkerOutput:
    """Ray's printer of the workers' forwarded output, when rdscale routes Ray's messages to a log file: every
    line goes to the file; on the terminal, the memory monitor's kills become one line saying what happened and
    where the details are (Ray retries the killed tasks; ~200 lines of raylet notices and of Ray Data's stats
    actor tracebacks followed each burst of kills), and tracebacks from Ray's own processes stay in the file (a
    task's error reaches the driver and is reported there, in one line), as do Ray Serve's INFO lines (its start-up
    and access log). Anything else is printed as Ray would."""

    def __init__(self, log_file: str, printer):
        self.log_file = log_file
        self.printer = printer
        self.kills = 0

    def __call__(self, data: dict) -> None:
        lines = [str(line) for line in data.get("lines") or []]
        where = f"pid={data.get('pid')}, ip={data.get('ip')}"
        try:
            with open(self.log_file, "a") as f:
                f.writelines(f"({where}) {line}\n" for line in lines)
        except OSError:
            self.printer(data)  # no file to keep them in: the terminal keeps them
            return
        kills = sum(max(1, line.count("Ray killed this worker")) for line in lines if _is_kill(line))
        if kills:
            before, self.kills = self.kills, self.kills + kills
            if before == 0 or any(before < n <= self.kills for n in (10, 100, 1000)):
                log.warning("Ray's memory monitor killed %s under memory pressure (node %s); Ray retries the killed "
                            "tasks and the run goes on. Details: %s",
                            "a worker" if self.kills == 1 else f"{self.kills} workers so far", data.get("ip"),
                            self.log_file)
        serve = str(data.get("actor_name") or "").startswith(_SERVE_ACTORS)
        kept = [line for line in lines if not _is_kill(line) and not _is_ray_internal(line)
                and not (serve and _SERVE_INFO.match(line))]
        if kept:
            self.printer({**data, "lines": kept})


def _is_kill(line: str) -> bool:
    return any(p in line for p in _OOM_KILL)


def _is_ray_internal(line: str) -> bool:
    """A line of a traceback (its header, frames, code lines, the exception line) or one of Ray's own notices."""
    return (any(p in line for p in _RAY_INTERNALS) or line[:1] in (" ", "\t")
            or re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line) is not None)


def ray_log_file() -> str | None:
    """The file Ray's messages go to (rdscale.progress.route_ray_notices gave the "ray" logger one), if any. Ask
    before ray.init: it replaces the "ray" logger's handlers."""
    return next((h.baseFilename for h in logging.getLogger("ray").handlers if isinstance(h, logging.FileHandler)),
                None)


def route_worker_output(log_file: str | None) -> WorkerOutput | None:
    """After ray.init: put `WorkerOutput` in place of Ray's printer of worker output when Ray's messages go to
    `log_file` (`ray_log_file()`); None when they do not, or when this Ray has no such printer to replace."""
    if log_file is None:
        return None
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
            return None
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=ignore_prefix)
    except (ImportError, AttributeError):  # another Ray: its own printing stays
        return None
    handler = WorkerOutput(log_file, printer)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handler)
    return handler


# What each actor's constructor gets: small values only (a config, model names, a fit's location, table URIs and
# schemas), so that Ray passes them inline; the stage's setup() loads the models and the fit inside the actor.
# tests/test_executors.py holds each under 64 KB pickled.


def fit_actor_args(models: Sequence[str], cfg: Config) -> tuple:
    return list(models), cfg


def apply_actor_kwargs(cfg: Config, models: Sequence[str], fit_dir, uris: dict[str, str],
                       schemas: dict[str, pa.Schema]) -> dict[str, Any]:
    return {"cfg": cfg, "models": list(models), "fit_dir": fit_dir, "uris": dict(uris), "schemas": dict(schemas)}


def extend_actor_args(model: str, cfg: Config) -> tuple:
    return model, cfg


class RayExecutor:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
            address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
            if address:
                kwargs["address"] = address
                # Worker notices (actor start-up, autoscaler lines) would drown rdscale's own progress in a job log.
                kwargs["log_to_driver"] = os.environ.get("RDSCALE_RAY_WORKER_LOGS", "0") == "1"
            else:
                # A private Ray: never a cluster that some other `ray start` left running on this machine (which
                # ray.init() without an address would join).
                kwargs["address"] = "local"
                if cfg.ray.object_store_mb:
                    kwargs["object_store_memory"] = int(cfg.ray.object_store_mb) << 20
            log_file = ray_log_file()
            ray.init(**kwargs)
            route_worker_output(log_file)
        # rdscale draws its own per-shard progress; Ray Data's bars would interleave with it, and its per-dataset
        # notices (execution plan, "progress bars disabled", ...) would bury rdscale's lines in a job log.
        ray.data.DataContext.get_current().enable_progress_bars = False
        if not logging.getLogger("rdscale").isEnabledFor(logging.DEBUG):
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        self.gpus = self._gpus_per_actor()
        self._check_placeable()
        self._warn_local_paths()

    def _gpus_per_actor(self) -> float:
        """Explicit `ray.gpus_per_actor`, else from the cluster (not from the driver, which on a cluster is usually
        a head node without a GPU): 1 per actor when some node has a GPU, else 0 (CPU actors)."""
        if self.cfg.ray.gpus_per_actor is not None:
            return float(self.cfg.ray.gpus_per_actor)
        most = max((n.get("GPU", 0.0) for n in _alive_nodes()), default=0.0)
        return 1.0 if most >= 1 else (most if most > 0 else 0.0)

    def _check_placeable(self) -> None:
        """Refuse a per-actor request no alive node can hold (Ray would wait for it forever). An autoscaling
        cluster adds nodes on demand: RDSCALE_AUTOSCALER=1 turns the refusal into a warning."""
        cpus, gpus = float(self.cfg.ray.cpus_per_actor), self.gpus
        nodes = _alive_nodes()
        fits = [n for n in nodes if n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus]
        if fits:
            slots = actor_slots(fits, cpus, gpus)
            if self.cfg.ray.num_actors != "auto" and slots < self.cfg.ray.num_actors:
                log.warning("ray.num_actors=%d but the cluster's nodes hold %d actors of %g CPU and %g GPU at once; "
                            "the rest wait for resources", self.cfg.ray.num_actors, slots, cpus, gpus)
            return
        most_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        most_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        message = (f"no node of the Ray cluster can hold one actor with ray.cpus_per_actor={cpus:g} and "
                   f"ray.gpus_per_actor={gpus:g} (the largest node has {most_cpu:g} CPU, {most_gpu:g} GPU; "
                   f"{len(nodes)} node(s)); lower them")
        if os.environ.get("RDSCALE_AUTOSCALER") == "1":
            log.warning("%s, or wait for the autoscaler (RDSCALE_AUTOSCALER=1)", message)
            return
        raise ResourceError(message)

    def actors_now(self, work: int) -> int:
        """Actors for a pass of fixed size (fit, extend): ray.num_actors, or for "auto" those the cluster holds
        now; never more than there are pieces of `work`."""
        n = self.cfg.ray.num_actors
        if n == "auto":
            n = actor_slots(_alive_nodes(), float(self.cfg.ray.cpus_per_actor), self.gpus)
            n = min(n, self.cfg.ray.max_actors or n)
        return max(1, min(int(n), work))

    def _warn_local_paths(self) -> None:
        if len(_alive_nodes()) < 2:
            return
        local = [p for p in [*self.cfg.input.paths, self.cfg.output.dir] if _is_local_path(p)]
        if local:
            log.warning("a %d-node cluster reads and writes local paths (%s): every node must see them at the same "
                        "path (a shared filesystem), or use object storage", len(_alive_nodes()),
                        ", ".join(local[:3]) + (" ..." if len(local) > 3 else ""))

    def fit_moments(self, models: Sequence[str], cfg: Config, plan: list[tuple[Shard, int]]) -> list[dict]:
        """Moments of the fit sample, merged as a binary tree on the actors: actor i absorbs actor i + step's
        accumulator (passed actor to actor through the object store), so the driver only ever receives the one
        merged (K, K) accumulator, whatever the number of actors."""
        for attempt in range(2):
            result = self._fit_tree(models, cfg, plan)
            if result is not None:
                return [result]
            log.warning("a fit actor was restarted during the moments merge and lost its accumulator; "
                        "redoing the fit pass" + (" once more" if attempt == 0 else ""))
        raise ActorLostError("the fit pass lost an actor's accumulator twice; run the same command again")

    def _fit_tree(self, models, cfg, plan) -> dict | None:
        n = self.actors_now(len(plan))
        worker_cls = ray.remote(num_gpus=self.gpus, num_cpus=cfg.ray.cpus_per_actor,
                                max_restarts=cfg.ray.max_restarts,
                                max_task_retries=cfg.ray.max_restarts)(as_actor(_FitActor))
        workers = [worker_cls.remote(*fit_actor_args(models, cfg)) for _ in range(n)]
        shares = [plan[i::n] for i in range(n)]
        try:
            # A restarted actor reruns its whole share (the task is retried), so these counts are always complete.
            counts = ray.get([w.accumulate.remote(share) for w, share in zip(workers, shares)])
            merged = tree_merge(workers)
        finally:
            for w in workers:
                ray.kill(w)
        residues = sum(c["residues"] for c in counts)
        if int(merged["count"]) != residues:
            # An actor that died after accumulating restarts empty; its retried export/absorb would drop rows.
            return None
        return {"moments": merged, "sequences": sum(c["sequences"] for c in counts), "residues": residues,
                "models": counts[0]["models"]}

    def apply(self, cfg, models, fit_dir, uris, schemas, shards) -> Iterator[tuple[int, int, ShardResult]]:
        """The apply pass over `shards`, each shard's parts yielded together once all its records came back (the
        caller commits it then). An actor or a node lost mid-pass fails the pass's dataset; a new one then runs
        over the shards not yet yielded, up to ray.max_restarts times (-1: no limit). A shard's parts from the
        failed dataset are dropped: their fragments were never committed, and the shard is redone whole."""
        left, retries, limit = list(shards), 0, int(cfg.ray.max_restarts)
        while left:
            parts: dict[int, list[tuple[int, ShardResult]]] = {}
            done: set[int] = set()
            rows = self._apply_once(cfg, models, fit_dir, uris, schemas, left)
            while True:
                try:
                    index, total, part = next(rows)
                except StopIteration:
                    # Shards whose parts did not add up: the caller reports them as not completed.
                    for index, got in parts.items():
                        for total, part in got:
                            yield index, total, part
                    return
                except Exception as err:
                    what = lost_worker(err)
                    if what is None:
                        raise  # the work's own error (a user's, a bug's): redoing it would fail the same way
                    left = [s for s in left if s.index not in done]
                    if 0 <= limit <= retries:
                        raise ActorLostError(
                            f"the apply pass lost {what} and has redone lost work {retries} time(s) "
                            f"(ray.max_restarts={limit}); {len(left)} shard(s) were not committed: run the same "
                            "command again to resume") from err
                    retries += 1
                    wait = redo_backoff(retries)
                    log.warning("the apply pass lost %s; redoing its %d uncommitted shard(s) on a new actor pool "
                                "in %.0f s (retry %d%s)", what, len(left), wait, retries,
                                f" of {limit}" if limit >= 0 else "")
                    _pause(wait)
                    break
                got = parts.setdefault(index, [])
                got.append((total, part))
                if sum(p.records for _, p in got) == total:
                    del parts[index]
                    done.add(index)
                    for total_, part_ in got:
                        yield index, total_, part_

    def _apply_once(self, cfg, models, fit_dir, uris, schemas, shards) -> Iterator[tuple[int, int, ShardResult]]:
        options = ValidationOptions(remove_gaps=cfg.input.remove_gaps)
        nodes = _alive_nodes()
        pool, elastic, most = self._pool(nodes)
        cpus = sum(n.get("CPU", 0.0) for n in nodes)
        ds = ray.data.read_datasource(FastaDatasource(shards, options, storage=cfg.storage.options),
                                      override_num_blocks=len(shards),
                                      num_cpus=SIDE_TASK_CPUS, concurrency=read_concurrency(cpus, most, len(shards)))
        with warnings.catch_warnings():
            # Ray 2.60 warns that extra keywords (ray_remote_args) are deprecated, but offers no named parameter
            # for max_restarts (its own ActorPoolMapOperator points to map_batches(..., max_restarts=0)).
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ds.map_batches(
                as_actor(ApplyStage),
                fn_constructor_kwargs=apply_actor_kwargs(cfg, models, fit_dir, uris, schemas),
                batch_size=cfg.output.records_per_batch,
                batch_format="pyarrow",
                compute=pool,
                num_gpus=self.gpus,
                num_cpus=cfg.ray.cpus_per_actor,
                # Never restarted by Ray: Ray Data passes the pool's map function (and its DataContext) through
                # the object store, and Ray's core worker warns that an actor restarted after those objects are
                # lost cannot start. A lost actor fails this dataset instead, and apply() redoes its uncommitted
                # shards.
                max_restarts=0,
            )
        if elastic:
            # Ray Data adds actors only when the pool's utilisation (tasks in flight / actors) reaches its
            # upscaling threshold, 1.75 by default: each actor with a second task queued behind the one it runs.
            # A pool whose readers keep pace with it only now and then sits below that, and a node that joins
            # waits. Embedding actors are the costly part and a joined node's GPUs are otherwise idle: grow as
            # soon as every actor is busy (the new actors are still capped by the free resources and max_size).
            # This dataset's context only (a copy of the driver's).
            ds.context.autoscaling_config = dataclasses.replace(
                ds.context.autoscaling_config, actor_pool_util_upscaling_threshold=ELASTIC_UPSCALING_THRESHOLD)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                yield int(row["shard"]), int(row["shard_records"]), ShardResult.decode(row["result"], row["rows"])

    def _pool(self, nodes: Sequence[dict[str, float]]) -> tuple[Any, bool, int | None]:
        """The apply pass's actor pool, whether it is elastic (ray.num_actors: auto, or ray.max_actors): Ray
        Data then adds actors as nodes with room join (an autoscaler's, or any `ray start --address`) while every
        actor is busy, up to the maximum), and that maximum (None: no cap). `nodes`: the alive nodes' resources."""
        low, start, high = pool_sizes(self.cfg.ray.num_actors, self.cfg.ray.max_actors,
                                      actor_slots(nodes, float(self.cfg.ray.cpus_per_actor), self.gpus))
        if low == start == high:
            return ray.data.ActorPoolStrategy(size=low), False, high
        log.info("elastic actor pool: %d actor(s) now, at least %d, at most %s", start, low,
                 high if high is not None else "as many as the cluster holds")
        return ray.data.ActorPoolStrategy(min_size=low, max_size=high, initial_size=start), True, high

    def map_shards(self, fn, shards: Sequence[Shard], *args) -> Iterator[Any]:
        """fn(shard, *args) for every shard as Ray tasks (taking no whole CPU, like the read tasks; about one in
        flight per CPU of the cluster), yielded in shard order as they complete."""
        task = ray.remote(num_cpus=SIDE_TASK_CPUS, max_retries=3)(_with_storage)
        in_flight = max(2, int(sum(n.get("CPU", 0) for n in _alive_nodes())))
        storage, queue, pending = dict(self.cfg.storage.options or {}), list(shards), []
        queue.reverse()
        while queue or pending:
            while queue and len(pending) < in_flight:
                pending.append(task.remote(storage, fn, queue.pop(), *args))
            yield ray.get(pending.pop(0))

    # -- extend: the new model in actors over the stored run's fragments ------------------------------------------

    def _extend_actors(self, model: str, cfg: Config, n: int) -> list:
        cls = ray.remote(num_gpus=self.gpus, num_cpus=cfg.ray.cpus_per_actor, max_restarts=cfg.ray.max_restarts,
                         max_task_retries=cfg.ray.max_restarts)(as_actor(FragmentExtender))
        return [cls.remote(*extend_actor_args(model, cfg)) for _ in range(max(1, n))]

    def extend_fit_step(self, model: str, cfg: Config, run: str, sample: int, regression: str, width: int):
        """The extension step fitted on a sample of the run, in one actor (the new model may not fit the driver)."""
        actor = self._extend_actors(model, cfg, 1)[0]
        try:
            return ray.get(actor.fit_step.remote(run, sample, regression, width))
        finally:
            ray.kill(actor)

    def extend_runner(self, model, cfg, table, uri, step, out_type, proteins_uri):
        """A runner for rdscale.run.extend._extend_table: fragments spread over `ray.num_actors` actors, yielded
        as they finish. Only fragment descriptions (and the schema) travel back to the driver."""

        def runner(fragment_ids: list[int], version: int):
            actors = self._extend_actors(model, cfg, self.actors_now(len(fragment_ids)))
            step_ref = ray.put(step)
            pending = {}
            queue = list(fragment_ids)
            try:
                for actor in actors:  # one fragment in flight per actor: the next goes to whoever finishes
                    if queue:
                        ref = actor.fragment.remote(table, uri, version, queue.pop(0), step_ref, out_type, proteins_uri)
                        pending[ref] = actor
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    actor = pending.pop(done[0])
                    yield ray.get(done[0])
                    if queue:
                        ref = actor.fragment.remote(table, uri, version, queue.pop(0), step_ref, out_type, proteins_uri)
                        pending[ref] = actor
            finally:
                for actor in actors:
                    ray.kill(actor)

        return runner
