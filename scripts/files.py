"""File helpers: atomic writes, stale temp files, SHA-256, the NIfTI writer.

Every artefact (checkpoint, report, NIfTI volume, cohort file, PNG) is written to a temp file
beside it and renamed over the destination only when complete. What a crash can and cannot lose:

- a finished file is never half-written: a reader sees the old file or the new one;
- a file that a failed run did not finish is not replaced (the previous one stays);
- a killed process (``kill -9``, power loss) can leave its temp file,
  ``.<name>.<random>.part``: hidden, and matched by no ``*.nii.gz`` / ``*.pt`` / ``*.json`` /
  ``*.png`` / ``*.csv`` glob. Each stage removes the stale temp files of its outputs when it
  starts (:func:`remove_stale_temp`);
- the rename is atomic, but without an fsync of the folder a power loss right after it can
  still lose the rename itself (the old file then remains).

Final files get the mode a plain ``open(path, "w")`` gives (0666 minus the umask: 0644 under
the usual umask 022), not the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator

import numpy as np
from scripts.errors import DataError, OutputWriteError

TEMP_SUFFIX = ".part"
# below this much free space a RuntimeError of a writer (torch's iostream error) is taken for a full disk
_FULL_DISK_BYTES = 16 * 2**20
_GZIP_LEVEL = 6


def temp_name(path: str | os.PathLike) -> str:
    """A fresh temp path for ``path``: ``<folder>/.<name>.<random>.part`` (hidden, no artefact suffix)."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside ``path``; rename it over ``path`` when the block succeeds.

    The temp file exists (empty) when the block starts, created like ``open(path, "w")`` would
    create a file (mode 0666 minus the umask). Writers that pick a format from the file name
    (matplotlib, nibabel) must be told the format: the temp name ends in ``.part``.

    Args:
        path: the destination; its folder is created if needed.

    Yields:
        the temp path to write to. It is removed if the block raises.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        while True:
            tmp = temp_name(path)
            try:  # O_EXCL: never reuse another writer's temp file; mode 0o666 & ~umask like open(path, "w")
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:  # pragma: no cover - 32 random bits collided
                continue
    except OSError as err:
        raise OutputWriteError(
            f"{path}: cannot create a file in {folder} ({err.strerror or err}); choose a writable output folder "
            "(--bundle_root / --output_dir) or fix its permissions"
        ) from err
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if _out_of_space(err, folder):
            free = shutil.disk_usage(folder).free
            raise OutputWriteError(
                f"{path}: the disk is full ({free / 2**20:.1f} MiB free in {folder} after {written / 2**20:.1f} MiB "
                "of this file were written; the previous file, if any, is kept): free space or write elsewhere"
            ) from err
        raise


def _out_of_space(err: BaseException, folder: str) -> bool:
    """Whether ``err`` is a failed write on a full disk (torch.save reports ENOSPC as a bare iostream error)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, RuntimeError) and shutil.disk_usage(folder).free < _FULL_DISK_BYTES


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove_stale_temp(
    folder: str | os.PathLike, names: Iterable[str] | None = None, recursive: bool = False
) -> list[str]:
    """Remove the temp files (and staging folders) that killed writers left in ``folder``.

    A stage calls this when it starts, for its own output folder.

    Also removes the ``.tmp_*`` files of the bundle's earlier temp naming (with ``names``: those
    with the same suffix, e.g. ``.tmp_*.pt``).

    Args:
        folder: the stage's output folder (a missing folder has nothing to remove).
        names: only the temp files of these destination names (e.g. ``["autoencoder.pt"]``), so
            a stage never touches another stage's files in a shared folder; None: every temp file.
        recursive: also look in sub-folders.

    Returns:
        the removed paths.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    prefix = "**/" if recursive else ""
    if names is None:
        patterns = [f".*{TEMP_SUFFIX}", ".tmp_*"]
    else:
        names = list(names)
        patterns = [f".{glob.escape(n)}.*{TEMP_SUFFIX}" for n in names]
        # the earlier naming (.tmp_<random><suffix>) did not record the destination: match by suffix
        patterns += sorted({f".tmp_*{_suffix(n)}" for n in names})
    removed = []
    for pattern in patterns:
        found = glob.glob(os.path.join(glob.escape(folder), prefix + pattern), recursive=recursive, include_hidden=True)
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(path) and not os.path.islink(path):  # a staging folder (scripts.phantom)
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed.append(path)
    return sorted(removed)


def _suffix(name: str) -> str:
    """``.nii.gz`` for NIfTI files, else the last extension."""
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (``hashlib.file_digest``: reads in blocks, not into memory at once)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def bundle_path(path: str | os.PathLike, bundle_root: str | os.PathLike = ".") -> str:
    """``path`` relative to the bundle root when it lies under it, else as given.

    Checkpoints store the files they depend on this way, so a copied or moved bundle root
    finds its own files, not those of the root it was copied from.
    """
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(bundle_root))
    return str(path) if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def nifti_gz_bytes(array: np.ndarray, affine: np.ndarray, description: str | None = None) -> bytes:
    """A gzip-compressed NIfTI-1 image as bytes, byte-reproducible (gzip mtime 0, no file name).

    The header stores ``array``'s dtype, units mm / s, and ``affine`` as qform and sform (code 1).

    Args:
        array: the voxel array, in the axis order it is stored (X, Y, Z).
        affine: 4 x 4 voxel-to-world affine (mm).
        description: optional header ``descrip`` (at most 80 bytes).

    Returns:
        the ``.nii.gz`` file content.
    """
    import gzip
    import io

    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if description:
        image.header["descrip"] = description.encode()[:80]
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=_GZIP_LEVEL, mtime=0) as gz:
        gz.write(image.to_bytes())
    return buffer.getvalue()


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, description: str | None = None) -> None:
    """Write ``array`` as a ``.nii.gz`` file atomically (see :func:`nifti_gz_bytes`).

    Args:
        path: destination ``.nii.gz`` path.
        array: the voxel array (X, Y, Z).
        affine: 4 x 4 affine (mm).
        description: optional header ``descrip``.
    """
    write_bytes_atomic(path, nifti_gz_bytes(array, affine, description))


def refuse_duplicate_columns(path: str | os.PathLike, header: Iterable[str]) -> None:
    """Raise :class:`DataError` when a CSV header names a column twice.

    ``csv.DictReader`` keeps the last of two equal column names without a word, so a table with
    ``LVEDV`` twice would silently train on its second copy.
    """
    names = [str(h).strip() for h in header]
    duplicated = sorted({h for h in names if names.count(h) > 1})
    if duplicated:
        raise DataError(f"{os.fspath(path)}, header: duplicated column(s) {duplicated}")
