"""training.stack_cache: the frozen prefix's activations kept per window, advanced at phase changes, resumed.

The fast tests cover the store (exact fp32, rounded bf16, the size bound, a torn slot), the gate (hits skip the
prefix), the settings and the data. The multi-process tests share a handful of tiny 2-rank runs of a 3-stack
rack with ``phase_data: repeat`` (about two epochs a phase): the cache's losses are bitwise those without it,
a kill mid-phase and at a phase boundary resumes onto the same losses, a full disk and the size bound fall back.
"""

import re

import numpy as np
import pytest
import torch
from torch import nn

from launch_utils import results, run_training, scalars
from stackwise_ds.config import ConfigError, StackWiseConfig
from stackwise_ds.enums import CacheDtype
from stackwise_ds.layout import cached_boundary
from stackwise_ds.parallel.prefix_cache import install_prefix_cache
from stackwise_ds.parallel.roles import DORMANT, FROZEN, TRAIN, RoleGate
from stackwise_ds.training.activation_store import ActivationStore, StoreMeta, create_store, slots_within

T, D = 8, 4


def make_store(tmp_path, n_windows=6, capacity=6, dtype=CacheDtype.FP32) -> ActivationStore:
    meta = StoreMeta("k", boundary=2, n_windows=n_windows, capacity=capacity, seq_len=T, d_model=D, dtype=dtype)
    create_store(tmp_path / "store", meta)
    return ActivationStore.open(tmp_path / "store")


def test_an_fp32_store_gives_back_exactly_what_it_kept_and_only_that(tmp_path):
    store = make_store(tmp_path)
    rows = torch.randn(3, T, D)
    store.put(np.array([4, 0, 2]), rows)
    hit, got = store.get(np.array([0, 1, 2, 4]))
    assert hit.tolist() == [True, False, True, True]
    assert torch.equal(got, rows[[1, 2, 0]])
    assert sorted(store.filled().tolist()) == [0, 2, 4]
    # another process (another rank) opening the same folder sees the same slots
    assert torch.equal(ActivationStore.open(tmp_path / "store").get(np.array([4]))[1], rows[:1])


def test_a_bf16_store_keeps_bf16_and_gives_it_back_as_such(tmp_path):
    store = make_store(tmp_path, dtype=CacheDtype.BF16)
    rows = torch.randn(2, T, D)
    store.put(np.array([0, 1]), rows)  # fp32 activations: converted where they are
    _, got = store.get(np.array([0, 1]))
    assert got.dtype == torch.bfloat16 and torch.equal(got, rows.to(torch.bfloat16))
    assert not torch.equal(got.float(), rows)
    assert (tmp_path / "store" / "activations.bin").stat().st_size == 6 * T * D * 2  # half of fp32


def test_a_read_goes_into_the_buffer_it_is_given(tmp_path):
    store = make_store(tmp_path)
    rows = torch.randn(2, T, D)
    store.put(np.array([3, 1]), rows)
    buffer = torch.full((4, T, D), float("nan"))
    hit, got = store.get(np.array([1, 2, 3]), out=buffer)
    assert hit.tolist() == [True, False, True] and got.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[:2], rows[[1, 0]]) and buffer[2:].isnan().all()


def test_windows_beyond_the_size_bound_are_never_kept(tmp_path):
    assert slots_within(max_gb=3 * T * D * 4 / 2**30, n_windows=6, seq_len=T, d_model=D, dtype=CacheDtype.FP32) == 3
    assert slots_within(max_gb=100.0, n_windows=6, seq_len=T, d_model=D, dtype=CacheDtype.FP32) == 6
    store = make_store(tmp_path, capacity=3)
    store.put(np.array([2, 3, 5]), torch.randn(3, T, D))
    hit, _ = store.get(np.array([2, 3, 5]))
    assert hit.tolist() == [True, False, False]
    assert (tmp_path / "store" / "activations.bin").stat().st_size == 3 * T * D * 4


def test_a_torn_slot_reads_as_empty(tmp_path):
    """A write cut short (a crash): the slot's checksum no longer matches, so it is computed again."""
    store = make_store(tmp_path)
    store.put(np.array([1]), torch.randn(1, T, D))
    store.slots[1, 0, 0] += 1.0
    assert store.get(np.array([1]))[0].tolist() == [False]
    assert store.corrupt == 1


@pytest.mark.parametrize("dtype", [CacheDtype.FP32, CacheDtype.BF16])
@pytest.mark.parametrize("damage", ["lowest bit of the last word", "a zeroed tail", "two slots swapped"])
def test_the_checksum_finds_every_damaged_slot_and_keeps_the_intact_ones(tmp_path, dtype, damage):
    store = make_store(tmp_path, dtype=dtype)
    rows = torch.randn(4, T, D)
    store.put(np.arange(4), rows)
    bits = store.slots.reshape(len(store.slots), -1).view(np.uint8)  # [slots, bytes], the file itself
    if damage == "lowest bit of the last word":
        bits[2, -8] ^= 1
    elif damage == "a zeroed tail":
        bits[2, -24:] = 0
    else:
        store.slots[[2, 3]] = store.slots[[3, 2]]
    hit, got = store.get(np.arange(4))
    damaged = [2, 3] if damage == "two slots swapped" else [2]
    assert hit.tolist() == [w not in damaged for w in range(4)] and store.corrupt == len(damaged)
    assert torch.equal(got, rows[~torch.from_numpy(hit) == False].to(store.dtype))  # noqa: E712


def test_a_store_of_the_former_checksum_is_not_read(tmp_path):
    """A store made before the checksum changed (its meta.json names none) is made again, not misread."""
    import json

    make_store(tmp_path)
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    del meta["checksum"]
    (tmp_path / "store" / "meta.json").write_text(json.dumps(meta))
    assert ActivationStore.open(tmp_path / "store") is None


def test_a_store_that_cannot_be_allocated_raises_and_leaves_nothing(tmp_path):
    meta = StoreMeta("k", 2, n_windows=4, capacity=4, seq_len=T, d_model=D, dtype=CacheDtype.FP32)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "activations.bin").mkdir()  # cannot be opened as a file
    with pytest.raises(OSError):
        create_store(tmp_path / "store", meta)
    assert ActivationStore.open(tmp_path / "store") is None


def test_a_corrupt_slot_is_counted_once_per_read(tmp_path):
    store = make_store(tmp_path)
    store.put(np.array([1, 2]), torch.randn(2, T, D))
    store.slots[2, 0, 0] += 1.0
    assert store.get(np.array([1, 2, 3]))[0].tolist() == [True, False, False]
    assert store.corrupt == 1, "window 3 was never written: empty, not corrupt"


def test_the_advance_shares_out_every_window_whatever_order_the_ranks_run_in(tmp_path):
    """Each first-stage rank takes its stride of the previous store's windows. When one rank had advanced its share
    before another looked (a loaded machine, or a resume), the later rank used to stride over the new store's
    remaining windows, a shorter list, and skipped windows no rank then advanced."""
    from stackwise_ds.training.stack_cache import advance_share

    previous, new = make_store(tmp_path / "old", n_windows=10, capacity=10), make_store(tmp_path / "new", 10, 10)
    previous.put(np.arange(10), torch.randn(10, T, D))
    new.put(np.array([7]), torch.randn(1, T, D))  # advanced before a kill
    done = []
    for rank in range(2):  # rank 0 writes all of its share before rank 1 computes its own
        mine = advance_share(previous, new, rank, 2)
        new.put(mine, torch.randn(len(mine), T, D))
        done += mine.tolist()
    assert sorted(done) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert sorted(new.filled().tolist()) == list(range(10))


def test_a_store_removed_half_way_never_opens_and_is_swept(tmp_path):
    """The removal renames the store out of its key's name before deleting it; a store whose data files are gone
    does not open (it used to raise on resume)."""
    from stackwise_ds.training.activation_store import remove_store, sweep_removed

    store = make_store(tmp_path)
    (tmp_path / "store" / "sums.bin").unlink()
    assert ActivationStore.open(store.folder) is None
    half_removed = tmp_path / "other.removing"  # a removal a kill interrupted
    half_removed.mkdir()
    remove_store(store.folder)
    assert not store.folder.exists() and not half_removed.exists()
    (tmp_path / "again.removing").mkdir()
    sweep_removed(tmp_path)
    assert list(tmp_path.iterdir()) == []
    sweep_removed(tmp_path / "gone")  # another rank removed the host folder first: nothing to do


def test_a_store_that_cannot_be_made_is_explained_by_its_cause_in_human_units(tmp_path):
    import errno

    from stackwise_ds.console import human_size
    from stackwise_ds.training.stack_cache import allocation_failure

    assert [human_size(n) for n in (512, 64 * 2**10, 1.5 * 2**30, 999 * 2**20)] == ["512 B", "64.0 KB", "1.50 GB",
                                                                                    "999 MB"]
    read_only = allocation_failure(tmp_path, 2**20, OSError(errno.EROFS, "Read-only file system"))
    assert f"{tmp_path}: it is read-only for this process (Read-only file system)" in read_only
    assert "training.stack_cache_dir to a folder this user can write" in read_only and "free space" not in read_only
    full = allocation_failure(tmp_path, 64 * 2**10, OSError(errno.ENOSPC, "No space left on device"))
    assert f"could not allocate 64.0 KB in {tmp_path} (No space left on device)" in full and "GiB" not in full


def test_the_cached_boundary_is_the_frozen_run_from_the_embedding():
    assert cached_boundary([FROZEN, FROZEN, FROZEN, TRAIN, TRAIN]) == 2
    assert cached_boundary([FROZEN, FROZEN, TRAIN, DORMANT, TRAIN]) == 1
    assert cached_boundary([TRAIN, FROZEN, TRAIN]) is None  # the embedding trains: nothing fixed to cache
    assert cached_boundary([FROZEN, TRAIN, TRAIN]) is None  # only the lookup: nothing worth caching


class Counting(nn.Module):
    """A stand-in frozen layer that counts the rows it computes."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return x.float().unsqueeze(-1).expand(*x.shape, D) * self.scale if x.dim() == 2 else x * self.scale


class Stage:
    """A first stage's ``forward_funcs`` (all a stage needs to have for install_prefix_cache)."""

    def __init__(self, layers):
        self.forward_funcs = [RoleGate(layer, FROZEN) for layer in layers]
        self._local_start = 0


def test_the_gate_reads_kept_windows_and_runs_the_prefix_only_for_new_ones(tmp_path):
    embed, block = Counting(1.0), Counting(3.0)
    stage = Stage([embed, block])
    gate = install_prefix_cache(stage, boundary=1, store=make_store(tmp_path), d_model=D)
    assert stage.forward_funcs[1](torch.ones(1)) is not None and gate.layer is embed  # layer 1 passes through
    tokens = torch.arange(2 * T).reshape(2, T)
    first = gate((tokens, torch.tensor([3, 5])))
    assert torch.equal(first, gate.run_prefix(tokens)) and block.rows == 4  # computed, then once more to compare
    mixed = gate((torch.stack([tokens[1], tokens[0] + 1]), torch.tensor([5, 0])))
    assert block.rows == 5, "window 5 was kept: only window 0 runs the prefix"
    assert torch.equal(mixed[0], first[1]) and torch.equal(mixed[1], gate.run_prefix(tokens[:1] + 1)[0])
    assert (gate.read, gate.computed) == (1, 3)
    assert torch.equal(gate(tokens), first), "plain inputs (validation) run the prefix"


def test_a_miss_hands_on_the_fresh_activations_and_a_hit_the_stored_ones(tmp_path):
    """bf16 storage under fp32 activations: the window computed now goes on as computed (no round trip through
    the store), the one read comes back in the stage's dtype from its bf16 bits."""
    stage = Stage([Counting(1.0), Counting(1.0 / 3.0)])
    gate = install_prefix_cache(stage, boundary=1, store=make_store(tmp_path, dtype=CacheDtype.BF16), d_model=D)
    tokens = torch.arange(T).reshape(1, T)
    fresh = gate((tokens, torch.tensor([2])))
    read = gate((tokens, torch.tensor([2])))
    assert torch.equal(fresh, gate.run_prefix(tokens)) and read.dtype == torch.float32
    assert torch.equal(read, fresh.to(torch.bfloat16).float()) and not torch.equal(read, fresh)


def test_a_corrupt_slot_is_computed_again_and_warned_about_once_with_the_count(tmp_path, capsys):
    from stackwise_ds.training.stack_cache import ActivationCache, corrupt_warning

    store = make_store(tmp_path)
    gate = install_prefix_cache(Stage([Counting(1.0), Counting(2.0)]), boundary=1, store=store, d_model=D)
    tokens = torch.arange(3 * T).reshape(3, T)
    first = gate((tokens, torch.tensor([0, 1, 2])))
    store.slots[1, T - 1, D - 1] = 7.0
    again = gate((tokens, torch.tensor([0, 1, 2])))
    assert torch.equal(again, first) and (gate.read, gate.computed, store.corrupt) == (2, 4, 1)
    config = StackWiseConfig.from_dict(cache_config())
    cache = ActivationCache(config.training, config.model, tmp_path, seq_len=T, rank=0)

    for count in (1, 3):
        cache._warn("corrupt", corrupt_warning(count, cache.root))
    printed = capsys.readouterr().out
    warnings = re.findall(r"WARNING stack cache: (\d+) cached window\(s\) failed their checksum", printed)
    assert warnings == ["1"]


def cache_config(**training):
    return {"model": {"d_model": 64, "n_heads": 4, "max_seq_len": 64}, "data": {"seq_len": 32},
            "training": {"training_architecture": "stackwise", "stack_cache": "disk", **training}}


@pytest.mark.parametrize("training, model, fragment", [
    ({"training_architecture": "rackwise"}, {}, "freezes none"),
    ({"prefix": "train"}, {}, "freezes none"),
    ({"freeze_embedding": False}, {}, "needs a frozen embedding"),
    ({}, {"dropout": 0.1}, "model.dropout"),
    ({"stack_cache_max_gb": 0}, {}, "stack_cache_max_gb must be positive"),
    ({"stack_cache_dtype": "fp16"}, {}, "must be one of: auto, fp32, bf16"),
    ({"phase_data": "again"}, {}, "must be one of: continue, repeat"),
])
def test_settings_the_cache_cannot_serve_are_refused_with_the_fix(training, model, fragment):
    raw = cache_config(**training)
    raw["model"].update(model)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        StackWiseConfig.from_dict(raw)


def test_the_cache_stores_the_activations_in_their_own_dtype_by_default():
    from stackwise_ds.training.stack_cache import storage_dtype

    def stored(**training) -> CacheDtype:
        return storage_dtype(StackWiseConfig.from_dict(cache_config(**training)).training)

    assert StackWiseConfig().training.stack_cache_dtype == CacheDtype.AUTO
    assert stored(precision="bf16") == CacheDtype.BF16 and stored(precision="fp32") == CacheDtype.FP32
    assert stored(precision="bf16", stack_cache_dtype="fp32") == CacheDtype.FP32
    assert stored(precision="fp32", stack_cache_dtype="bf16") == CacheDtype.BF16


def test_the_planner_predicts_reading_pays_on_a_cpu_and_warns_where_running_the_prefix_is_cheaper():
    from stackwise_ds.placement import cached_prefix_seconds
    from stackwise_ds.training.stack_cache import reading_is_slower

    model = StackWiseConfig.from_dict(cache_config()).model
    read_s, run_s = cached_prefix_seconds(model, 32, boundary=2, bytes_per_value=4, device_type="cpu")
    assert 0 < read_s < run_s
    assert reading_is_slower(model, 32, 2, CacheDtype.FP32, "cpu") is None
    warning = reading_is_slower(model, 32, 2, CacheDtype.BF16, "cuda")
    assert warning.startswith("the planner predicts that running the frozen prefix (layers 0-2) on cuda is cheaper")
    assert "training.stack_cache 'off'" in warning
    deeper = cached_prefix_seconds(model, 32, boundary=4, bytes_per_value=4, device_type="cpu")
    assert deeper[0] == read_s and deeper[1] > run_s, "a deeper prefix costs more to run, the same to read"


def test_a_bare_yaml_off_means_off(tmp_path):
    from stackwise_ds.config import StackWiseConfig as Config

    (tmp_path / "run.yaml").write_text("training:\n  training_architecture: stackwise\n  stack_cache: off\n")
    assert Config.from_yaml(tmp_path / "run.yaml").training.stack_cache == "off"
    assert Config.from_yaml(tmp_path / "run.yaml", ["training.stack_cache=disk"]).training.stack_cache == "disk"
    assert Config.from_yaml(tmp_path / "run.yaml", ["training.stack_cache=off"]).training.stack_cache == "off"
    with pytest.raises(ConfigError, match="training.stack_cache is 'True' but must be one of: off, disk"):
        Config.from_yaml(tmp_path / "run.yaml", ["training.stack_cache=true"])


def test_a_user_dataloader_cannot_repeat_phases_or_key_the_cache():
    from stackwise_ds.training.feeds import check_user_dataloader

    with pytest.raises(ConfigError, match="train_architecture does not give"):
        check_user_dataloader(StackWiseConfig.from_dict(cache_config()).training)
    with pytest.raises(ConfigError, match="phase_data 'repeat'"):
        check_user_dataloader(StackWiseConfig.from_dict(cache_config(phase_data="repeat", stack_cache="off")).training)


def test_a_run_may_resume_with_the_cache_switched_or_moved_but_not_with_other_phase_data(tmp_path):
    from stackwise_ds.checkpoint.files import CheckpointError, check_resumable_changes

    saved = StackWiseConfig.from_dict(cache_config(stack_cache="off")).to_dict()
    moved = StackWiseConfig.from_dict(cache_config(stack_cache_dir=str(tmp_path), stack_cache_max_gb=2.0)).to_dict()
    check_resumable_changes(saved, moved, tmp_path)
    older = StackWiseConfig.from_dict(cache_config(stack_cache_dtype="fp32")).to_dict()  # before 'auto' existed
    check_resumable_changes(older, StackWiseConfig.from_dict(cache_config()).to_dict(), tmp_path)
    with pytest.raises(CheckpointError, match="training.stack_cache_dtype: checkpoint 'exact' vs config 'bf16'"):
        check_resumable_changes(older, StackWiseConfig.from_dict(cache_config(stack_cache_dtype="bf16")).to_dict(),
                                tmp_path)
    with pytest.raises(CheckpointError, match="training.phase_data: checkpoint 'continue' vs config 'repeat'"):
        check_resumable_changes(saved, StackWiseConfig.from_dict(cache_config(phase_data="repeat")).to_dict(), tmp_path)


def test_a_keyed_stream_carries_each_rows_dataset_index(tmp_path):
    from stackwise_ds.data import TrainBatchStream
    from stackwise_ds.data.packing import PackedDataset

    dataset = PackedDataset((np.arange(40 * (T + 1)) % 250).reshape(40, T + 1), np.arange(40))
    plain = TrainBatchStream(dataset, global_batch_size=4, micro_batch_size=2, dp_rank=1, dp_world_size=2, seed=3)
    keyed = TrainBatchStream(dataset, global_batch_size=4, micro_batch_size=2, dp_rank=1, dp_world_size=2, seed=3,
                             with_window_ids=True)
    for _ in range(5):
        inputs, labels = next(plain)
        (keyed_inputs, ids), keyed_labels = next(keyed)
        assert torch.equal(inputs, keyed_inputs) and torch.equal(labels, keyed_labels)
        assert torch.equal(torch.stack([dataset[int(i)][0] for i in ids]), inputs)


def test_repeated_phase_data_starts_every_phase_at_the_first_window():
    from stackwise_ds.checkpoint.files import TrainingState
    from stackwise_ds.training.loop import StepLoop

    state = TrainingState(phase_index=2, phase_step=3, global_step=23, consumed_samples=23 * 8)
    for phase_data, position in (("repeat", 3 * 8), ("continue", 23 * 8)):
        training = StackWiseConfig.from_dict(cache_config(phase_data=phase_data, stack_cache="off")).training
        loop = StepLoop(training=training, seq_len=T, n_stacks=3, global_batch=8, monitor=None, history=None,
                        checkpoint_dir=None)
        assert loop.data_position(state) == position


# ----------------------------------------------------------------------------------------- multi-process runs

# 3 stacks of 1 block, 38 training windows, 8 windows a step over 2 ranks: 10 steps are about two epochs a phase.
# Phase 1 trains the embedding (nothing to cache); phase 2 caches stack 1's input; phase 3 advances it by stack 2.
RUN = ["model.architecture.n_stacks=3", "model.architecture.blocks_per_stack=1", "data.max_bytes=1400",
       "data.val_fraction=0.1", "training.training_architecture=stackwise", "training.steps_per_phase=10",
       "training.phase_data=repeat", "training.eval_interval=0", "training.save_interval=0",
       "parallel.peer_timeout_s=10"]
CACHE = ["training.stack_cache=disk"]
WINDOWS = 38


def cache_lines(stdout: str) -> dict[str, tuple[int, int, int]]:
    """Phase name -> (read, computed, advanced), from the log line each cached phase ends with."""
    pattern = r"stack cache, phase (\S+ \d/\d): (\d+) windows read, (\d+) computed, (\d+) advanced"
    return {m[0]: tuple(map(int, m[1:])) for m in re.findall(pattern, stdout)}


@pytest.fixture(scope="module")
def uncached(tmp_path_factory):
    out = tmp_path_factory.mktemp("uncached") / "run"
    run_training(2, out, *RUN)
    return results(out)


@pytest.mark.multiprocess
def test_fp32_cache_gives_bitwise_the_losses_of_computing_and_skips_the_prefix(uncached, tmp_path):
    out = tmp_path / "run"
    proc = run_training(2, out, *RUN, *CACHE)
    cached = results(out)
    assert cached["losses"] == uncached["losses"]
    assert [p["val_loss_after"] for p in cached["phases"]] == [p["val_loss_after"] for p in uncached["phases"]]
    stats = [p.get("stack_cache") for p in cached["phases"]]
    assert stats[0] is None, "phase 1 trains the embedding: nothing to cache"
    # phase 2: each window runs the frozen prefix once (its first epoch), every later visit reads it
    assert stats[1] == {"computed": WINDOWS, "read": 10 * 8 - WINDOWS, "advanced": 0, "ranks": 2, "corrupt": 0}
    # phase 3: the store advanced by stack 2 once, then every step read it: the prefix never ran
    assert stats[2] == {"computed": 0, "read": 10 * 8, "advanced": WINDOWS, "ranks": 2, "corrupt": 0}
    assert cache_lines(proc.stdout)["stack 3/3"] == (80, 0, WINDOWS)
    assert not (out / "stack_cache").exists(), "the run's end removes the cache"
    assert scalars(out, "stack_cache/read_share") == [(20, pytest.approx((80 - WINDOWS) / 80)), (30, 1.0)]


@pytest.mark.multiprocess
def test_a_kill_mid_phase_and_at_a_phase_boundary_resumes_onto_the_same_losses(uncached, tmp_path):
    """Killed after the checkpoints of step 16 (mid phase 2, its store half read) and step 20 (phase 2's end, before
    phase 3 advanced the store): each re-run continues from the store on disk, and the losses are the same. Every
    slot is damaged after the first kill: each is found by its checksum, computed again, and counted in a warning."""
    from test_filesystem_faults import build_fault_shim
    from test_reliability import resumed_step

    out, shim = tmp_path / "run", str(build_fault_shim(tmp_path))
    keep = [*RUN, *CACHE, "training.save_interval=4", "training.keep_checkpoints=1", "training.keep_phase_ends=false"]
    for doomed in ("step00000012", "step00000016"):  # retention deletes it right after saving 16, then 20
        killed = run_training(2, out, *keep, expect_ok=False, env={"LD_PRELOAD": shim, "KILL_ON_RMDIR": doomed})
        assert killed.returncode != 0
        assert any((out / "stack_cache").rglob("activations.bin")), "the kill left the store"
        if doomed == "step00000012":
            damaged = damage_every_filled_slot(out / "stack_cache")  # a damaged disk while the job was down
            assert damaged == WINDOWS
        else:
            assert resumed_step(killed.stdout) == 16
            # every window met is damaged: computed again (once: the fresh write repairs it), then read
            read, computed, _ = cache_lines(killed.stdout)["stack 2/3"]
            assert read + computed == 32 and computed > 16, (read, computed)
            warned = re.findall(r"WARNING stack cache: (\d+) cached window\(s\) failed their checksum", killed.stdout)
            assert warned == [str(computed)], killed.stdout[-3000:]
            assert f", {computed} corrupt (computed again)" in killed.stdout
    proc = run_training(2, out, *keep)
    assert "phase 3/3 stack 3/3: steps 0..10" in proc.stdout and "phase 2/3" not in proc.stdout  # from 20
    # the resumed boundary advanced the store, all but the windows phase 2 never met again (still damaged: phase 3
    # computes each once)
    stale = WINDOWS - computed
    assert cache_lines(proc.stdout)["stack 3/3"] == (80 - stale, stale, WINDOWS - stale)
    assert re.findall(r"WARNING stack cache: (\d+) cached window\(s\) failed", proc.stdout) == [str(stale)]
    assert results(out)["losses"] == uncached["losses"], "damaged windows never reach the training stack"


def damage_every_filled_slot(cache_root) -> int:
    """Flip one bit in the last word of every written slot of the one store under ``cache_root``; how many."""
    (folder,) = [path.parent for path in cache_root.rglob("activations.bin")]
    store = ActivationStore.open(folder)
    filled = store.filled()
    bits = store.slots.reshape(len(store.slots), -1).view(np.uint8)
    bits[filled, -8] ^= 1
    store.slots.flush()
    return len(filled)


@pytest.mark.multiprocess
def test_a_kill_as_the_old_store_is_removed_resumes_at_the_boundary_with_a_whole_store(uncached, tmp_path):
    """Killed at phase 3's start while the leader deletes phase 2's store (the advance done); before the re-run one
    slot of the advanced store is damaged. The re-run says it resumes at the phase boundary, reads every window but
    the damaged one (computed again, with one warning naming the count) and its clean end leaves no store."""
    from test_filesystem_faults import build_fault_shim

    out, shim = tmp_path / "run", str(build_fault_shim(tmp_path))
    killed = run_training(2, out, *RUN, *CACHE, expect_ok=False, env={"LD_PRELOAD": shim, "KILL_ON_UNLINK": "sums.bin"})
    assert killed.returncode != 0 and "phase 3/3 stack 3/3: steps" not in killed.stdout
    advanced = [meta.parent for meta in (out / "stack_cache").rglob("meta.json") if meta.parent.suffix != ".removing"]
    assert len(advanced) == 1, "the half-removed store no longer opens under its key"
    with open(advanced[0] / "activations.bin", "r+b") as slots:  # window 0's first value
        slots.write(b"\xff\xff\xff\x7f")
    proc = run_training(2, out, *RUN, *CACHE)
    assert re.search(r"resuming from \S+step00000020 at the start of phase 3/3 stack 3/3", proc.stdout)
    assert cache_lines(proc.stdout)["stack 3/3"] == (79, 1, 0), "the store was whole but for the damaged slot"
    assert len(re.findall(r"WARNING stack cache: 1 cached window\(s\) failed their checksum", proc.stdout)) == 1
    assert results(out)["losses"] == uncached["losses"]
    assert not (out / "stack_cache").exists(), "the run's end removes the stores, the half-removed one too"


@pytest.mark.multiprocess
def test_a_full_disk_falls_back_to_computing_with_one_warning(uncached, tmp_path):
    from test_filesystem_faults import build_fault_shim

    out = tmp_path / "run"
    full = {"LD_PRELOAD": str(build_fault_shim(tmp_path)), "FULL_DISK_PATH": str(out / "stack_cache")}
    proc = run_training(2, out, *RUN, *CACHE, env=full)
    warnings = re.findall(r"WARNING stack cache: could not allocate .*No space left on device", proc.stdout)
    assert len(warnings) == 1, proc.stdout[-3000:]
    assert results(out)["losses"] == uncached["losses"]
    assert "stack cache, phase stack 3/3: not in use (see the warning), the frozen prefix ran every time" in proc.stdout
    assert not any((out / "stack_cache").rglob("*.bin")), "no half-made store is left"


@pytest.mark.multiprocess
def test_bf16_storage_within_its_bound_stays_close_and_the_rest_is_computed(uncached, tmp_path):
    out = tmp_path / "run"
    half = 19.5 * 32 * 64 * 2 / 2**30  # 19 of the 38 windows' bf16 activations (T 32, d_model 64)
    proc = run_training(2, out, *RUN, *CACHE, "training.stack_cache_dtype=bf16", f"training.stack_cache_max_gb={half}")
    assert len(re.findall(r"holds 19 of the 38 training windows", proc.stdout)) == 1, proc.stdout[-3000:]
    losses, reference = results(out)["losses"], uncached["losses"]
    assert losses[:10] == reference[:10], "phase 1 has no frozen prefix"
    assert losses != reference, "bf16 storage rounds the training stack's input"
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < 0.02
    read, computed, advanced = cache_lines(proc.stdout)["stack 3/3"]
    assert advanced == 19 and computed > 0 and read + computed == 80


@pytest.mark.multiprocess
def test_a_forward_only_first_stage_serves_the_cache_and_a_prefix_spanning_stages_computes(tmp_path):
    """The fixed 2-stage pipeline of a 4-stack rack (stage 0: embedding, stacks 1-2): phases 2 and 3 cache on the
    forward-only first stage and send what it read; phase 4's prefix reaches stage 1, so it computes, once warned."""
    fixed = [*RUN, "model.architecture.n_stacks=4", "parallel.phase_layout=fixed", "parallel.pipeline_stages=2",
             "data.max_bytes=700"]  # 19 windows, 4 a step: 10 steps are about two epochs
    run_training(2, tmp_path / "off", *fixed)
    proc = run_training(2, tmp_path / "on", *fixed, *CACHE)
    assert results(tmp_path / "on")["losses"] == results(tmp_path / "off")["losses"]
    stats = [p.get("stack_cache") for p in results(tmp_path / "on")["phases"]]
    assert stats[1] == {"read": 21, "computed": 19, "advanced": 0, "ranks": 1, "corrupt": 0}
    assert stats[2] == {"read": 40, "computed": 0, "advanced": 19, "ranks": 1, "corrupt": 0}
    assert stats[3]["ranks"] == 0
    assert len(re.findall(r"WARNING stack cache: the frozen prefix \(layers 0-3\) spans 2 pipeline stages",
                          proc.stdout)) == 1
