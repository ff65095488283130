"""The object store: datasets and reports, in S3 when a bucket is configured, otherwise in a
folder of the run directory. One interface for both, so callers never branch on it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Protocol

from abfleet.settings import Settings

DATASET_KEY = re.compile(r"datasets/train_V(\d+)\.csv$")


class NoDataset(FileNotFoundError):
    """No dataset version in the object store: a job that trains on one cannot run (yet)."""


class ObjectStore(Protocol):
    def put_file(self, path: Path, key: str) -> str: ...
    def put_bytes(self, body: bytes, key: str, content_type: str = "application/octet-stream") -> str: ...
    def get_file(self, key: str, path: Path) -> Path: ...
    def keys(self, prefix: str) -> list[str]: ...
    def location(self, key: str) -> str: ...


class LocalObjects:
    def __init__(self, root: Path):
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    def put_file(self, path: Path, key: str) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return self.location(key)

    def put_bytes(self, body: bytes, key: str, content_type: str = "application/octet-stream") -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        return self.location(key)

    def get_file(self, key: str, path: Path) -> Path:
        shutil.copyfile(self._path(key), path)
        return path

    def keys(self, prefix: str) -> list[str]:
        base = self.root
        return sorted(str(p.relative_to(base)) for p in base.glob(f"{prefix}**/*") if p.is_file())

    def location(self, key: str) -> str:
        return self._path(key).as_uri()


class S3Objects:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None):
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, path: Path, key: str) -> str:
        self.client.upload_file(str(path), self.bucket, self._key(key))
        return self.location(key)

    def put_bytes(self, body: bytes, key: str, content_type: str = "application/octet-stream") -> str:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, ContentType=content_type)
        return self.location(key)

    def get_file(self, key: str, path: Path) -> Path:
        self.client.download_file(self.bucket, self._key(key), str(path))
        return path

    def keys(self, prefix: str) -> list[str]:
        out = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            out.extend(o["Key"][strip:] for o in page.get("Contents", []))
        return sorted(out)

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(settings: Settings) -> ObjectStore:
    """The configured object store (S3 when a bucket is set)."""
    if settings.s3_bucket:
        return S3Objects(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url)
    return LocalObjects(settings.run_dir / "objects")


def dataset_versions(store: ObjectStore) -> list[tuple[int, str]]:
    """(n, key) of every `datasets/train_V{n}.csv`, oldest first."""
    found = [(int(m.group(1)), key) for key in store.keys("datasets/") if (m := DATASET_KEY.search(key))]
    return sorted(found)


def newest_dataset(store: ObjectStore) -> str:
    """The key of the newest dataset version; raises NoDataset when there is none."""
    versions = dataset_versions(store)
    if not versions:
        raise NoDataset("no datasets/train_V{n}.csv in the object store: publish one with `abfleet data publish CSV`")
    return versions[-1][1]


def publish_dataset(store: ObjectStore, csv: Path) -> str:
    """Store a raw CSV as the next dataset version; returns its key."""
    versions = dataset_versions(store)
    n = versions[-1][0] + 1 if versions else 1
    key = f"datasets/train_V{n}.csv"
    store.put_file(csv, key)
    return key
