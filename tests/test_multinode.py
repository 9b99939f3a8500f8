"""Two "nodes" on loopback: one ``deepspeed --no_ssh --node_rank N`` launcher per node, one rank each,
a 2-stage pipeline across them, exactly as on two machines (``--master_addr`` the first node).

The run trains and resumes on the same two nodes bitwise, and an output dir the nodes do not share
is refused on every rank.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch_utils import REPO, TINY, TRAIN, free_port, results

pytestmark = pytest.mark.multiprocess  # every test here launches training processes

RUN = ("training.save_interval=2", "training.eval_interval=0")


def launch_nodes(tmp_path: Path, output_dirs: list[Path], *overrides: str) -> list[subprocess.CompletedProcess]:
    """Start both node launchers at once (each blocks until the other joins); wait for both."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    procs = []
    for node, out in enumerate(output_dirs):
        sets = [arg for item in [*TINY, f"training.output_dir={out}", *overrides] for arg in ("--set", item)]
        command = [launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", port, TRAIN, *sets]
        procs.append(subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    return [subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
            for proc, out in zip(procs, outputs, strict=True)]


def test_two_nodes_train_a_two_stage_pipeline_and_resume(tmp_path):
    out = tmp_path / "shared_run"
    first = launch_nodes(tmp_path, [out, out], *RUN, "training.max_steps=6")
    assert [p.returncode for p in first] == [0, 0], first[0].stdout[-3000:] + first[1].stdout[-3000:]
    assert "2 stage(s) x 1 data-parallel" in first[0].stdout
    uninterrupted = results(out)["losses"]
    assert len(uninterrupted) == 6 and uninterrupted[-1] < uninterrupted[0]
    shutil.rmtree(out / "checkpoints" / "step00000006")  # the job died after step 4: resume on both nodes
    resumed = launch_nodes(tmp_path, [out, out], *RUN, "training.max_steps=6")
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stdout[-3000:] + resumed[1].stdout[-3000:]
    assert "resuming from" in resumed[0].stdout and "step00000004" in resumed[0].stdout
    assert results(out)["losses"] == uninterrupted  # steps 5-6 retrained bitwise across the two nodes


def test_an_output_dir_the_nodes_do_not_share_is_refused_on_every_rank(tmp_path):
    procs = launch_nodes(tmp_path, [tmp_path / "node_a_disk", tmp_path / "node_b_disk"], *RUN)
    for rank, proc in enumerate(procs):
        assert proc.returncode != 0
        assert f"error on rank {rank}: training.output_dir" in proc.stdout, proc.stdout[-3000:]
        assert "is not shared between the nodes: rank 1 on" in proc.stdout
