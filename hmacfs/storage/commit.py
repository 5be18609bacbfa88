# -*- test-case-name: tests.test_storage -*-
"""
The commit protocol: how a finished partial file becomes a stored file, atomically and
durably, never overwriting one.

Order: set the metadata attribute on the partial file (where the store keeps metadata in
attributes), fsync data, write sidecar metadata to a temporary name (where it does not),
link the partial to the target (atomic, never overwrites), move the sidecar into place,
unlink the partial and its record, fsync directories, and only then close (and so unlock)
the partial file, so nobody can reopen it in between.  Metadata reaches its final name
only after the link succeeded (an attribute is on our own file), so a losing upload never
touches the existing file's metadata.  On any failure nothing of
this upload remains (not even at the target).  Every name is reached through directory
descriptors (the target's directories walked again with ``openat``), so a link swapped in
during the upload is never followed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from hmacfs.storage.fs_paths import open_parents
from hmacfs.storage.fsio import close_all, etag, lexists, log, translate, unlink_quietly
from hmacfs.storage.interface import StorageError, StoredFile
from hmacfs.storage.layout import TMP_SUFFIX, meta_name, record_name
from hmacfs.storage.metadata import set_meta_xattr, write_meta

if TYPE_CHECKING:
    from hmacfs.storage.fs_dirs import PrivateDirs
    from hmacfs.storage.partial import PartialUpload


def publish(upload: PartialUpload, sha256_hex: str | None) -> StoredFile:
    """Commit ``upload`` (its lock held, marked finished); 409 if its target exists."""
    private = upload.private
    dirs = upload.dirs
    segments = upload.segments
    key = upload.key
    name = upload.file_name
    record = record_name(key)
    meta_final = meta_name(key)
    meta_tmp = meta_final + TMP_SUFFIX
    meta_dirs = dirs
    sidecar = not private.meta_xattr
    linked = placed = False
    parents: list[int] = []
    parent = -1
    try:
        if not sidecar:
            # On the file itself, before its data fsync (which makes it durable with the
            # data): no sidecar to write, rename or fsync the directory of.
            try:
                set_meta_xattr(upload.fd, **_meta_fields(upload, sha256_hex))
            except OSError as error:
                # Too big for the filesystem's attribute space (a very long path), say:
                # this file gets a sidecar (a full disk fails there too).
                log.debug("{path}: metadata attribute refused ({error}); sidecar instead",
                          path=upload.name, error=error)
                sidecar = True
        os.fsync(upload.fd)
        if sidecar:
            try:
                meta_dirs = private.get()
                write_meta(meta_tmp, meta_dirs.meta, **_meta_fields(upload, sha256_hex))
            except FileNotFoundError:
                # .hmacfs/meta was removed under us: recreate it and try once more.
                meta_dirs = private.get(force=True)
                write_meta(meta_tmp, meta_dirs.meta, **_meta_fields(upload, sha256_hex))
        else:
            meta_dirs = private.get()
        # A retention sweep may have removed now-empty parents during the upload: walked
        # again, unless the admission of this same job kept them open (then walked again
        # only if the link finds its directory gone).
        kept, upload.parents = upload.parents, None
        if kept is not None and meta_dirs is not dirs:
            close_all(kept)  # the root was replaced meanwhile: walk from the new one
            kept = None
        parents = kept if kept is not None else _open_parents(meta_dirs.root, segments, private)
        parent = parents[-1] if parents else meta_dirs.root
        def link() -> None:
            os.link(name, segments[-1], src_dir_fd=dirs.partial, dst_dir_fd=parent,
                    follow_symlinks=False)

        try:
            try:
                link()
            except FileNotFoundError:
                if kept is None or not lexists(name, dirs.partial):
                    raise
                close_all(parents)
                parents = []  # closed: nothing for the ``finally`` if the walk fails
                parents = _open_parents(meta_dirs.root, segments, private)
                parent = parents[-1] if parents else meta_dirs.root
                link()
        except FileExistsError:
            log.info("upload of {path} lost to an existing file", path=upload.name)
            raise StorageError(409, "file already exists") from None
        except FileNotFoundError:
            if lexists(name, dirs.partial):
                raise
            log.warn("upload of {path} lost: its partial file was removed", path=upload.name)
            raise StorageError(503, "the upload was removed from the store; retry") from None
        linked = True
        if sidecar:
            os.rename(meta_tmp, meta_final, src_dir_fd=meta_dirs.meta, dst_dir_fd=meta_dirs.meta)
            placed = True
        os.unlink(name, dir_fd=dirs.partial)
        if upload.has_record:
            unlink_quietly(record, dirs.partial)
        # The target is a second name of the file we hold: its size, mtime and
        # inode are the stored file's (link changes only its ctime).
        st = os.fstat(upload.fd)
        upload.close()
        # The target's directory holds the new name.  Every directory above it was made
        # durable in its own parent when it was created (``open_parents``), so one fsync.
        os.fsync(parents[-1] if parents else meta_dirs.root)
        if sidecar:
            os.fsync(meta_dirs.meta)
    except BaseException as e:
        if placed:
            unlink_quietly(meta_final, meta_dirs.meta)
        if linked:
            unlink_quietly(segments[-1], parent)
        if sidecar:
            unlink_quietly(meta_tmp, meta_dirs.meta)
        unlink_quietly(name, dirs.partial)
        if upload.has_record:
            unlink_quietly(record, dirs.partial)
        upload.close()
        if isinstance(e, OSError):
            translated = translate(e)
            if translated is not e:
                raise translated from e
        raise
    finally:
        close_all(parents)
    log.debug("committed {path}: {size} bytes", path=upload.name, size=st.st_size)
    # Described from what was just written: reading the metadata back would cost
    # a stat, an open and a JSON parse per upload.
    return StoredFile(
        path=upload.target,
        size=st.st_size,
        mtime=st.st_mtime,
        content_type=upload.content_type,
        etag=etag(st),
        sha256=sha256_hex,
    )


def _open_parents(root: int, segments: tuple[str, ...], private: PrivateDirs) -> list[int]:
    opened = open_parents(root, segments, create=True, root_prefix=private.root_prefix)
    assert opened is not None  # create=True: missing raises
    return opened


def _meta_fields(upload: PartialUpload, sha256_hex: str | None) -> dict[str, object]:
    return {
        "path": upload.name,
        "content_type": upload.content_type,
        "size": upload.written,
        "sha256": sha256_hex,
        "created": upload.now(),
    }
