"""Locations: one type for every place rdscale reads or writes (local paths, file://, s3://, gs://, az://).

A `Location` is parsed once from a string and then gives what each consumer needs: a pyarrow FileSystem and the
path inside it (ranged reads, small objects), Lance `storage_options`, joining, and a few byte helpers.

Credentials and endpoints come from each cloud's standard environment variables, read by pyarrow and Lance
themselves (S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL,
AWS_ALLOW_HTTP=true for a plain-HTTP endpoint; GCS: GOOGLE_APPLICATION_CREDENTIALS; Azure: AZURE_STORAGE_ACCOUNT_NAME,
AZURE_STORAGE_ACCOUNT_KEY), plus optional process-wide `storage.options` from the config (`set_storage_options`),
passed to Lance as given and mapped onto pyarrow's arguments. Options are held in memory only: `Location` never
shows them in its repr and nothing here writes them anywhere.

Every remote call has bounded connect and retry timeouts, so an unreachable endpoint fails in seconds with one
`LocationError` line naming the location, not minutes of silent retries.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from rdscale.errors import RdscaleError

__all__ = [
    "REMOTE_SCHEMES",
    "Location",
    "LocationError",
    "is_remote",
    "set_storage_options",
    "set_worker_context",
    "storage_options",
]

REMOTE_SCHEMES = ("s3", "gs", "az")
_ALIASES = {"gcs": "gs", "abfs": "az", "abfss": "az", "s3a": "s3"}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")

# Bounded network behaviour (seconds); an unreachable endpoint must fail fast, a slow large upload must not.
CONNECT_TIMEOUT_S = 5
REQUEST_TIMEOUT_S = 120
MAX_RETRIES = 3
RETRY_TIMEOUT_S = 20


class LocationError(RdscaleError, ValueError):
    """A location that cannot be used: unknown scheme, missing object or bucket, denied, unreachable."""


_OPTIONS: dict[str, str] = {}
_FS_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def set_storage_options(options: Mapping[str, Any] | None) -> None:
    """Process-wide object-store options (the config's `storage.options`), e.g. {"aws_endpoint": ..., "region":
    ...}: Lance's option names (object_store's), also mapped onto pyarrow's filesystems. Kept in memory only."""
    new = {str(k).lower(): str(v) for k, v in (options or {}).items()}
    with _LOCK:
        if new != _OPTIONS:
            _OPTIONS.clear()
            _OPTIONS.update(new)
            _FS_CACHE.clear()


def storage_options() -> dict[str, str]:
    return dict(_OPTIONS)


_WORKER: list[str] = []  # what this process is when it is not the driver, e.g. "Ray worker on node 10.0.0.7"


def set_worker_context(description: str | None) -> None:
    """Say that this process is a worker (rdscale.cluster sets it in Ray tasks and actors), so an object-store
    error can tell the settings that reach a worker apart from those of the driver's environment."""
    _WORKER[:] = [description] if description else []


# S3 settings a node's environment may hold, and the storage.options names that carry them to every worker
_S3_SETTINGS = {"AWS_ENDPOINT_URL": ("aws_endpoint", "endpoint", "aws_endpoint_url"),
                "AWS_ACCESS_KEY_ID": ("aws_access_key_id", "access_key_id"),
                "AWS_SECRET_ACCESS_KEY": ("aws_secret_access_key", "secret_access_key"),
                "AWS_REGION": ("aws_region", "region")}


def _worker_hint(scheme: str) -> str:
    """For an S3 error in a worker whose environment lacks settings that storage.options does not give either:
    what it is, where, and how the settings reach it (names only, never values)."""
    if not _WORKER or scheme != "s3":
        return ""
    lacking = [var for var, names in _S3_SETTINGS.items()
               if not os.environ.get(var) and not any(n in _OPTIONS for n in names)
               and not (var == "AWS_REGION" and os.environ.get("AWS_DEFAULT_REGION"))]
    if not lacking:
        return ""
    return (f"; this is a {_WORKER[0]} whose environment lacks {', '.join(lacking)}: settings in the driver's "
            "environment do not reach workers on other nodes; give them in the config's storage.options (sent to "
            "every worker) or in every node's environment")


def is_remote(text: Any) -> bool:
    """Whether `text` names an object-store location (s3://, gs://, az://, or an alias of them)."""
    if isinstance(text, Location):
        return not text.is_local
    m = _URI.match(str(text))
    return bool(m) and _ALIASES.get(m.group(1).lower(), m.group(1).lower()) in REMOTE_SCHEMES


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _first(*values: str | None) -> str | None:
    return next((v for v in values if v), None)


@dataclass(frozen=True)
class Location:
    """A parsed location. `scheme`: "file", "s3", "gs" or "az"; `path`: the local path (as given, normalised) or
    "bucket/key" for object stores (no leading or trailing slash)."""

    scheme: str
    path: str

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def parse(cls, text: str | os.PathLike | Location) -> Location:
        if isinstance(text, Location):
            return text
        raw = os.fspath(text)
        if not isinstance(raw, str) or not raw:
            raise LocationError(f"empty location {raw!r}")
        m = _URI.match(raw)
        if not m:
            return cls("file", os.path.normpath(os.path.expanduser(raw)))
        scheme, rest = m.group(1).lower(), m.group(2)
        scheme = _ALIASES.get(scheme, scheme)
        if scheme == "file":
            return cls("file", os.path.normpath(rest if rest.startswith("/") else "/" + rest))
        if scheme not in REMOTE_SCHEMES:
            raise LocationError(
                f"{raw}: unknown location scheme {m.group(1)!r}; use a local path, file://, s3://, gs:// or az://"
            )
        if rest.startswith("/"):
            rest = ""
        rest = re.sub(r"/+", "/", rest).strip("/")
        if not rest or rest.startswith("."):
            raise LocationError(f"{raw}: no bucket in the location (expected {scheme}://bucket/key)")
        return cls(scheme, rest)

    # ------------------------------------------------------------------------------------------------- naming

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def uri(self) -> str:
        """The string form: the path for local files, `scheme://bucket/key` otherwise (what Lance accepts)."""
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        if not self.is_local:
            raise LocationError(f"{self.uri} is not a local path")
        return self.path

    @property
    def bucket(self) -> str | None:
        return None if self.is_local else self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        return self.path if self.is_local else (self.path.split("/", 1) + [""])[1]

    @property
    def name(self) -> str:
        return posixpath.basename(self.path) if not self.is_local else os.path.basename(self.path)

    @property
    def parent(self) -> Location:
        if self.is_local:
            return Location("file", os.path.dirname(self.path) or ".")
        head = posixpath.dirname(self.path)
        return Location(self.scheme, head or self.path)

    def join(self, *parts: str) -> Location:
        """A location below this one; `parts` are relative (a part with '..' or an absolute part is refused)."""
        out = self.path
        for part in parts:
            part = str(part).strip("/") if not self.is_local else str(part)
            if not part:
                continue
            if os.path.isabs(part) or ".." in part.split("/"):
                raise LocationError(f"{part!r} is not a relative name below {self.uri}")
            out = os.path.join(out, part) if self.is_local else f"{out}/{part}"
        return Location(self.scheme, out)

    child = join

    def __truediv__(self, part: str) -> Location:
        return self.join(part)

    def relative_to(self, base: Location | str) -> str | None:
        """This location as a relative name below `base` ("fit", "fit_ext_64"), or None if it is not below it."""
        base = Location.parse(base)
        if base.scheme != self.scheme:
            return None
        a = os.path.abspath(self.path) if self.is_local else self.path
        b = os.path.abspath(base.path) if self.is_local else base.path
        if a == b:
            return "."
        prefix = b.rstrip("/") + "/"
        return a[len(prefix):] if a.startswith(prefix) else None

    def resolve(self, ref: str | None) -> Location | None:
        """A reference recorded relative to this location (or absolute / a URI) as a Location."""
        if not ref:
            return None
        if _URI.match(str(ref)) or os.path.isabs(str(ref)):
            return Location.parse(ref)
        return self.join(*[p for p in str(ref).split("/") if p and p != "."]) if str(ref) != "." else self

    # ------------------------------------------------------------------------------------------ file systems

    @property
    def storage_options(self) -> dict[str, str]:
        """Lance `storage_options`: the config's storage.options plus bounded timeouts (None for local paths)."""
        if self.is_local:
            return {}
        opts = {
            "connect_timeout": f"{CONNECT_TIMEOUT_S}s",
            "client_max_retries": str(MAX_RETRIES),
            "client_retry_timeout": str(RETRY_TIMEOUT_S),
        }
        if self.scheme == "s3" and _env_true("AWS_ALLOW_HTTP"):
            opts["allow_http"] = "true"
        opts.update(_OPTIONS)
        return opts

    @property
    def filesystem(self):
        """The pyarrow FileSystem of this location (cached per scheme, bucket and options)."""
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem()
        key = (self.scheme, self.bucket, tuple(sorted(_OPTIONS.items())),
               tuple(os.environ.get(v) for v in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID",
                                                 "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")))
        with _LOCK:
            fs = _FS_CACHE.get(key)
        if fs is None:
            fs = self._make_filesystem()
            with _LOCK:
                _FS_CACHE[key] = fs
        return fs

    def _make_filesystem(self):
        import pyarrow.fs as pafs

        o = _OPTIONS
        if self.scheme == "s3":
            kwargs: dict[str, Any] = {
                "connect_timeout": CONNECT_TIMEOUT_S,
                "request_timeout": REQUEST_TIMEOUT_S,
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_RETRIES),
            }
            endpoint = _first(o.get("aws_endpoint"), o.get("aws_endpoint_url"), o.get("endpoint"),
                              os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"))
            if endpoint:
                scheme, _, host = endpoint.partition("://")
                kwargs["endpoint_override"] = host.rstrip("/") if host else endpoint
                kwargs["scheme"] = scheme if host else "https"
            region = _first(o.get("aws_region"), o.get("region"), os.environ.get("AWS_REGION"),
                            os.environ.get("AWS_DEFAULT_REGION"))
            if not region and not endpoint:  # real AWS, no region configured: ask where the bucket lives
                try:
                    region = pafs.resolve_s3_region(self.bucket)
                except OSError:
                    region = None
            if region:
                kwargs["region"] = region
            access = _first(o.get("aws_access_key_id"), o.get("access_key_id"))
            secret = _first(o.get("aws_secret_access_key"), o.get("secret_access_key"))
            if access or secret:  # one half from the options, the other from the environment
                access = access or os.environ.get("AWS_ACCESS_KEY_ID")
                secret = secret or os.environ.get("AWS_SECRET_ACCESS_KEY")
            if access and secret:
                kwargs["access_key"], kwargs["secret_key"] = access, secret
                token = _first(o.get("aws_session_token"), o.get("session_token"))
                if token:
                    kwargs["session_token"] = token
            if o.get("aws_virtual_hosted_style_request", "").lower() == "true":
                kwargs["force_virtual_addressing"] = True
            return pafs.S3FileSystem(**kwargs)
        if self.scheme == "gs":
            kwargs = {"retry_time_limit": __import__("datetime").timedelta(seconds=RETRY_TIMEOUT_S)}
            endpoint = _first(o.get("google_endpoint"), os.environ.get("STORAGE_EMULATOR_HOST"))
            if endpoint:
                scheme, _, host = endpoint.partition("://")
                kwargs["endpoint_override"], kwargs["scheme"] = (host or endpoint), (scheme if host else "https")
            return pafs.GcsFileSystem(**kwargs)
        account = _first(o.get("account_name"), o.get("azure_storage_account_name"),
                         os.environ.get("AZURE_STORAGE_ACCOUNT_NAME"))
        if not account:
            raise LocationError(f"{self.uri}: no Azure storage account; set AZURE_STORAGE_ACCOUNT_NAME "
                                "(and AZURE_STORAGE_ACCOUNT_KEY) or storage.options.account_name")
        key = _first(o.get("account_key"), o.get("azure_storage_account_key"),
                     os.environ.get("AZURE_STORAGE_ACCOUNT_KEY"))
        return pafs.AzureFileSystem(account_name=account, **({"account_key": key} if key else {}))

    @property
    def fs_path(self) -> str:
        """The path to hand to `self.filesystem` (absolute for local files, "bucket/key" for object stores)."""
        return os.path.abspath(self.path) if self.is_local else self.path

    # ------------------------------------------------------------------------------------------------- errors

    def error(self, exc: BaseException, action: str = "access") -> LocationError:
        """`exc` from pyarrow or Lance as one line naming this location and what to do."""
        text = str(exc)
        low = text.lower()
        if isinstance(exc, LocationError):
            return exc
        if any(s in text for s in ("NoSuchBucket", "bucket does not exist")) or "nosuchbucket" in low:
            return LocationError(f"{self.uri}: bucket {self.bucket!r} does not exist")
        if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId",
                                   "403 Forbidden", "401 Unauthorized", "Forbidden", "INVALID_ACCESS_KEY_ID")):
            return LocationError(f"{self.uri}: access denied (check the credentials, e.g. AWS_ACCESS_KEY_ID / "
                                 "AWS_SECRET_ACCESS_KEY, and their permissions on the bucket)"
                                 f"{_worker_hint(self.scheme)}")
        if any(s in low for s in ("network_connection", "could not connect", "error sending request",
                                  "connection refused", "timed out", "timeout", "dns", "resolve host",
                                  "couldn't connect")):
            endpoint = _first(_OPTIONS.get("aws_endpoint"), os.environ.get("AWS_ENDPOINT_URL")) \
                if self.scheme == "s3" else None
            where = f" at {endpoint}" if endpoint else ""
            return LocationError(f"{self.uri}: cannot reach the object store{where} (connection failed or timed "
                                 f"out after {MAX_RETRIES} attempts); check the endpoint and the network"
                                 f"{_worker_hint(self.scheme)}")
        if isinstance(exc, FileNotFoundError) or "not found" in low or "does not exist" in low:
            return self.not_found_error()
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return LocationError(f"{self.uri}: cannot {action}: {first[:300]}")

    def not_found_error(self) -> LocationError:
        """The error for a location that is not there: names a missing bucket, else the missing object."""
        if not self.is_local:
            try:
                import pyarrow.fs as pafs

                if self.filesystem.get_file_info(self.bucket).type == pafs.FileType.NotFound:
                    return LocationError(f"{self.uri}: bucket {self.bucket!r} does not exist")
            except OSError as err:
                return self.error(err) if "not found" not in str(err).lower() else LocationError(
                    f"{self.uri}: bucket {self.bucket!r} does not exist")
        return LocationError(f"{self.uri}: not found")

    # ----------------------------------------------------------------------------------------------- queries

    def info(self):
        try:
            return self.filesystem.get_file_info(self.fs_path)
        except OSError as err:
            raise self.error(err, "inspect it") from None

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        if self.is_local:
            return os.path.exists(self.path)
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        if self.is_local:
            return os.path.isfile(self.path)
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        if self.is_local:
            return os.path.isdir(self.path)
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        import pyarrow.fs as pafs

        if self.is_local:
            try:
                return os.path.getsize(self.path)
            except OSError as err:
                raise self.error(err) from None
        info = self.info()
        if info.type != pafs.FileType.File:
            raise self.not_found_error() if info.type == pafs.FileType.NotFound else LocationError(
                f"{self.uri} is a directory, not a file")
        return int(info.size)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this file's content cheaply: its URI, size and modification time."""
        info = self.info() if not self.is_local else None
        if self.is_local:
            st = os.stat(self.path)
            return {"uri": os.path.abspath(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return {"uri": self.uri, "size": info.size,
                "mtime_ns": info.mtime_ns if info.mtime is not None else None}

    def list(self) -> list[Location]:
        """The entries directly below this location (empty if there are none)."""
        import pyarrow.fs as pafs

        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True))
        except OSError as err:
            raise self.error(err, "list it") from None
        return [self.join(posixpath.basename(i.path)) for i in infos]

    # ---------------------------------------------------------------------------------------------- contents

    def open(self, buffer_size: int = 8 << 20) -> io.BufferedReader:
        """A seekable binary reader; on object stores every refill of the buffer is one ranged GET of
        `buffer_size` bytes, so a reader streams from any offset without downloading the whole object."""
        if self.is_local:
            try:
                return open(self.path, "rb", buffering=min(buffer_size, 1 << 20))
            except OSError as err:
                raise (err if isinstance(err, (FileNotFoundError, IsADirectoryError)) else self.error(err)) from None
        try:
            handle = self.filesystem.open_input_file(self.fs_path)
        except (OSError, FileNotFoundError) as err:
            raise self.error(err, "open it") from None
        return io.BufferedReader(_RangedRaw(handle, self), buffer_size=buffer_size)

    def read_bytes(self) -> bytes:
        if self.is_local:
            try:
                with open(self.path, "rb") as fh:
                    return fh.read()
            except OSError as err:
                raise self.error(err, "read it") from None
        try:
            with self.filesystem.open_input_stream(self.fs_path, compression=None) as fh:
                return fh.read()
        except (OSError, FileNotFoundError) as err:
            raise self.error(err, "read it") from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """Write the whole object; local files are written to a temporary name and renamed (atomic), an object
        store PUT is atomic by itself."""
        if self.is_local:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)
            return
        try:
            with self.filesystem.open_output_stream(self.fs_path, compression=None) as fh:
                fh.write(data)
        except OSError as err:
            raise self.error(err, "write it") from None

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self) -> None:
        """Create the directory (local only: object stores have no directories)."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)

    def delete(self) -> None:
        """Delete a file, or a directory tree; nothing happens if it does not exist."""
        import shutil

        if self.is_local:
            if os.path.isdir(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
            elif os.path.exists(self.path):
                os.remove(self.path)
            return
        import pyarrow.fs as pafs

        info = self.info()
        try:
            if info.type == pafs.FileType.Directory:
                self.filesystem.delete_dir(self.fs_path)
            elif info.type == pafs.FileType.File:
                self.filesystem.delete_file(self.fs_path)
        except OSError as err:
            raise self.error(err, "delete it") from None

    def copy_tree_to(self, dest: Location) -> None:
        """Copy every file below this location to the same relative names below `dest`."""
        import pyarrow.fs as pafs

        pafs.copy_files(self.fs_path, dest.fs_path, source_filesystem=self.filesystem,
                        destination_filesystem=dest.filesystem)

    def local_copy(self, cache_dir: str | os.PathLike | None = None) -> str:
        """A local file with this object's content: the path itself for local files; for object stores a copy in
        a per-node cache (`$RDSCALE_CACHE_DIR`, default ~/.cache/rdscale/objects), fetched once (a file lock
        makes concurrent processes on one node wait for the first) and refetched when the object's size or
        modification time changes."""
        import fcntl
        import hashlib
        import json

        if self.is_local:
            return self.path
        root = os.fspath(cache_dir or os.environ.get("RDSCALE_CACHE_DIR")
                         or os.path.join(os.path.expanduser("~"), ".cache", "rdscale", "objects"))
        folder = os.path.join(root, hashlib.sha256(self.uri.encode()).hexdigest()[:24])
        os.makedirs(folder, exist_ok=True)
        target, stamp_file = os.path.join(folder, self.name or "object"), os.path.join(folder, "stamp.json")
        remote = self.info()
        if remote.type.name != "File":
            raise self.not_found_error() if remote.type.name == "NotFound" else LocationError(
                f"{self.uri} is a directory, not a file")
        stamp = {"uri": self.uri, "size": remote.size, "mtime_ns": remote.mtime_ns}
        with open(os.path.join(folder, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(stamp_file) as fh:
                    if json.load(fh) == stamp and os.path.getsize(target) == remote.size:
                        return target
            except (OSError, ValueError):
                pass
            tmp = target + ".part"
            try:
                with self.filesystem.open_input_stream(self.fs_path, compression=None) as src, \
                        open(tmp, "wb") as dst:
                    while chunk := src.read(8 << 20):
                        dst.write(chunk)
            except OSError as err:
                raise self.error(err, "fetch it") from None
            os.replace(tmp, target)
            with open(stamp_file, "w") as fh:
                json.dump(stamp, fh)
        return target

    def walk(self) -> Iterator[Location]:
        """Every file below this location."""
        import pyarrow.fs as pafs

        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.fs_path, recursive=True,
                                                                    allow_not_found=True))
        except OSError as err:
            raise self.error(err, "list it") from None
        base = self.fs_path.rstrip("/") + "/"
        for i in infos:
            if i.type == pafs.FileType.File:
                yield self.join(*i.path[len(base):].split("/"))


class _RangedRaw(io.RawIOBase):
    """A raw reader over a pyarrow RandomAccessFile: each read is one positioned (ranged) read."""

    def __init__(self, handle, location: Location):
        self._h = handle
        self._loc = location
        self._pos = 0
        self._size = handle.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        try:
            data = self._h.read_at(n, self._pos)
        except OSError as err:
            raise self._loc.error(err, "read it") from None
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._h.close()
        super().close()
