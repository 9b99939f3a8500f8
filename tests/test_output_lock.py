"""One writer per output dir, and a signal to the ``deepspeed`` runner alone stops its ranks.

One long 2-rank job is shared: a second job on its output dir is refused on every rank while it
runs; SIGTERM to its runner process only (what ``timeout deepspeed ...`` sends) stops every rank;
a re-run then takes over the dead job's lock record and resumes; a finished job leaves no record.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from launch_utils import REPO, run_training, train_command
from stackwise_ds.parallel.watchdog import _alive
from test_reliability import expect_error_on_every_rank, wait_for

pytestmark = pytest.mark.multiprocess  # every test here launches training processes

LONG = ("training.max_steps=2000", "training.save_interval=2", "training.eval_interval=0")


def rank_pids(output_dir) -> list[int]:
    beats = sorted((output_dir / ".heartbeat").glob("*/rank*.json"))  # rank0.json first
    return [json.loads(beat.read_text())["pid"] for beat in beats]


@pytest.fixture(scope="module")
def running_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("locked")
    log = open(out.parent / "locked_job.log", "w")
    # the runner is the process we start; it is NOT in a new session of its own, so only it gets the signal
    job = subprocess.Popen(train_command(2, out, list(LONG)), cwd=REPO, text=True, stdout=log,
                           stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(lambda: (out / "checkpoints" / "latest").exists() and len(rank_pids(out)) == 2, 300,
             "the first checkpoint of the long job")
    yield out, job, out.parent / "locked_job.log"
    if job.poll() is None:
        for pid in rank_pids(out):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        job.kill()
        job.wait(timeout=60)


def test_second_job_on_a_locked_output_dir_is_refused_on_every_rank(running_job):
    out, job, _ = running_job
    started = time.time()
    proc = run_training(2, out, *LONG, expect_ok=False)
    expect_error_on_every_rank(proc, 2, r"is in use by another training job \(pid \d+ on host .*choose another "
                                        "training.output_dir")
    assert time.time() - started < 120
    assert job.poll() is None, "the refused job disturbed the running one"


def test_sigterm_to_the_runner_alone_stops_every_rank_then_a_rerun_takes_over(running_job):
    out, job, log = running_job
    ranks = rank_pids(out)
    assert all(_alive(pid) for pid in ranks)
    job.send_signal(signal.SIGTERM)  # the runner only: not its children, not its process group
    job.wait(timeout=30)
    wait_for(lambda: not any(_alive(pid) for pid in ranks), 30, "the ranks to stop after the runner died")
    assert "deepspeed launcher (pid" in log.read_text() and "is gone" in log.read_text()
    assert json.loads((out / ".lock").read_text())["pid"] == ranks[0], "a stopped job must leave its lock record"
    latest = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    # the dead job's lock record is taken over, and the run resumes from its newest checkpoint
    proc = run_training(2, out, "training.max_steps=%d" % (latest + 2), "training.save_interval=2",
                        "training.eval_interval=0")
    assert f"taking over the lock of {out} left by a job that is no longer running (pid {ranks[0]} on host" \
        in proc.stdout, proc.stdout[-3000:]  # global rank 0 held it
    assert f"step{latest:08d}" in proc.stdout
    assert (out / ".lock").read_text() == "", "a finished job left its lock record behind"
