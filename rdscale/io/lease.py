"""One writer per run: an exclusive lease file in the run location, and a gate that fences every commit step.

The lease is a small JSON file (`<run>/_writer.lease`) created with an atomic create-if-absent: `O_CREAT|O_EXCL`
on a local or POSIX filesystem, a conditional put (`If-None-Match: *`) on S3-compatible object storage. It names
its owner (host, boot id, pid, process start time, a run id, when it started and when it was last renewed). A
heartbeat thread renews it while the run lives. A second writer refuses with one line naming the owner, unless the
lease is stale: its owner is gone from this host (pid dead, or the pid now names another process, or the machine
has rebooted since), or, for an owner on another host, it was not renewed for `stale_after` seconds. An owner alive
on this host is never taken over, however long it has not renewed (a stopped process, Ctrl-Z). A stale lease is
taken over through a takeover marker (itself created exclusively, named after the stale owner's run id), so two
writers that find the same stale lease cannot both take it.

Staleness is a guess about a process on another host: it may be frozen (SIGSTOP, a suspended VM, a long stall)
and wake up. So a lease alone is not enough, and every write to the run goes through the commit gate
(`<run>/_writer.gate`, `WriterLease.step`): the writer takes the gate exclusively (an `flock` on a filesystem, an
object created with `If-None-Match: *` on S3), checks under it that the lease is still its own, writes, and leaves
the gate. A takeover also needs the gate, so the lease can change owner only while no step is under way: a writer
frozen between steps finds the lease gone at its next step and stops with one line, writing nothing more; a writer
frozen inside a step holds the gate, and the would-be successor is refused until it has finished (a dead holder's
flock is dropped by the kernel; an S3 gate owned by a dead process of this host is removed). Renewals and the
release of the lease are steps too. Nothing here trusts a clock for safety: time only decides when to try a
takeover.

Storage is behind `LeaseBackend` (`create_exclusive`, `read`, `write`, `delete`, `lock`, `unlock`), so an
object-storage location plugs in without touching the protocol.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol

from rdscale.errors import RdscaleError
from rdscale.io.location import storage_options
from rdscale.io.runs import GATE_NAME, LEASE_NAME  # the run's file names live with the run

log = logging.getLogger(__name__)

RENEW_SECONDS = float(os.environ.get("RDSCALE_LEASE_RENEW_S", "10"))
STALE_SECONDS = float(os.environ.get("RDSCALE_LEASE_STALE_S", "120"))
GATE_WAIT_SECONDS = float(os.environ.get("RDSCALE_LEASE_GATE_WAIT_S", "60"))

# Tests: called with "<step>:checked" between a step's lease check and its write, and "<step>:done" after the write
# (still under the gate). Subprocess tests set RDSCALE_FAULT_STOP=<point> to SIGSTOP the writer there, once.
STEP_HOOK: Callable[[str], None] | None = None
_stopped_at: set[str] = set()


def pause_point(point: str) -> None:
    """A named moment of the commit protocol: runs STEP_HOOK, and stops this process (SIGSTOP, once per point) when
    RDSCALE_FAULT_STOP names it, so a test can freeze a real writer exactly there."""
    if STEP_HOOK is not None:
        STEP_HOOK(point)
    if os.environ.get("RDSCALE_FAULT_STOP") == point and point not in _stopped_at:
        _stopped_at.add(point)
        os.kill(os.getpid(), signal.SIGSTOP)


def this_host() -> str:
    """The host name a lease records and compares: RDSCALE_LEASE_HOST when set (hosts that share a name, e.g.
    containers with separate pid namespaces on one shared filesystem, must each set their own), else the machine's."""
    return os.environ.get("RDSCALE_LEASE_HOST") or socket.gethostname()


def _boot_id() -> str | None:
    """This boot of the machine (Linux): a pid and start time recorded before a reboot name nothing after it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


class LeaseError(RdscaleError, RuntimeError):
    """Another writer holds the run, or this writer lost its lease; the message names the owner."""


class LeaseBackend(Protocol):
    def create_exclusive(self, path: str, payload: bytes) -> bool:
        """Create `path` holding `payload` only if it does not exist; True when this call created it."""

    def read(self, path: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""

    def write(self, path: str, payload: bytes) -> None:
        """Replace the file's content (used to renew a lease this process owns)."""

    def delete(self, path: str) -> None:
        """Remove the file; no error when it is already gone."""

    def lock(self, path: str, payload: bytes) -> object | None:
        """Take the exclusive gate at `path` without waiting: a handle for `unlock`, or None when it is held."""

    def unlock(self, path: str, handle: object) -> None:
        """Leave the gate taken by `lock`."""


class LocalLeaseBackend:
    """POSIX filesystem: `O_EXCL` create, rename-over for renewal (readers never see a half-written lease). The gate
    is an exclusive `flock` of a file that stays in place: the kernel drops it when its holder exits (so a dead
    holder never blocks anyone), a stopped holder keeps it, and taking it writes nothing (a full disk still
    lets a writer finish its steps and release its lease). NFSv4 clients turn flock into locks the server holds."""

    records_gate_holder = False

    def create_exclusive(self, path: str, payload: bytes) -> bool:
        """The content is written to a private file first and then hard-linked into place (link fails when the
        name exists, like O_EXCL), so no reader ever sees an empty or half-written lease."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.new"
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as err:  # a filesystem without hard links: O_EXCL, with a moment of empty content
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return self._create_excl(path, payload)
        finally:
            os.unlink(tmp)
        return True

    @staticmethod
    def _create_excl(path: str, payload: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def read(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, path: str, payload: bytes) -> None:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        Path(tmp).write_bytes(payload)
        os.replace(tmp, path)

    def delete(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def lock(self, path: str, payload: bytes) -> object | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                raise LeaseError(f"{path}: this filesystem has no file locks (flock), which the commit gate of a "
                                 "run needs; write the run to a local disk, an NFSv4 share or s3://") from None
            raise
        return fd

    def unlock(self, path: str, handle: object) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


# storage.options (Lance's names) -> boto3 client arguments; the environment covers whatever is not given here
_BOTO_KEYS = {
    "aws_access_key_id": "aws_access_key_id", "access_key_id": "aws_access_key_id",
    "aws_secret_access_key": "aws_secret_access_key", "secret_access_key": "aws_secret_access_key",
    "aws_session_token": "aws_session_token", "session_token": "aws_session_token",
    "aws_endpoint": "endpoint_url", "endpoint": "endpoint_url", "aws_endpoint_url": "endpoint_url",
    "aws_region": "region_name", "region": "region_name",
}


def _boto_options() -> dict[str, str]:
    out = {}
    for key, value in storage_options().items():
        name = _BOTO_KEYS.get(key.lower())
        if name and value:
            out[name] = value
    if "aws_secret_access_key" in out and "aws_access_key_id" not in out and os.environ.get("AWS_ACCESS_KEY_ID"):
        out["aws_access_key_id"] = os.environ["AWS_ACCESS_KEY_ID"]  # a key pair must be given together
    if "aws_access_key_id" in out and "aws_secret_access_key" not in out and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        out["aws_secret_access_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    return out


class S3LeaseBackend:
    """S3-compatible object storage through boto3: create-if-absent is a PUT with `If-None-Match: *` (AWS S3,
    MinIO, SeaweedFS and Ceph honour it; a store that ignores it would let two writers in, so check yours with
    `tests/test_fencing.py::test_s3_enforces_conditional_writes_under_concurrency`). `path` is `s3://bucket/key`.
    The gate is an object created that way and deleted on leaving; it names its holder, so a gate left by a
    process that died on this host can be removed."""

    records_gate_holder = True

    def __init__(self, client=None, **client_kwargs):
        if client is None:
            try:
                import boto3
            except ImportError as err:  # pragma: no cover - depends on the install
                raise LeaseError("a run on S3 needs boto3 for its writer lease: pip install 'rdscale[s3]'") from err
            from botocore.config import Config as BotoConfig

            if not log.isEnabledFor(logging.DEBUG):  # "Found credentials in environment variables": noise per run
                logging.getLogger("botocore").setLevel(logging.WARNING)
            kwargs = {**_boto_options(), **client_kwargs}
            kwargs.setdefault("config", BotoConfig(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3}))
            from botocore.exceptions import BotoCoreError

            # a session of its own: boto3's default session caches the first credentials it ever resolved
            try:
                client = boto3.session.Session().client("s3", **kwargs)
            except BotoCoreError as err:  # e.g. a key id without its secret: the user's to fix, in one line
                raise LeaseError(f"S3 client for the writer lease: {err} (set the credentials in the environment "
                                 "or in storage.options)") from None
        self.client = client

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        rest = path.split("://", 1)[1]
        bucket, _, key = rest.partition("/")
        return bucket, key

    def create_exclusive(self, path: str, payload: bytes) -> bool:
        bucket, key = self._split(path)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=payload, IfNoneMatch="*")
        except self.client.exceptions.ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise
        return True

    def read(self, path: str) -> bytes | None:
        bucket, key = self._split(path)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        except self.client.exceptions.ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    def write(self, path: str, payload: bytes) -> None:
        bucket, key = self._split(path)
        self.client.put_object(Bucket=bucket, Key=key, Body=payload)

    def delete(self, path: str) -> None:
        bucket, key = self._split(path)
        self.client.delete_object(Bucket=bucket, Key=key)

    def lock(self, path: str, payload: bytes) -> object | None:
        return LeaseInfo.parse(payload).run_id if self.create_exclusive(path, payload) else None

    def unlock(self, path: str, handle: object) -> None:
        holder = LeaseInfo.parse(self.read(path) or b"")
        if holder is not None and holder.run_id == handle:
            self.delete(path)


def backend_for(location: str) -> LeaseBackend:
    if "://" in location and not location.startswith("file://"):
        if location.startswith("s3://"):
            return S3LeaseBackend()
        raise LeaseError(f"{location}: a run cannot be written to {location.split('://')[0]}:// storage yet (its "
                         "one-writer lease needs a conditional create, implemented for S3 only); write it to a "
                         "local or shared filesystem or to s3:// (any S3-compatible store)")
    return LocalLeaseBackend()


def _join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot): with the pid, it names one process even
    after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):  # exited, not yet reaped
            return False
    except (OSError, IndexError):
        pass
    if start is not None and _proc_start(pid) not in (None, start):
        return False  # the pid was reused by another process
    return True


@dataclass
class LeaseInfo:
    run_id: str
    host: str
    pid: int
    proc_start: str | None
    started: float
    renewed: float
    boot: str | None = None  # the owner machine's boot id (leases written before it was recorded: None)

    @classmethod
    def parse(cls, raw: bytes) -> LeaseInfo | None:
        try:
            d = json.loads(raw)
            return cls(str(d["run_id"]), str(d["host"]), int(d["pid"]), d.get("proc_start"),
                       float(d["started"]), float(d["renewed"]), d.get("boot"))
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"pid {self.pid} on {self.host}, started {started} (run id {self.run_id})"

    def gone(self, host: str | None = None) -> str | None:
        """Why the owner is certainly not running (it was on this host, and its process is gone), or None when it
        may be (alive here, or on another host, where only the fences keep a frozen owner from doing harm)."""
        if self.host != (host or this_host()):
            return None
        boot = _boot_id()
        if self.boot and boot and self.boot != boot:
            return f"its owner (pid {self.pid} on {self.host}) ran before this machine restarted"
        if not _pid_alive(self.pid, self.proc_start):
            return f"its owner (pid {self.pid} on {self.host}) is no longer running"
        return None

    def stale(self, now: float, stale_after: float, host: str | None = None) -> str | None:
        """Why this lease may be taken over, or None when its owner may still be writing. An owner alive on this
        host is never stale, however long ago it renewed (a stopped process is still the owner)."""
        host = host or this_host()
        if self.host == host:
            return self.gone(host)
        if now - self.renewed > stale_after:
            return f"it was last renewed {now - self.renewed:.0f} s ago (stale after {stale_after:.0f} s)"
        return None


_HELD: dict[str, "WriterLease"] = {}  # leases this process holds, by run location (see `fenced`)


def _key(location: str) -> str:
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if "://" not in location:
        location = os.path.abspath(location)
    return location.rstrip("/")


class WriterLease:
    """The exclusive right to write one run location. Use as a context manager, or acquire()/release(); make every
    write a `step` (the commit gate, see the module's docstring)."""

    def __init__(self, location: str | os.PathLike, backend: LeaseBackend | None = None,
                 renew_every: float | None = None, stale_after: float | None = None, host: str | None = None,
                 gate_wait: float | None = None):
        self.location = str(location)
        self.path = _join(self.location, LEASE_NAME)
        self.gate = _join(self.location, GATE_NAME)
        self.backend = backend or backend_for(self.location)
        self.renew_every = RENEW_SECONDS if renew_every is None else renew_every
        self.stale_after = STALE_SECONDS if stale_after is None else stale_after
        self.gate_wait = GATE_WAIT_SECONDS if gate_wait is None else gate_wait
        self.host = host or this_host()
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.info: LeaseInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._local = threading.RLock()  # one step at a time in this process (the heartbeat's renewals too)
        self._depth = 0  # nested steps of the thread holding _local: the gate is entered once
        self._gate_handle: object | None = None
        self.lost: str | None = None

    def _mine(self) -> LeaseInfo:
        now = time.time()
        return LeaseInfo(self.run_id, self.host, os.getpid(), _proc_start(os.getpid()), now, now, _boot_id())

    def acquire(self) -> WriterLease:
        info = self._mine()
        for _ in range(3):
            if self.backend.create_exclusive(self.path, info.encode()):
                return self._held(info)
            raw = self.backend.read(self.path)
            if raw is None:
                continue  # released between our create and read: try again
            owner = LeaseInfo.parse(raw)
            why = "its content is unreadable" if owner is None else owner.stale(time.time(), self.stale_after,
                                                                               self.host)
            if why is None:
                raise LeaseError(
                    f"{self.location} is being written by another rdscale process ({owner.describe()}); wait for "
                    f"it to finish, or stop it (its lease {self.path} is taken over once stale)"
                )
            marker = f"{self.path}.takeover-{owner.run_id if owner else 'unreadable'}"
            if not self.backend.create_exclusive(marker, info.encode()):
                taker_raw = self.backend.read(marker)
                taker = LeaseInfo.parse(taker_raw) if taker_raw is not None else None
                if taker_raw is not None and (taker is None or taker.stale(time.time(), self.stale_after,
                                                                            self.host)):
                    self.backend.delete(marker)  # its taker died mid-takeover: the next round may take over
                    continue
                raise LeaseError(f"{self.location}: another process is taking over the stale writer lease "
                                 f"({why}); try again in a moment")
            try:
                # Under the gate: the old owner is between two steps (or dead), and cannot start one until we are
                # done; its next step finds the lease gone. Re-read under the marker: only the marker's winner
                # deletes, and only the lease it judged stale.
                with self._local:
                    self._enter_gate(info, wait=0.0, taking_over=(why, owner))
                    try:
                        if self.backend.read(self.path) == raw:
                            log.warning("taking over the writer lease of %s: %s", self.location, why)
                            self.backend.delete(self.path)
                        won = self.backend.create_exclusive(self.path, info.encode())
                    finally:
                        self._leave_gate(info)
                if won:
                    return self._held(info)
            finally:
                self.backend.delete(marker)
        raise LeaseError(f"{self.location}: could not acquire the writer lease {self.path}; try again")

    def _held(self, info: LeaseInfo) -> WriterLease:
        self.info = info
        _HELD[_key(self.location)] = self
        self._start_heartbeat()
        return self

    # ------------------------------------------------------------------------------------------------ the gate

    def _enter_gate(self, info: LeaseInfo, wait: float, taking_over: tuple[str, LeaseInfo | None] | None = None
                    ) -> None:
        """Take the gate (waiting up to `wait` s for a live holder to leave it). An object-store gate left by a
        process that is gone from this host is removed; one held by a live process, or by a process on another
        host, never is: that process may be frozen inside its write and resume it. taking_over: (why the lease is
        stale, its owner), for the refusal."""
        deadline = time.monotonic() + wait
        pause = 0.02
        entered = LeaseInfo(**{**info.__dict__, "renewed": time.time()}).encode()  # "inside a step since"
        while True:
            handle = self.backend.lock(self.gate, entered)
            if handle is not None:
                self._gate_handle = handle
                return
            holder = None
            if getattr(self.backend, "records_gate_holder", False):
                raw = self.backend.read(self.gate)
                if raw is None:
                    continue  # left between our try and read
                holder = LeaseInfo.parse(raw)
                if holder is not None and holder.run_id == info.run_id:
                    self._gate_handle = info.run_id  # ours: an earlier step could not remove it (a storage hiccup)
                    return
                dead = "its content is unreadable" if holder is None else holder.gone(self.host)
                if dead is not None:
                    if self.backend.read(self.gate) == raw:
                        log.warning("removing the commit gate of %s: %s", self.location, dead)
                        self.backend.delete(self.gate)
                    continue
            if time.monotonic() >= deadline:
                who = holder or (taking_over[1] if taking_over else None)
                since = (f" since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(holder.renewed))}"
                         if holder is not None else "")
                name = who.describe() if who is not None else "another process"
                if taking_over:
                    remedy = f" (if it is gone for good, delete {self.gate})" if holder is not None else ""
                    raise LeaseError(
                        f"{self.location}: its writer lease is stale ({taking_over[0]}), but its owner ({name}) is "
                        f"inside a commit step{since} and may resume it; not taking over. Stop or resume that "
                        f"process and try again{remedy}")
                raise LeaseError(f"{self.location}: the commit gate {self.gate} is held by {name}{since}; "
                                 "stopping without committing more")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _leave_gate(self, info: LeaseInfo) -> None:
        handle, self._gate_handle = self._gate_handle, None
        if handle is not None:
            self.backend.unlock(self.gate, handle)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """One fenced write: under the commit gate, check that this process still holds the lease, then let the
        caller write. No other writer can take the lease over between the check and the write (a takeover needs
        the gate), so a writer that lost its lease writes nothing. Re-entrant within one thread."""
        with self._local:
            if self.info is None:
                raise LeaseError(f"{self.location}: writing without the writer lease")
            info = self.info
            outer = self._depth == 0
            if outer:
                self._enter_gate(info, wait=self.gate_wait)
            self._depth += 1
            try:
                self.check()
                pause_point(f"{what}:checked")
                yield
                pause_point(f"{what}:done")
            finally:
                self._depth -= 1
                if outer:
                    self._leave_gate(info)

    # ------------------------------------------------------------------------------------------------ renewal

    def _start_heartbeat(self) -> None:
        if self.renew_every <= 0:
            return
        self._thread = threading.Thread(target=self._beat, name="rdscale-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self.renew()
            except LeaseError as err:  # the next step stops the writer with this one line: said once, there
                self.lost = str(err)
                log.debug("%s", err)
                return
            except OSError as err:  # a transient storage hiccup: retry on the next beat
                log.warning("could not renew the writer lease %s: %s", self.path, err)

    def renew(self) -> None:
        with self.step("renew"):  # never rewrites a lease a successor has taken
            assert self.info is not None
            self.info.renewed = time.time()
            self.backend.write(self.path, self.info.encode())

    def check(self) -> None:
        """Raise LeaseError unless this process still holds the lease. Only meaningful under the gate (`step`):
        outside it, the lease can change owner right after the check."""
        if self.info is None:
            raise LeaseError(f"{self.location}: writing without the writer lease")
        if self.lost:
            raise LeaseError(self.lost)
        raw = self.backend.read(self.path)
        owner = LeaseInfo.parse(raw) if raw is not None else None
        if owner is None or owner.run_id != self.run_id:
            who = owner.describe() if owner else "nobody"
            self.lost = (f"{self.location}: this process lost its writer lease (now held by {who}); "
                         "stopping without committing more")
            raise LeaseError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.info is not None and not self.lost:
            try:
                with self.step("release"):
                    self.backend.delete(self.path)
            except LeaseError:
                pass  # lost to a successor: its lease is not ours to remove
        if _HELD.get(_key(self.location)) is self:
            del _HELD[_key(self.location)]
        self.info = None

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def fenced(location: str | os.PathLike, what: str) -> ContextManager[None]:
    """`WriterLease.step` of the lease this process holds on `location` or on a run that contains it (for code
    that writes a run's tables without being handed its lease: extend, compact); no fence when none is held."""
    key = _key(str(location))
    for held_key, lease in list(_HELD.items()):
        if key == held_key or key.startswith(held_key + "/"):
            return lease.step(what)
    return nullcontext()


def read_lease(location: str | os.PathLike) -> LeaseInfo | None:
    """Who holds the writer lease of a run location (None when nobody does)."""
    location = str(location)
    raw = backend_for(location).read(_join(location, LEASE_NAME))
    return LeaseInfo.parse(raw) if raw is not None else None
