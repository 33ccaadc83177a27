"""Storage URIs against the local disk and a real S3 endpoint (moto's server) on loopback."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from hotdog_ray import storage
from hotdog_ray.storage import StorageError, check_exists, resolve


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
    assert storage.read_text(f"s3://{bucket}/x/y.txt") == "hello"


def test_s3_specific_endpoint_variable_wins(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    bucket = s3.bucket()
    storage.write_text(f"s3://{bucket}/k.txt", "v")
    assert storage.read_text(f"s3://{bucket}/k.txt") == "v"


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
