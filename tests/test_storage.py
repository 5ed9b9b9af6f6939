import boto3
import pytest

from lowlight import storage


@pytest.fixture
def bucket(s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="store-test")
    return "s3://store-test"


def test_local_atomic_write_leaves_no_temporaries(tmp_path):
    target = tmp_path / "a" / "b.txt"
    storage.atomic_write_text(str(target), "hello")
    storage.atomic_write_text(str(target), "again")
    assert target.read_text() == "again"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]


def test_s3_round_trip_listing_and_move(bucket, s3_endpoint):
    url = storage.join(bucket, "dir", "x.bin")
    storage.atomic_write_bytes(url, b"\x00\x01", s3_endpoint)
    assert storage.exists(url, s3_endpoint)
    assert storage.read_bytes(url, s3_endpoint) == b"\x00\x01"
    assert storage.listdir(storage.join(bucket, "dir"), "*.bin", s3_endpoint) == [url]
    moved = storage.join(bucket, "dir", "y.bin")
    storage.move(url, moved, s3_endpoint)
    assert not storage.exists(url, s3_endpoint)
    assert storage.read_bytes(moved, s3_endpoint) == b"\x00\x01"


def test_endpoint_from_environment(bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    storage.atomic_write_text(storage.join(bucket, "env.txt"), "via env")
    assert storage.read_text(storage.join(bucket, "env.txt")) == "via env"
