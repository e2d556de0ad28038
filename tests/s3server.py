"""A real S3-compatible server on 127.0.0.1 for tests and bench.faults: moto's server mode (`moto[server]`,
installed by the dev extra), in a child process that the caller stops.

    with S3Server() as s3:
        uri = s3.uri("bucket", "cache")        # s3://bucket/cache?endpoint_override=...&scheme=http&region=...
        env = s3.env()                         # AWS_* variables for child processes (dummy credentials)

Readiness is a bounded number of HTTP probes, each with its own timeout, so a loaded machine only waits longer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

ACCESS_KEY = "adakdtestkey"
SECRET_KEY = "adakdtestsecret"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto_server on a free local port; `stop()` (or leaving the `with`) ends it."""

    def __init__(self, probes: int = 600) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(probes):
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; is moto[server] installed?")
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/moto-api/", timeout=5).read()
                break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"moto server on {self.endpoint} did not answer")
        for k, v in self.env().items():  # this process's pyarrow S3 clients too
            os.environ[k] = v

    def env(self) -> dict[str, str]:
        """The standard AWS variables a child process needs to reach this server (pyarrow and boto3 read them)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_REGION": REGION, "AWS_ENDPOINT_URL": f"http://{self.endpoint}", "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, bucket: str, key: str = "") -> str:
        """An s3:// URI on this server, endpoint and scheme as URI parameters (credentials from the environment)."""
        path = f"{bucket}/{key}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http&region={REGION}"

    def make_bucket(self, bucket: str) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region=REGION, access_key=ACCESS_KEY,
                               secret_key=SECRET_KEY, allow_bucket_creation=True)
        fs.create_dir(bucket)

    def reset(self) -> None:
        """Empty every bucket (moto's reset endpoint): one server serves a whole test module."""
        req = urllib.request.Request(f"http://{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=30).read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "S3Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
