"""scripts/files.py: modes of written files, temp-file names, stale temp files after a kill, SHA-256, NIfTI."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.files import (
    atomic_path,
    nifti_gz_bytes,
    remove_stale_temp,
    sha256,
    write_bytes_atomic,
    write_nifti,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
ARTEFACT_GLOBS = ("*.nii.gz", "*.nii", "*.pt", "*.json", "*.png", "*.csv")


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    """Every writer gives 0666 minus the umask (0644 under 022), like open(path, "w"), not mkstemp's 0600."""
    from scripts.handlers import atomic_torch_save
    from scripts.visualize import save_montage

    for mask, expected in ((0o022, 0o644), (0o027, 0o640)):
        umask(mask)
        folder = tmp_path / f"m{mask:o}"
        with open(tmp_path / f"plain{mask:o}.txt", "w"):
            pass
        assert _mode(tmp_path / f"plain{mask:o}.txt") == expected
        write_text_atomic(folder / "report.json", "{}")
        write_bytes_atomic(folder / "cohort.csv", b"id\n")
        write_nifti(folder / "volume.nii.gz", np.zeros((4, 4, 2), np.float32), np.eye(4))
        atomic_torch_save({"x": torch.zeros(1)}, str(folder / "model.pt"))
        save_montage([("v", np.zeros((4, 8, 8), np.float32))], str(folder / "preview.png"))
        for name in ("report.json", "cohort.csv", "volume.nii.gz", "model.pt", "preview.png"):
            assert _mode(folder / name) == expected, name


def test_temp_file_matches_no_artefact_glob(tmp_path):
    with atomic_path(tmp_path / "row0000_sample000.nii.gz") as tmp:
        name = os.path.basename(tmp)
        assert name.startswith(".row0000_sample000.nii.gz.") and name.endswith(".part")
        assert os.path.isfile(tmp)  # created empty, then filled by the writer
        assert not any(fnmatch.fnmatch(name, g) for g in ARTEFACT_GLOBS)
        Path(tmp).write_bytes(b"data")
    assert os.listdir(tmp_path) == ["row0000_sample000.nii.gz"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "model.pt") as tmp:  # a failed write leaves nothing
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["row0000_sample000.nii.gz"]


KILLED_WRITER = """
import os, signal, sys
from scripts.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"half a volume")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write: no cleanup runs
"""


def test_killed_writer_leaves_no_artefact_and_the_next_stage_removes_its_temp(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.nii.gz").write_bytes(b"earlier")
    (out / "notes.txt").write_text("keep")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(out / "good.nii.gz")],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == -9
    names = os.listdir(out)
    assert (out / "good.nii.gz").read_bytes() == b"earlier"  # the earlier file is intact
    leftovers = [n for n in names if n.endswith(".part")]
    assert len(leftovers) == 1  # the kill left its temp file ...
    for pattern in ARTEFACT_GLOBS:  # ... which no artefact glob (hidden files included, like find -name) counts
        assert fnmatch.filter(names, pattern) == (["good.nii.gz"] if pattern == "*.nii.gz" else [])
    (out / ".tmp_abc.pt").write_bytes(b"")  # the earlier naming of temp files is cleaned up too
    removed = remove_stale_temp(out)
    assert sorted(os.path.basename(p) for p in removed) == sorted([leftovers[0], ".tmp_abc.pt"])
    assert sorted(os.listdir(out)) == ["good.nii.gz", "notes.txt"]


def test_remove_stale_temp_by_name_spares_other_stages(tmp_path):
    for name in (".autoencoder.pt.1a2b3c4d.part", ".diffusion.pt.5e6f7a8b.part", ".lock"):
        (tmp_path / name).write_bytes(b"")
    removed = remove_stale_temp(tmp_path, ["autoencoder.pt", "autoencoder_last.pt"])
    assert [os.path.basename(p) for p in removed] == [".autoencoder.pt.1a2b3c4d.part"]
    assert sorted(os.listdir(tmp_path)) == [".diffusion.pt.5e6f7a8b.part", ".lock"]
    assert remove_stale_temp(tmp_path / "absent") == []


def test_checkpoint_handler_removes_its_stale_temp_files(tmp_path):
    from ignite.engine import Engine
    from scripts.handlers import AtomicCheckpoint

    (tmp_path / ".ae_last.pt.0badcafe.part").write_bytes(b"")
    (tmp_path / ".tmp_k2j3h4.pt").write_bytes(b"")  # left by a kill under the earlier naming: it stayed for good
    (tmp_path / ".other.pt.0badcafe.part").write_bytes(b"")
    AtomicCheckpoint(str(tmp_path), {}, "ae.pt", "ae_last.pt").attach(Engine(lambda e, b: None))
    assert os.listdir(tmp_path) == [".other.pt.0badcafe.part"]


def test_sha256(tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    assert sha256(path) == hashlib.sha256(data).hexdigest()


def test_one_nifti_writer_reproducible_with_header(tmp_path):
    array = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    affine = np.diag([1.5, 1.6, 8.0, 1.0])
    assert nifti_gz_bytes(array, affine, "x") == nifti_gz_bytes(array, affine, "x")  # gzip mtime 0
    write_nifti(tmp_path / "v.nii.gz", array, affine, "synthetic")
    image = nib.load(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(np.asarray(image.dataobj), array)
    np.testing.assert_allclose(image.affine, affine)
    assert image.header["qform_code"] == 1 and image.header["sform_code"] == 1
    assert image.header.get_xyzt_units()[0] == "mm" and image.header["descrip"].tobytes().startswith(b"synthetic")
    import scripts.phantom
    import scripts.synthesis

    assert not hasattr(scripts.phantom, "_nifti_gz_bytes")  # phantom and synthesis share scripts.files' writer
    assert "write_nifti" in scripts.synthesis.save_nifti.__code__.co_names
