"""Folder locks: the generator's stages share one lock per folder; the segmenter's own name lets it run beside them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from scripts.errors import OutputWriteError
from scripts.locking import FolderLockedError, lock_folder, release_folder

ROOT = Path(__file__).resolve().parents[1]


def test_a_named_lock_runs_beside_the_stage_lock_but_not_beside_itself(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from scripts.locking import lock_folder; lock_folder(sys.argv[1], 'generator'); "
            "print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError, match="generator"):
            lock_folder(str(tmp_path), "second generator stage")
        lock_folder(str(tmp_path), "segmenter", ".segmenter.lock")  # another name: allowed beside it
        release_folder(str(tmp_path), ".segmenter.lock")
    finally:
        holder.kill()
        holder.wait()
    lock_folder(str(tmp_path), "after the holder ended")  # the kernel released the dead process's lock
    release_folder(str(tmp_path))


def test_a_folder_that_cannot_be_created_is_a_short_output_error(tmp_path):
    """``--ckpt_dir`` under a file (or on a read-only disk) was a NotADirectoryError traceback."""
    afile = tmp_path / "requests.csv"
    afile.write_text("x\n")
    with pytest.raises(OutputWriteError, match="requests.csv/models: cannot create the output folder"):
        lock_folder(str(afile / "models"))
