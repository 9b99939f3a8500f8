"""A disk that fills up while a checkpoint is written, and a read-only checkpoints/ folder.

A real full or read-only filesystem needs mount privileges (and root ignores file modes), so
the tests make one folder behave like one: a small LD_PRELOAD library (tests/native/fs_faults.c,
built here with the C compiler DeepSpeed needs anyway) fails writes there with ENOSPC, or opens
for writing with EROFS, exactly as the kernel does. On a full disk torch's zip writer raises an
opaque "unexpected pos" error, which is what users saw before.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from launch_utils import run_training
from stackwise_ds.checkpoint.files import find_resume_tag, is_complete, layer_file_name, unreadable_files
from test_reliability import expect_error_on_every_rank

pytestmark = pytest.mark.multiprocess  # every test here launches training processes

SHIM_SOURCE = Path(__file__).parent / "native" / "fs_faults.c"


def build_fault_shim(directory: Path) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    assert compiler, "a C compiler is needed (DeepSpeed's JIT ops need one too): install gcc"
    library = directory / "fs_faults.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(library), str(SHIM_SOURCE), "-ldl"], check=True)
    return library


def test_a_full_disk_while_saving_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path):
    out, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    full = {"LD_PRELOAD": str(build_fault_shim(tmp_path)), "FULL_DISK_PATH": str(checkpoints / "step00000006")}
    proc = run_training(2, out, "training.save_interval=3", expect_ok=False, env=full)

    saving_failed = rf"could not save checkpoint step00000006 in {re.escape(str(checkpoints))}: "
    expect_error_on_every_rank(proc, 2, saving_failed + r"rank \d failed to write its files "
                                                        r"\(.*No space left on device")
    text = proc.stdout + proc.stderr
    assert "the previous checkpoint step00000003 is kept and `latest` still names it" in text
    assert "unexpected pos" not in text, "torch's opaque zip-writer error reached the user"
    # nothing saved before is lost: step 3 is still the complete, readable checkpoint to resume from
    assert find_resume_tag(checkpoints) == "step00000003"
    assert (checkpoints / "latest").read_text().strip() == "step00000003"
    assert not is_complete(checkpoints, "step00000006")
    assert unreadable_files(sorted((checkpoints / "step00000003").glob("*.pt"))) == []
    assert (checkpoints / "step00000003" / layer_file_name(0)).exists()
    assert not list(checkpoints.rglob(".write_probe_*")), "the probe write left a file behind"


def test_a_read_only_checkpoints_folder_is_refused_at_start_on_every_rank(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)  # e.g. left read-only by an archive step
    read_only = {"LD_PRELOAD": str(build_fault_shim(tmp_path)), "READONLY_PATH": str(out / "checkpoints")}
    proc = run_training(2, out, expect_ok=False, env=read_only)
    folder = re.escape(str(out / "checkpoints"))
    expect_error_on_every_rank(proc, 2, folder + r" \(under training.output_dir\) is not writable "
                                                 r"\(Read-only file system\): make it writable")
    assert "[stackwise] phase" not in proc.stdout, "training started before the check"
