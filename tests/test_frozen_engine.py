"""Stage-wise pipeline engine (stackwise_ds.parallel.engine) on real multi-process DeepSpeed runs.

Three launches of ``deepspeed --num_gpus N tests/_frozen_worker.py`` (CPU ranks over gloo):
2 stages, 3 stages and 2 stages x 2 data-parallel replicas. Each launch runs several scenarios
and writes the facts asserted here. The schedule tests at the bottom need no launch: they
replay the per-stage instruction streams with blocking send/recv semantics.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
)

from stackwise_ds.parallel.roles import (
    BACKPROP,
    DORMANT,
    FORWARD_ONLY,
    FROZEN,
    FROZEN_BACKPROP,
    RELAY,
    TRAIN,
    TRAIN_STAGE,
    make_plan,
)
from stackwise_ds.parallel.schedule import CountStep, StageWiseTrainSchedule, SyncTiedWeights

WORKER = Path(__file__).with_name("_frozen_worker.py")
REPO = WORKER.parents[1]
NO_BACKWARD = {"BackwardPass", "SendGrad", "RecvGrad", "ReduceGrads", "ReduceTiedGrads", "OptimizerStep"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(group: str, ranks: int, tmp_path_factory) -> dict:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    work = tmp_path_factory.mktemp(group)
    facts = work / "facts.json"
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(_free_port()), str(WORKER), group, str(facts),
           str(work / "checkpoints")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{group}: ranks hung (timeout)\n{(exc.stdout or '')[-4000:]}{(exc.stderr or '')[-4000:]}")
    if run.returncode != 0 or not facts.exists():
        pytest.fail(f"{group}: launch failed (rc={run.returncode})\n{run.stdout[-6000:]}\n{run.stderr[-6000:]}")
    return json.loads(facts.read_text())


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    return _launch("pp2", 2, tmp_path_factory)


@pytest.fixture(scope="module")
def pp3(tmp_path_factory):
    return _launch("pp3", 3, tmp_path_factory)


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    return _launch("dp2", 4, tmp_path_factory)


def _by_stage(ranks: list[dict]) -> dict[int, dict]:
    return {r["stage"]: r for r in ranks}


def _assert_forward_only(rank: dict) -> None:
    assert rank["stage_role"] == FORWARD_ONLY
    assert not rank["has_optimizer"] and rank["optimizer_state_tensors"] == 0
    assert not NO_BACKWARD & set(rank["instructions"]), rank["instructions"]
    assert rank["instructions"]["ForwardPass"] > 0
    if "backward_calls" in rank:  # autograd never ran through, nor recorded for, this stage
        assert rank["forward_calls"] > 0 and rank["backward_calls"] == 0 and rank["outputs_requiring_grad"] == 0
    assert all(rank["layers_unchanged"].values())


def _assert_matches_reference(result: dict, rel: float = 1e-5) -> None:
    for pipe, ref in zip(result["pipe_losses"], result["ref_losses"], strict=True):
        assert abs(pipe - ref) <= rel * abs(ref), (result["pipe_losses"], result["ref_losses"])
    assert abs(result["pipe_eval"] - result["ref_eval"]) <= rel * abs(result["ref_eval"])


# ----------------------------------------------------------------------------- multi-process runs

@pytest.mark.multiprocess
def test_forward_only_stage_never_runs_backward(pp2):
    facts = pp2["frozen_first_stage"]
    stages = _by_stage(facts["ranks"])
    _assert_forward_only(stages[0])
    assert stages[0]["requires_grad"] == []
    train = stages[1]
    assert train["stage_role"] == TRAIN_STAGE and train["has_optimizer"] and train["optimizer_state_tensors"] > 0
    assert train["instructions"]["BackwardPass"] == 16 and "SendGrad" not in train["instructions"]
    assert train["outputs_requiring_grad"] > 0 and train["backward_calls"] > 0  # the watch does see backward
    assert not any(train["layers_unchanged"].values())
    assert train["losses"][-1] < train["losses"][0]
    assert stages[0]["losses"] == train["losses"]  # train_batch's loss reaches every stage
    assert stages[0]["global_steps"] == train["global_steps"] == 4
    assert facts["tied_identical"]


@pytest.mark.multiprocess
def test_relay_stage_passes_activations_and_gradients(pp3):
    facts = pp3["three_stage_phases"]["train_relay_train"]
    stages = _by_stage(facts["ranks"])
    relay = stages[1]
    assert relay["stage_role"] == RELAY and not relay["has_optimizer"]
    assert relay["forward_calls"] == 0 and relay["backward_calls"] == 0  # no compute at all
    assert relay["instructions"]["SendGrad"] == relay["instructions"]["RecvGrad"] == 16
    assert all(relay["layers_unchanged"].values())
    assert not any(stages[0]["layers_unchanged"].values())  # gradients reached stage 0 through the relay
    assert stages[2]["layers_unchanged"] == {"5": True, "6": True, "7": False}  # dormant blocks, trained norm
    assert facts["tied_identical"]
    _assert_matches_reference(facts)


@pytest.mark.multiprocess
def test_data_parallel_frozen_stage_with_zero1(dp2):
    facts = dp2["data_parallel_frozen"]
    for rank in facts["ranks"]:
        if rank["stage"] == 0:
            _assert_forward_only(rank)
        else:
            assert rank["stage_role"] == TRAIN_STAGE and not any(rank["layers_unchanged"].values())
            assert rank["lr"] == pytest.approx(3e-2 / 4)  # LambdaLR 1/(1+step) after 3 steps
    losses = {tuple(r["losses"]) for r in facts["ranks"]}
    assert len(losses) == 1  # data-parallel average broadcast to every stage
    assert facts["replicas_identical"] and facts["tied_identical"]


@pytest.mark.multiprocess
def test_two_phases_rebuild_engine_on_one_module(pp2):
    facts = pp2["two_phases"]
    a, b = _by_stage(facts["phase_a"]), _by_stage(facts["phase_b"])
    assert a[0]["stage_role"] == a[1]["stage_role"] == TRAIN_STAGE
    assert a[1]["layers_unchanged"] == {"3": True, "4": True, "5": False}  # dormant blocks untouched
    _assert_forward_only(b[0])  # phase A's unit stays bit-identical through phase B
    assert not any(b[1]["layers_unchanged"].values())
    assert facts["tied_identical_a"] and facts["tied_identical_b"]
    for rank in [*facts["phase_a"], *facts["phase_b"]]:
        assert rank["forward_pre_hooks"] == 1  # the phase-A engine was retired, not left hooked in
    assert facts["losses_b"][-1] < facts["losses_a"][0]
    assert a[0]["eval"] == a[1]["eval"] and b[0]["eval"] == b[1]["eval"]


@pytest.mark.multiprocess
def test_rackwise_equals_plain_deepspeed(pp2):
    facts = pp2["rackwise_matches_plain"]
    assert facts["losses"] == facts["plain_losses"]
    assert facts["params_equal"]
    assert all(r["stage_role"] == TRAIN_STAGE for r in facts["ranks"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", ["zero1", "zero0", "zero1_activation_checkpointing"])
def test_clipping_matches_single_process_reference(pp2, variant):
    result = pp2["clipping_matches_reference"][variant]
    assert min(result["ref_grad_norms"]) > 10 * 0.05  # clipping is active on every step
    _assert_matches_reference(result)
    assert result["layer_grad_norms"][0] == {} and set(result["layer_grad_norms"][1]) == {"3", "4", "5", "6"}
    assert all(v > 0 for v in result["layer_grad_norms"][1].values())
    assert result["quiet_step_grad_norms"] == [{}, {}], "a step that does not log computes no norms"


@pytest.mark.parametrize("phase, expected", [
    ("train_relay_train", (TRAIN_STAGE, RELAY, TRAIN_STAGE)),
    ("frozen_train_train", (FORWARD_ONLY, TRAIN_STAGE, TRAIN_STAGE)),
    ("frozen_frozen_train", (FORWARD_ONLY, FORWARD_ONLY, TRAIN_STAGE)),
    ("mixed_relay_train", (TRAIN_STAGE, RELAY, TRAIN_STAGE)),
])
@pytest.mark.multiprocess
def test_three_stage_phases_match_reference(pp3, phase, expected):
    facts = pp3["three_stage_phases"][phase]
    stages = _by_stage(facts["ranks"])
    assert tuple(stages[s]["stage_role"] for s in range(3)) == expected
    for rank in stages.values():
        if rank["stage_role"] == FORWARD_ONLY:
            _assert_forward_only(rank)
    if phase == "mixed_relay_train":  # frozen embedding + block inside a train stage
        assert stages[0]["layers_unchanged"] == {"1": True, "2": False}
        assert "SendGrad" not in stages[0]["instructions"] and stages[0]["has_optimizer"]
    assert min(facts["ref_grad_norms"]) > 0.05
    _assert_matches_reference(facts)
    assert facts["tied_identical"]


@pytest.mark.multiprocess
def test_checkpoint_roundtrip_on_stages_without_optimizer(pp3, dp2):
    for ranks in (dp2["data_parallel_frozen"]["ranks"], pp3["three_stage_phases"]["train_relay_train"]["ranks"]):
        for rank in ranks:
            ckpt = rank["checkpoint"]
            assert ckpt["again"] == ckpt["first"] and ckpt["same_weights"], rank
            assert ckpt["module_only_restored"], rank
    dp_files = dp2["data_parallel_frozen"]["ranks"][0]["checkpoint"]["files"]
    assert "layer_01-model_states.pt" in dp_files and "mp_rank_00_model_states.pt" in dp_files
    assert [f for f in dp_files if "optim_states" in f] == ["zero_pp_rank_0_mp_rank_01_optim_states.pt",
                                                           "zero_pp_rank_1_mp_rank_01_optim_states.pt"]
    relay_files = pp3["three_stage_phases"]["train_relay_train"]["ranks"][0]["checkpoint"]["files"]
    assert not [f for f in relay_files if "optim_states" in f and "mp_rank_01" in f]
    # the next phase (other roles, other optimizers) resumes from it with a module-only load
    assert all(r["cross_phase_restored"] for r in pp3["three_stage_phases"]["frozen_train_train"]["ranks"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["frozen", "phase0", "rackwise"])
def test_bf16_optimizer_layouts(pp2, layout):
    facts = pp2["bf16_layouts"][layout]
    expected = ["NoneType", "BF16_Optimizer"] if layout == "frozen" else ["BF16_Optimizer"] * 2
    assert facts["optimizers"] == expected
    assert facts["losses"][-1] < facts["losses"][0] and facts["tied_identical"]


# ----------------------------------------------------------------------------- plans and schedules

def test_grouped_norms_equal_the_per_layer_norms_from_one_batched_call():
    from stackwise_ds.parallel.engine import grouped_norms

    gen = torch.Generator().manual_seed(0)
    layers = [[torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)], [torch.randn(5, generator=gen)],
              [torch.randn(2, 2, generator=gen) * 1e3, torch.zeros(7), torch.randn(1, generator=gen)]]
    expected = [sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5 for grads in layers]
    got = grouped_norms([g for grads in layers for g in grads], [len(grads) for grads in layers])
    assert got == pytest.approx(expected, rel=1e-6)
    assert grouped_norms([], []) == []


def test_make_plan_derives_stage_roles_and_rejects_bad_layouts():
    plan = make_plan({0: FROZEN, 1: FROZEN, 2: TRAIN, 3: DORMANT, 4: DORMANT, 5: TRAIN}, [0, 2, 3, 5, 6])
    assert plan.stage_roles == (FORWARD_ONLY, TRAIN_STAGE, RELAY, TRAIN_STAGE)
    assert [plan.sends_grad(s) for s in range(4)] == [False, False, True, True]
    assert make_plan(None, [0, 2, 4]).stage_roles == (TRAIN_STAGE, TRAIN_STAGE)
    with pytest.raises(ValueError, match="missing"):
        make_plan({0: TRAIN}, [0, 1, 2])
    with pytest.raises(ValueError, match="last pipeline stage"):
        make_plan({0: TRAIN, 1: DORMANT}, [0, 1, 2])
    with pytest.raises(ValueError, match="no pipeline layer has role 'train'"):
        make_plan({0: FROZEN, 1: FROZEN}, [0, 1, 2])


def test_frozen_layers_after_a_train_layer_pass_the_gradient_through():
    # a frozen layer after the first train layer backpropagates; one before it stays no_grad
    plan = make_plan({0: FROZEN, 1: TRAIN, 2: FROZEN, 3: DORMANT, 4: FROZEN, 5: TRAIN, 6: FROZEN},
                     [0, 1, 2, 3, 4, 5, 7])
    assert plan.layer_roles == (FROZEN, TRAIN, FROZEN_BACKPROP, DORMANT, FROZEN_BACKPROP, TRAIN, FROZEN_BACKPROP)
    assert plan.stage_roles == (FORWARD_ONLY, TRAIN_STAGE, BACKPROP, RELAY, BACKPROP, TRAIN_STAGE)
    assert [plan.sends_grad(s) for s in range(6)] == [False, False, True, True, True, True]
    # a frozen last stage (LM head and last stack frozen) computes the loss and backpropagates
    assert make_plan({0: FROZEN, 1: TRAIN, 2: FROZEN, 3: FROZEN}, [0, 2, 4]).stage_roles == (TRAIN_STAGE, BACKPROP)
    # an explicit frozen_backprop before every train layer gets nothing to pass a gradient to: plain frozen
    assert make_plan({0: FROZEN_BACKPROP, 1: TRAIN}, [0, 1, 2]).layer_roles == (FROZEN, TRAIN)


def _layouts(max_stages: int = 5):
    """Every valid stage-role pattern: forward-only prefix, a train stage, then train/relay/backprop, and a last stage
    that trains or backpropagates."""
    for stages in range(2, max_stages + 1):
        for n_forward in range(stages):
            middle = stages - n_forward - 2
            if middle < 0:
                yield (FORWARD_ONLY,) * n_forward + (TRAIN_STAGE,)
                continue
            for *mid, last in itertools.product((TRAIN_STAGE, RELAY, BACKPROP), repeat=middle + 1):
                if last != RELAY:
                    yield (FORWARD_ONLY,) * n_forward + (TRAIN_STAGE, *mid, last)


def _schedules(stage_roles: tuple[str, ...], micro_batches: int) -> list[list]:
    layer_role = {FORWARD_ONLY: FROZEN, TRAIN_STAGE: TRAIN, RELAY: DORMANT, BACKPROP: FROZEN}
    plan = make_plan({s: layer_role[r] for s, r in enumerate(stage_roles)}, list(range(len(stage_roles) + 1)))
    assert plan.stage_roles == stage_roles
    return [[cmd for step in StageWiseTrainSchedule(micro_batches, len(stage_roles), s, plan) for cmd in step]
            for s in range(len(stage_roles))]


def _run_blocking(streams: list[list]) -> bool:
    """Replay instruction streams where every send waits for its receive (and vice versa)."""
    pending = {SendActivation: (RecvActivation, 1), SendGrad: (RecvGrad, -1)}
    pos = [0] * len(streams)

    def current(stage):
        return streams[stage][pos[stage]] if pos[stage] < len(streams[stage]) else None

    progress = True
    while progress:
        progress = False
        for stage in range(len(streams)):
            cmd = current(stage)
            if cmd is None or isinstance(cmd, (RecvActivation, RecvGrad)):
                continue
            if type(cmd) in pending:
                recv_type, direction = pending[type(cmd)]
                if not isinstance(current(stage + direction), recv_type):
                    continue
                pos[stage + direction] += 1
            pos[stage] += 1
            progress = True
    return all(p == len(s) for p, s in zip(pos, streams, strict=True))


@pytest.mark.parametrize("stage_roles", list(_layouts()), ids=lambda r: "-".join(x[0] for x in r))
def test_schedule_is_deadlock_free_and_role_exact(stage_roles):
    for micro_batches in (1, 2, 3, 5, 8):
        streams = _schedules(stage_roles, micro_batches)
        assert _run_blocking(streams), (stage_roles, micro_batches)
        for stage, (role, stream) in enumerate(zip(stage_roles, streams, strict=True)):
            names = [type(c) for c in stream]
            assert names.count(ForwardPass) == micro_batches
            assert names.count(SyncTiedWeights) == 1
            assert (OptimizerStep in names) == (role == TRAIN_STAGE) and (CountStep in names) == (role != TRAIN_STAGE)
            assert (BackwardPass in names) == (role != FORWARD_ONLY)
            assert (SendGrad in names) == (role != FORWARD_ONLY and stage > stage_roles.index(TRAIN_STAGE))
            assert (LoadMicroBatch in names) == (stage in (0, len(stage_roles) - 1))
            assert names.count(RecvActivation) == (micro_batches if stage > 0 else 0)
