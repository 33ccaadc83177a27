"""Storage URIs against the local disk and a real S3 endpoint (moto's server) on loopback."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from hotdog_ray import storage
from hotdog_ray.errors import StorageError
from hotdog_ray.storage import check_exists, resolve


def test_plain_paths_and_file_uris_are_local(tmp_path):
    (tmp_path / "a").mkdir()
    for uri in (str(tmp_path / "a"), f"file://{tmp_path}/a"):
        loc = resolve(uri)
        assert loc.is_local and loc.path == str(tmp_path / "a")
    assert resolve("relative/dir").path.endswith("/relative/dir")


def test_s3_uses_endpoint_from_environment(s3):
    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="x/y.txt", Body=b"hello")
    loc = resolve(f"s3://{bucket}/x")
    assert isinstance(loc.fs, pafs.S3FileSystem)
    assert loc.path == f"{bucket}/x"
    # A real round trip through pyarrow proves the endpoint was honoured (AWS would refuse these keys).
    assert storage.list_files(loc) == [f"{bucket}/x/y.txt"]
    assert storage.read_bytes(loc.fs, f"{bucket}/x/y.txt") == b"hello"


def test_s3_specific_endpoint_variable_wins(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    bucket = s3.bucket()
    loc = resolve(f"s3://{bucket}/k.txt")
    storage.write_bytes(loc.fs, loc.path, b"v")
    assert s3.client.get_object(Bucket=bucket, Key="k.txt")["Body"].read() == b"v"


def test_endpoint_query_form_also_works(s3):
    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="p/f.bin", Body=b"1")
    host = s3.endpoint.removeprefix("http://")
    loc = resolve(f"s3://{bucket}/p?endpoint_override={host}&scheme=http&region=us-east-1")
    assert storage.list_files(loc) == [f"{bucket}/p/f.bin"]


def test_missing_bucket_is_named(s3):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        check_exists("s3://no-such-bucket/data")


def test_missing_prefix_is_reported(s3):
    bucket = s3.bucket()
    with pytest.raises(StorageError, match="nothing found"):
        check_exists(f"s3://{bucket}/not/there")


def test_missing_credentials_fail_fast(s3, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match="no S3 credentials"):
        check_exists("s3://bucket/data")


def test_uri_without_bucket_and_missing_local_path(tmp_path):
    with pytest.raises(StorageError, match="no bucket"):
        resolve("s3:///prefix")
    with pytest.raises(StorageError, match="nothing found"):
        check_exists(tmp_path / "absent")


def test_gcs_goes_through_pyarrow():
    loc = resolve("gs://some-bucket/data")
    assert type(loc.fs).__name__ == "GcsFileSystem" and loc.path == "some-bucket/data"


def test_listing_skips_hidden_files_and_sorts(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("z.png", "a.png", ".DS_Store"):
        (tmp_path / "b" / name).write_bytes(b"x")
    loc = resolve(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in storage.list_files(loc)] == ["a.png", "z.png"]
    assert storage.list_dirs(loc) == ["b"]


def test_pinned_makes_local_relative_paths_absolute_only(tmp_path, monkeypatch):
    from hotdog_ray.storage import pinned

    monkeypatch.chdir(tmp_path)
    assert pinned("data/sample") == str(tmp_path / "data" / "sample")
    assert pinned(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert pinned("s3://bucket/prefix") == "s3://bucket/prefix"
    assert pinned("models:/digits@champion") == "models:/digits@champion"  # hotdog serve pins its model_uri


class ThrottlingProxy:
    """A real HTTP hop in front of moto that answers the first ``throttle`` GETs of a key with the
    503 SlowDown an object store sends when throttling, and counts the requests for each key."""

    SLOW_DOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        self.throttle: dict[str, int] = {}
        self.requests: Counter = Counter()
        proxy, host = self, urlparse(upstream).netloc

        class Handler(BaseHTTPRequestHandler):
            def relay(self) -> None:
                key = self.path.split("?")[0]
                proxy.requests[key] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET" and proxy.throttle.get(key, 0) > 0:
                    proxy.throttle[key] -= 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(proxy.SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(host, timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():  # HEAD keeps the object's Content-Length
                    if name.lower() not in ("transfer-encoding", "connection") and (
                        self.command == "HEAD" or name.lower() != "content-length"
                    ):
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = relay

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_s3_requests_ride_out_throttling_but_a_missing_key_fails_at_once(s3, monkeypatch):
    bucket = s3.bucket()
    # Larger than the error's XML: pyarrow reads a GET's body into a buffer the size of the object.
    image = bytes(range(256)) * 16
    s3.client.put_object(Bucket=bucket, Key="in/a.jpg", Body=image)
    proxy = ThrottlingProxy(s3.endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        key, uri = f"/{bucket}/in/a.jpg", f"s3://{bucket}/in/a.jpg"

        monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)  # our default: 5 tries
        proxy.throttle[key] = 2  # two SlowDowns, then the object: read on the third try
        loc = resolve(uri)
        assert storage.read_bytes(loc.fs, loc.path) == image
        assert proxy.throttle[key] == 0

        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no retries (pyarrow's default would try 3 times)
        proxy.throttle[key] = 1  # throttled: the error names the cause
        loc = resolve(uri)
        with pytest.raises(OSError, match="SLOW_DOWN|SERVICE_UNAVAILABLE"):
            storage.read_bytes(loc.fs, loc.path)
        assert proxy.throttle[key] == 0

        with pytest.raises(FileNotFoundError):
            storage.read_bytes(loc.fs, loc.path.replace("a.jpg", "missing.jpg"))
        assert proxy.requests[f"/{bucket}/in/missing.jpg"] == 1  # a missing key is not retried
    finally:
        proxy.close()


def test_max_attempts_must_be_a_whole_number(s3, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS"):
        resolve("s3://bucket/x")
