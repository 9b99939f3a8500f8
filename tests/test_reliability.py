"""Faults and bad inputs: exact resume after SIGKILL, crash-safe checkpoints, no hangs, clear errors.

Every test launches real processes; kills are real signals to the real process group.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from launch_utils import REPO, results, run_training, state, train_command

# (overrides, the step whose checkpoint triggers the kill). Steps of the tiny rack take tens of
# milliseconds, so several steps must remain for the kill to land in a running job.
RESUME_CASES = {
    "rackwise": (["training.max_steps=16", "training.save_interval=2"], 6),
    "stackwise": (["training.training_architecture=stackwise", "training.steps_per_phase=8",
                   "training.save_interval=2"], 10),  # mid phase 2 of 2
}
# training.keep_checkpoints (default 3) and keep_phase_ends: the newest three, and stackwise phase 1's end
KEPT_TAGS = {"rackwise": [12, 14, 16], "stackwise": [8, 12, 14, 16]}
RESUME_HINT = "re-run the same command to resume"


def tags_on_disk(output_dir) -> list[int]:
    return sorted(int(p.name[4:]) for p in (output_dir / "checkpoints").glob("step*"))


def assert_quiet_log(text: str) -> None:
    """A plain run's log is its story: no DeepSpeed internals, no torch deprecation noise."""
    for noise in ("SEED_LAYERS=", "Using topology", "built successfully", "all_gather_into_tensor"):
        assert noise not in text, f"{noise!r} in the log:\n{text[-3000:]}"
    # the deepspeed runner and its node launcher say it before any of our code runs; the ranks do not repeat it
    assert text.count("Setting accelerator to CPU") <= 2, text[-3000:]


def wait_for(predicate, timeout: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def start_training(n_procs, output_dir, *overrides) -> subprocess.Popen:
    return subprocess.Popen(train_command(n_procs, output_dir, list(overrides)), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_job(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def resumed_step(stdout: str) -> int:
    match = re.search(r"resuming from \S*step(\d+)", stdout)
    assert match, stdout[-3000:]
    return int(match.group(1))


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", sorted(RESUME_CASES))
def test_sigkill_then_rerun_continues_exactly(mode, tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    overrides, kill_step = RESUME_CASES[mode]
    overrides = overrides + ["training.eval_interval=0"]
    first = run_training(2, reference, *overrides)
    assert_quiet_log(first.stdout + first.stderr)
    assert "[stackwise] checkpoint step00000016 saved" in first.stdout
    assert tags_on_disk(reference) == KEPT_TAGS[mode]
    job = start_training(2, crashed, *overrides)
    # kill the whole job (launcher and ranks) as soon as the kill_step checkpoint is complete
    wait_for(lambda: (crashed / "checkpoints" / f"step{kill_step:08d}" / "stackwise_state.json").exists(), 300,
             f"the step-{kill_step} checkpoint", poll_s=0.01)
    assert job.poll() is None, "the job finished before the kill: give it more steps after kill_step"
    kill_job(job)
    assert results(crashed)["complete"] is False  # the history so far, written with every checkpoint
    proc = run_training(2, crashed, *overrides)
    start = resumed_step(proc.stdout)
    assert start >= kill_step
    # retention after the resume leaves what an uninterrupted run leaves, even if the kill cut a deletion short
    assert tags_on_disk(crashed) == KEPT_TAGS[mode]
    # without a progress bar, a plain line every training.log_interval (2) steps
    assert re.search(r"\[stackwise\] phase \d/\d .+ step \d+/\d+: loss \d+\.\d+, [\d,]+ tokens/s", proc.stdout)
    # the resumed phase's summary has its first validation loss (from results.json), not nan
    assert "nan" not in proc.stdout and "n/a" not in proc.stdout, proc.stdout[-2000:]
    assert [p.get("val_loss_before") for p in results(crashed)["phases"]] == \
        [p.get("val_loss_before") for p in results(reference)["phases"]]
    # bitwise (same world size), and results.json holds the whole run: before the kill and after the resume
    assert results(crashed)["losses"] == results(reference)["losses"]
    assert [p["losses"] for p in results(crashed)["phases"]] == [p["losses"] for p in results(reference)["phases"]]
    assert results(crashed)["complete"] is True
    assert state(crashed)["consumed_samples"] == state(reference)["consumed_samples"]


@pytest.mark.multiprocess
def test_half_written_checkpoint_is_never_resumed_from(tmp_path):
    overrides = ["training.max_steps=8", "training.save_interval=2", "training.eval_interval=0"]
    run_training(2, tmp_path, *overrides)
    reference = results(tmp_path)["losses"]
    # a kill during the last save: DeepSpeed's files are there, our completion marker is not
    (tmp_path / "checkpoints" / "step00000008" / "stackwise_state.json").unlink()
    (tmp_path / "results.json").unlink()
    proc = run_training(2, tmp_path, *overrides)
    assert resumed_step(proc.stdout) == 6
    assert results(tmp_path)["losses"] == reference[6:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step00000008"


def test_resume_tag_is_the_newest_complete_one_even_when_latest_lags(tmp_path):
    from stackwise_ds.checkpoint.files import TrainingState, find_resume_tag, mark_complete, unmark

    for step in (2, 4, 6):
        (tmp_path / f"step{step:08d}").mkdir()
        mark_complete(tmp_path, f"step{step:08d}", TrainingState(global_step=step))
    (tmp_path / "latest").write_text("step00000004")  # killed after step 6's marker, before `latest`
    (tmp_path / "step00000008").mkdir()  # killed during step 8's save: no marker
    assert find_resume_tag(tmp_path) == "step00000006"
    unmark(tmp_path, "step00000006")  # the trainer re-saving that tag: incomplete until marked again
    assert find_resume_tag(tmp_path) == "step00000004"


def test_retention_keeps_the_newest_tags_phase_ends_and_latest(tmp_path):
    from stackwise_ds.checkpoint.files import TrainingState, is_complete, mark_complete, retire_old_tags

    for step in range(1, 9):  # phases end at steps 3 and 6: the state points at the next phase's step 0
        (tmp_path / f"step{step:08d}").mkdir()
        (tmp_path / f"step{step:08d}" / "layer_00-model_states.pt").write_bytes(b"weights")
        phase_step = 0 if step in (3, 6) else 1
        mark_complete(tmp_path, f"step{step:08d}", TrainingState(global_step=step, phase_step=phase_step))
    (tmp_path / "step00000002" / "stackwise_state.json").unlink()  # a save (or a deletion) a kill cut short
    (tmp_path / "step00000009").mkdir()  # a save in progress: newer than every complete tag, left alone
    (tmp_path / "latest").write_text("step00000004")  # e.g. a user pointing DeepSpeed's loaders there
    assert retire_old_tags(tmp_path, keep=0, keep_phase_ends=True) == []  # 0 keeps all
    assert retire_old_tags(tmp_path, keep=2, keep_phase_ends=True) == ["step00000001", "step00000002",
                                                                       "step00000005"]
    assert sorted(p.name for p in tmp_path.glob("step*")) == [
        "step00000003", "step00000004", "step00000006", "step00000007", "step00000008", "step00000009"]
    assert retire_old_tags(tmp_path, keep=1, keep_phase_ends=False) == ["step00000003", "step00000006",
                                                                        "step00000007"]
    assert is_complete(tmp_path, "step00000008") and (tmp_path / "step00000004").is_dir()


@pytest.mark.multiprocess
def test_a_kill_while_deleting_an_old_checkpoint_leaves_a_complete_one_to_resume_from(tmp_path):
    """SIGKILL half-way through deleting a tag (a shim kills the process as it removes a layer file):
    the tag's marker went first, so it is incomplete and never resumed from; the re-run resumes
    from the newest complete tag and its own retention removes the remains."""
    from stackwise_ds.checkpoint.files import find_resume_tag, is_complete
    from test_filesystem_faults import build_fault_shim

    out, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = ["training.max_steps=8", "training.save_interval=2", "training.eval_interval=0",
                 "training.keep_checkpoints=2"]
    kill = {"LD_PRELOAD": str(build_fault_shim(tmp_path)), "KILL_ON_UNLINK": "layer_01-model_states.pt"}
    killed = run_training(1, out, *overrides, expect_ok=False, env=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # step 6 was published, then deleting step 2 began: marker gone, then the kill with files left
    assert not is_complete(checkpoints, "step00000002")
    assert (checkpoints / "step00000002" / "layer_01-model_states.pt").exists()
    assert find_resume_tag(checkpoints) == "step00000006"
    proc = run_training(1, out, *overrides)
    assert resumed_step(proc.stdout) == 6
    assert "deleted step00000002, step00000004 (training.keep_checkpoints=2)" in proc.stdout
    assert tags_on_disk(out) == [6, 8] and results(out)["complete"] and len(results(out)["losses"]) == 8


@pytest.mark.multiprocess
def test_a_peer_that_stopped_on_an_input_error_is_not_a_crash_to_resume_from(tmp_path):
    """The rank that stops on a bad input marks its last heartbeat so; a peer that then finds it gone
    names it without advising a resume, which would only repeat the error. A crashed peer still gets it."""
    from stackwise_ds.parallel.watchdog import PeerWatchdog, resume_hint

    for rank, record in ((1, "record_input_error()"), (2, "pass")):  # rank 2 dies without a word: a crash
        script = ("from pathlib import Path; from stackwise_ds.parallel.watchdog import *; "
                  f"w = PeerWatchdog(Path({str(tmp_path)!r}), {rank}, 3).start(); {record}")
        subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)
    bad_input, crashed = PeerWatchdog(tmp_path, rank=0, world_size=3).failed_peers()
    assert bad_input.startswith("rank 1 (pid") and "stopped on an input error" in bad_input
    assert resume_hint(bad_input) == "" and RESUME_HINT not in bad_input
    assert "process is gone" in crashed and RESUME_HINT in resume_hint(crashed)


@pytest.mark.multiprocess
def test_dead_rank_stops_the_others_quickly_and_is_named(tmp_path):
    job = start_training(2, tmp_path, "training.max_steps=100000", "training.save_interval=0",
                         "training.eval_interval=0")
    heartbeat = tmp_path / ".heartbeat"
    wait_for(lambda: len(list(heartbeat.glob("*/rank*.json"))) == 2, 120, "both ranks' heartbeats")
    time.sleep(3)  # let training start
    victim = json.loads(next(heartbeat.glob("*/rank1.json")).read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    started = time.time()
    output, _ = job.communicate(timeout=150)
    assert time.time() - started < 120
    assert job.returncode != 0
    assert f"rank 1 (pid {victim}" in output and "process is gone" in output, output[-3000:]


def expect_error_on_every_rank(proc, n_ranks: int, fragment: str) -> None:
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    for rank in range(n_ranks):
        assert re.search(rf"error on rank {rank}: .*{fragment}", text), \
            f"rank {rank} did not report {fragment!r}:\n{text[-3000:]}"
    assert RESUME_HINT not in text, f"an input error is not a crash to resume from:\n{text[-3000:]}"


@pytest.mark.parametrize("overrides, fragment", [
    (["model.d_modle=64"], "unknown key 'd_modle' in model"),
    (["training.max_steps=many"], "training.max_steps' must be an integer"),
    (["data.seq_len=128"], r"data.seq_len \(128\) is longer than model.max_seq_len \(64\)"),
    (["data.source=text_files", "data.paths=[/nonexistent/corpus.txt]"], "/nonexistent/corpus.txt"),
])
@pytest.mark.multiprocess
def test_bad_config_and_data_fail_clearly_on_every_rank(overrides, fragment, tmp_path):
    proc = run_training(2, tmp_path / "out", *overrides, expect_ok=False)
    expect_error_on_every_rank(proc, 2, fragment)


@pytest.mark.multiprocess
def test_a_validation_split_smaller_than_a_micro_batch_is_evaluated_and_results_stay_strict_json(tmp_path):
    """data.max_bytes=4000 holds out 1 window, fewer than a micro-batch of 2: every phase validates on it (on 2
    replicas, one counting it), so no loss is NaN and results.json is strict JSON."""
    out = tmp_path / "run"
    proc = run_training(2, out, "data.max_bytes=4000", "training.training_architecture=stackwise",
                        "training.steps_per_phase=3")
    assert "the validation split holds 1 window(s), fewer than one micro-batch" in proc.stdout
    done = re.findall(r"phase stack \d/2 done: val loss (\S+) -> (\S+)", proc.stdout)
    assert len(done) == 2 and all(float(v) == float(v) for pair in done for v in pair), proc.stdout[-2000:]
    saved = json.loads((out / "results.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert all(loss is not None and loss == loss for _, loss in saved["val_history"])
    assert [round(p["val_loss_after"], 4) for p in saved["phases"]] == [float(after) for _, after in done]


@pytest.mark.multiprocess
def test_pipeline_that_does_not_fit_the_world_size(tmp_path):
    proc = run_training(3, tmp_path / "out", "parallel.pipeline_stages=2", expect_ok=False)
    expect_error_on_every_rank(proc, 3, r"world size 3 is not a multiple of parallel.pipeline_stages \(2\): set "
                                        r"parallel.pipeline_stages to one of \[1\]")


@pytest.mark.parametrize("text, fragment", [
    ("", "dataset is empty"),
    ("def f():\n    return 1\n" * 4, "the training split has 2 sequences of length 32 but one global batch needs 4"),
])
@pytest.mark.multiprocess
def test_empty_or_too_small_dataset(text, fragment, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    proc = run_training(2, tmp_path / "out", "data.source=text_files", f"data.paths=[{corpus}]",
                        "data.val_fraction=0", expect_ok=False)
    expect_error_on_every_rank(proc, 2, fragment)


@pytest.mark.multiprocess
def test_output_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_training(2, blocker / "run", expect_ok=False)
    expect_error_on_every_rank(proc, 2, "is not writable .* choose a training.output_dir you can write to")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    run_training(2, out, "training.max_steps=2", "training.save_interval=1", "training.eval_interval=0")
    return out


@pytest.mark.multiprocess
def test_checkpoint_of_another_architecture_is_refused(finished_run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    proc = run_training(2, out, "model.d_model=32", "training.max_steps=2", expect_ok=False)
    expect_error_on_every_rank(proc, 2, r"another architecture \(model.d_model: checkpoint 64 vs config 32")


@pytest.mark.parametrize("damage, fragment", [
    ("truncated", "layer_01-model_states.pt is (corrupt|unreadable)"),
    ("other_layer", "layer_01-model_states.pt holds the weights of pipeline layer 2 .* copied over another"),
])
@pytest.mark.multiprocess
def test_corrupt_checkpoint_is_reported_on_every_rank_and_kept(damage, fragment, finished_run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    (out / "checkpoints" / "latest").write_text("step00000001")
    (out / "checkpoints" / "step00000002" / "stackwise_state.json").unlink()  # step 2 never completed
    layer = out / "checkpoints" / "step00000001" / "layer_01-model_states.pt"
    if damage == "truncated":
        layer.write_bytes(layer.read_bytes()[:100])  # cut short on disk
    else:  # a block file of the same shapes copied over it: loads fine, trains the wrong weights
        shutil.copyfile(layer.with_name("layer_02-model_states.pt"), layer)
    proc = run_training(2, out, "training.max_steps=4", "training.save_interval=1", "training.eval_interval=0",
                        expect_ok=False)
    expect_error_on_every_rank(proc, 2, f"step00000001 cannot be loaded .*{fragment}.* delete that folder")
    assert layer.exists() and (out / "checkpoints" / "step00000001" / "stackwise_state.json").exists()


@pytest.mark.multiprocess
def test_nonfinite_loss_stops_with_step_and_phase_and_keeps_checkpoint(finished_run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    checkpoints = out / "checkpoints"
    (checkpoints / "step00000002" / "stackwise_state.json").unlink()  # resume from step 1
    (checkpoints / "latest").write_text("step00000001")
    # a NaN in the final norm's weight (as a hardware fault would leave it): the next loss is NaN
    norm_file = checkpoints / "step00000001" / "layer_05-model_states.pt"
    norm = torch.load(norm_file, weights_only=True)
    norm["weight"][0] = float("nan")
    torch.save(norm, norm_file)
    before = norm_file.read_bytes()
    proc = run_training(2, out, "training.max_steps=2", "training.save_interval=1", "training.eval_interval=0",
                        expect_ok=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"non-finite training loss \(nan\) at global step 2, phase rack \(step 2\)", proc.stderr), \
        proc.stderr[-2000:]
    assert (checkpoints / "latest").read_text().strip() == "step00000001"
    assert not (checkpoints / "step00000002" / "stackwise_state.json").exists()  # nothing new published
    assert norm_file.read_bytes() == before



@pytest.mark.multiprocess
def test_rerunning_a_finished_run_keeps_its_results_and_config(finished_run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    before = {name: (out / name).read_text() for name in ("results.json", "config.yaml")}
    proc = run_training(2, out, "training.max_steps=2", "training.save_interval=1", "training.eval_interval=0",
                        "training.lr=0.5")
    assert "already holds the finished run" in proc.stdout
    assert {name: (out / name).read_text() for name in before} == before
    assert len(results(out)["losses"]) == 2


@pytest.mark.multiprocess
def test_resume_that_changes_a_training_setting_is_refused(finished_run, tmp_path):
    """A changed lr would be overridden by the restored scheduler while config.yaml recorded it:
    refused on every rank, naming the key and both values; the checkpoints stay."""
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    (out / "checkpoints" / "step00000002" / "stackwise_state.json").unlink()  # resume from step 1
    proc = run_training(2, out, "training.max_steps=2", "training.save_interval=1", "training.eval_interval=0",
                        "training.lr=0.01", expect_ok=False)
    expect_error_on_every_rank(proc, 2, r"training.lr: checkpoint 0.001 vs config 0.01.*put the saved values back")
    assert (out / "checkpoints" / "step00000001" / "stackwise_state.json").exists()
