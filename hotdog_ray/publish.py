"""Writing and publishing a scoring run's partition so that no published row is ever lost.

A run writes (:class:`PartitionWriter`) into ``<output>/_staging/date=YYYY-MM-DD-<score_id>/``; only a complete run replaces the
published ``date=YYYY-MM-DD`` partition, by renames on a local disk and copy-then-delete on object
stores, and what a killed run left behind is restored or cleaned by the next run of the date.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hotdog_ray import storage

log = logging.getLogger(__name__)

REPLACED = ".replaced"  # suffix, in staging, of a published partition being swapped out


class PartitionWriter:
    """Arrow blocks, as they arrive, into Parquet files ``<prefix>_<n>.parquet`` in one folder: row
    groups of at least ``group_rows`` rows (a small block waits for the next), and a new file once
    one holds ``file_rows``. Files are named after the run, so that an object store's publish (copy,
    then delete) never overwrites a file of the run it replaces."""

    def __init__(
        self, fs: pafs.FileSystem, folder: str, prefix: str, *, group_rows: int, file_rows: int
    ) -> None:
        self.fs, self.folder, self.prefix = fs, folder, prefix
        self.group_rows, self.file_rows = group_rows, file_rows
        self.rows = 0  # every row written so far, pending ones included
        self.files = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        fs.create_dir(folder)

    def write(self, block: pa.Table) -> None:
        self._pending.append(block)
        self.rows += block.num_rows
        self._pending_rows += block.num_rows
        if self._pending_rows >= self.group_rows:
            self._flush()

    def close(self) -> None:
        """Writes what is pending and closes the last file."""
        if self._pending:
            self._flush()
        self._close_file()

    def __enter__(self) -> "PartitionWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # a failed run's rows are never published: only release the open file
            self._close_file()

    def _flush(self) -> None:
        group = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        if self._writer is None or self._in_file >= self.file_rows:
            self._close_file()
            path = f"{self.folder}/{self.prefix}_{self.files:06d}.parquet"
            self._writer = pq.ParquetWriter(path, group.schema, filesystem=self.fs)
            self.files, self._in_file = self.files + 1, 0
        self._writer.write_table(group)
        self._in_file += group.num_rows

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def partition_name(date: dt.date) -> str:
    return f"date={date.isoformat()}"


def clean_stale_staging(out, day: dt.date) -> None:
    """Remove what killed runs of this date left in staging (their data was never published)."""

    root = out.join("_staging")
    for name in storage.list_dirs(root):
        if name.startswith(partition_name(day) + "-"):
            log.info("removing %s/%s, left by an interrupted run", root.uri, name)
            out.fs.delete_dir(root.join(name).path)
    if not storage.list_dirs(root) and out.fs.get_file_info(root.path).type == pafs.FileType.Directory:
        out.fs.delete_dir(root.path)


def count_rows(fs, path: str) -> tuple[int, int]:
    """(rows, rows with an error) of the Parquet under ``path`` (0, 0 when nothing was written)."""

    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return 0, 0
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["error"])
    return table.num_rows, table.num_rows - int(pc.sum(pc.is_null(table["error"])).as_py() or 0)


def publish(fs, staging: str, final: str) -> None:
    """Replace ``final`` by ``staging`` so that a crash at any point loses no published row.

    Local filesystems: two renames (the old partition aside into staging, the new one in), then the
    old copy is deleted; a run killed between the renames leaves the old copy, which the next run
    puts back before it starts (``restore_interrupted_publish``). Object stores have no rename: the
    staged files are copied in first (each run names its files after its score_id), then the earlier run's
    files are deleted, so a crash in between leaves both runs' rows (told apart by ``score_id``) until
    the next run of the date replaces them, rather than a partition with rows missing.
    """

    exists = fs.get_file_info(final).type != pafs.FileType.NotFound
    if isinstance(fs, pafs.LocalFileSystem):
        aside = staging + REPLACED
        if exists:
            fs.move(final, aside)
        fs.move(staging, final)
        if exists:
            fs.delete_dir(aside)
        return
    before = (
        {
            i.path
            for i in fs.get_file_info(pafs.FileSelector(final, recursive=True))
            if i.type == pafs.FileType.File
        }
        if exists
        else set()
    )
    pafs.copy_files(staging, final, source_filesystem=fs, destination_filesystem=fs)
    staged = {
        i.path.replace(staging, final, 1)
        for i in fs.get_file_info(pafs.FileSelector(staging, recursive=True))
        if i.type == pafs.FileType.File
    }
    for path in sorted(before - staged):
        fs.delete_file(path)
    fs.delete_dir(staging)


def restore_interrupted_publish(out, day: dt.date) -> bool:
    """Put back a partition that a run killed mid-publish left aside in staging (local filesystems)."""

    final, root = out.join(partition_name(day)), out.join("_staging")
    if out.fs.get_file_info(final.path).type != pafs.FileType.NotFound:
        return False
    aside = [
        n for n in storage.list_dirs(root) if n.startswith(partition_name(day) + "-") and n.endswith(REPLACED)
    ]
    if not aside:
        return False
    log.warning("restoring %s, left aside by a run killed while publishing", final.uri)
    out.fs.move(root.join(aside[0]).path, final.path)
    return True
