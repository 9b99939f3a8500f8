"""Greedy mode that does not drift (``prefix: frozen`` with ``training.freeze_embedding``): from the second
phase on the embedding is frozen with the prefix and a tied LM head trains as its own copy.

The planning and the renaming are checked purely; one real 2-rank stackwise run on the default elastic
layout (tied rack, 2 stacks of 1 block, 3 steps a phase, a tag every 2 steps) is shared by the assertions
on its files, its resumes and its consolidated model.
"""


import pytest
import torch

from launch_utils import TINY, layer_state, rack_of, results, resumed_copy, run_training, scalars, state
from stackwise_ds.checkpoint.files import TrainingState
from stackwise_ds.checkpoint.locate import config_of
from stackwise_ds.config import StackWiseConfig, apply_overrides
from stackwise_ds.layout import FROZEN, TRAIN, LayerUnit, UnitKind
from stackwise_ds.model import untie_lm_head
from stackwise_ds.phases import plan_phases
from stackwise_ds.training.layer_files import renamed_state

STEPS = 3
RUN = ("training.training_architecture=stackwise", "model.architecture.blocks_per_stack=1",
       f"training.steps_per_phase={STEPS}", "training.save_interval=2", "training.optimizer_across_phases=carry")
EMBEDDING, PREFIX, HEAD = 0, 1, 4  # pipeline layers of a 2 x 1-block rack: embedding, 2 blocks, norm, head


def config(*overrides) -> StackWiseConfig:
    return StackWiseConfig.from_dict(apply_overrides({}, [*TINY, *RUN, *overrides]))


@pytest.mark.parametrize("overrides,untied", [
    ((), [False, True, True]),  # the joint phase keeps the head its own matrix
    (("training.freeze_embedding=false",), [False, False, False]),
    (("training.prefix=train",), [False, False, False]),  # the embedding trains: the head may stay tied
    (("model.tie_embeddings=false",), [False, False, False]),  # an untied head needs no copy
])
def test_only_a_tied_frozen_prefix_run_unties_the_head_after_its_first_phase(overrides, untied):
    phases = plan_phases(config("training.joint_steps=2", *overrides))
    assert [p.untied_head for p in phases] == untied
    if untied[1]:
        assert phases[1].embedding_role == FROZEN and phases[2].embedding_role == TRAIN


def test_an_untied_head_starts_as_the_embedding_matrix_under_its_own_name():
    embedding, head = LayerUnit(UnitKind.EMBEDDING), LayerUnit(UnitKind.HEAD)
    weight = torch.randn(3, 2)
    assert renamed_state({"embedding.weight": weight}, embedding, head) == {"lm_head.weight": weight}
    block = LayerUnit(UnitKind.BLOCK, 0, 0)
    assert renamed_state({"attn.q_proj.weight": weight}, block, block) == {"attn.q_proj.weight": weight}
    rack = rack_of(config())
    untie_lm_head(rack)
    assert rack.lm_head.weight is not rack.embedding.weight and torch.equal(rack.lm_head.weight, rack.embedding.weight)
    assert not rack.tie_embeddings and rack.lm_head.weight.requires_grad


def test_a_tag_with_an_untied_head_reads_as_an_untied_rack(tmp_path):
    saved = config().to_dict()
    assert config_of(TrainingState(config=saved), tmp_path).model.tie_embeddings
    assert not config_of(TrainingState(config=saved, untied_head=True), tmp_path).model.tie_embeddings


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("greedy")
    run_training(2, out, *RUN)
    return out


@pytest.mark.multiprocess
def test_the_embedding_freezes_with_the_prefix_and_the_head_trains_as_its_copy(greedy_run):
    # phase 0 ends at step STEPS; tags 3 (phase end), 4 and 6 are kept
    embedding = layer_state(greedy_run, STEPS, EMBEDDING)["embedding.weight"]
    for step in (STEPS + 1, 2 * STEPS):  # bit-identical through phase 1: the frozen stack's input never moves
        assert torch.equal(layer_state(greedy_run, step, EMBEDDING)["embedding.weight"], embedding)
        assert layer_state(greedy_run, step, PREFIX).keys() == layer_state(greedy_run, STEPS, PREFIX).keys()
        assert all(torch.equal(v, layer_state(greedy_run, STEPS, PREFIX)[k])
                   for k, v in layer_state(greedy_run, step, PREFIX).items())
    tag = greedy_run / "checkpoints" / f"step{STEPS:08d}"
    assert not (tag / f"layer_{HEAD:02d}-model_states.pt").exists(), "phase 0 is tied: the head has no file"
    head = layer_state(greedy_run, 2 * STEPS, HEAD)["lm_head.weight"]
    assert head.shape == embedding.shape and not torch.equal(head, embedding), "the head trains in phase 1"
    assert not torch.equal(embedding, rack_of(config()).embedding.weight), "phase 0 trains it"
    assert [state(greedy_run, f"step{s:08d}")["untied_head"] for s in (STEPS, STEPS + 1, 2 * STEPS)] == \
        [False, True, True]
    assert all(p["val_loss_after"] < p["val_loss_before"] for p in results(greedy_run)["phases"])


@pytest.mark.multiprocess
def test_the_untied_head_starts_with_the_tied_matrix_moments(greedy_run):
    """Phase 1 runs on one stage x 2 replicas; of its training layers only the head trained before (as the
    tied matrix), so the optimizer's step count goes on from phase 0's only if the head took layer 0's moments."""
    assert [(p["layout"]["pipeline_stages"], p["layout"]["data_parallel"])
            for p in state(greedy_run)["finished_phases"]][1] == (1, 2)
    tag = greedy_run / "checkpoints" / f"step{2 * STEPS:08d}"
    shard = torch.load(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"]
    assert {int(s["step"]) for s in shard["base_optimizer_state"]["state"].values()} == {2 * STEPS}
    moments = torch.load(tag / f"layer_{HEAD:02d}-optim_moments.pt", weights_only=True)
    assert set(moments["moments"]) == {"lm_head.weight"}


@pytest.mark.multiprocess
@pytest.mark.parametrize("kept", [STEPS, STEPS + 1], ids=["phase_boundary", "mid_phase"])
def test_resume_of_an_untied_greedy_run_is_bitwise(greedy_run, tmp_path, kept):
    """At the boundary the head starts from the embedding's file again; mid-phase from its own file."""
    out = resumed_copy(greedy_run, tmp_path, kept)
    run_training(2, out, *RUN)
    assert [step for step, _ in scalars(out, "train/loss")] == list(range(kept + 1, 2 * STEPS + 1)), "resumed"
    assert results(out)["losses"] == results(greedy_run)["losses"]
    assert torch.equal(layer_state(out, 2 * STEPS, HEAD)["lm_head.weight"],
                       layer_state(greedy_run, 2 * STEPS, HEAD)["lm_head.weight"])


@pytest.mark.multiprocess
def test_the_consolidated_model_carries_the_head_and_gives_the_runs_validation_loss(greedy_run, tmp_path):
    from stackwise_ds.checkpoint import consolidate
    from stackwise_ds.checkpoint.consolidation import load_rack, read_consolidated
    from stackwise_ds.parallel.pipe import lm_loss
    from stackwise_ds.training.data_setup import load_bundle, validation_set

    out = consolidate(greedy_run / "checkpoints", tmp_path / "model.safetensors")
    weights, saved = read_consolidated(out)
    assert not saved.model.tie_embeddings and "lm_head.weight" in weights
    rack = load_rack(out)
    assert rack.lm_head.weight is not rack.embedding.weight
    assert torch.equal(rack.lm_head.weight, layer_state(greedy_run, 2 * STEPS, HEAD)["lm_head.weight"])
    run_config = config(f"training.output_dir={greedy_run}")
    bundle = load_bundle(run_config)
    val = validation_set(bundle.val, run_config.training.micro_batch_size, run_config.training.eval_batches, 0, 1)
    with torch.no_grad():
        losses = [float(lm_loss(rack(ids), labels)) for ids, labels in val.batches[:val.real]]
    expected = results(greedy_run)["phases"][-1]["val_loss_after"]
    assert abs(sum(losses) / len(losses) - expected) <= 1e-5 * expected, (losses, expected)


@pytest.mark.multiprocess
def test_export_generate_and_reshard_read_the_untied_head(greedy_run, tmp_path):
    from transformers import LlamaForCausalLM

    from stackwise_ds.checkpoint import load_rack
    from stackwise_ds.checkpoint.generate import generate_text
    from stackwise_ds.checkpoint.hf import export_hf
    from stackwise_ds.checkpoint.resharding import reshard

    rack = load_rack(greedy_run)
    ids = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = rack(ids)
    export_hf(greedy_run, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not hf.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours, atol=1e-4, rtol=0)
    assert generate_text(greedy_run, "ab", max_new_tokens=4, temperature=0.0).startswith("ab")
    reshard(greedy_run / "checkpoints" / f"step{2 * STEPS:08d}", tmp_path / "pp2", pipeline_stages=2)
    resharded = load_rack(tmp_path / "pp2")
    assert resharded.state_dict().keys() == rack.state_dict().keys()
    assert all(torch.equal(v, rack.state_dict()[k]) for k, v in resharded.state_dict().items())
    assert torch.equal(resharded.lm_head.weight, layer_state(greedy_run, 2 * STEPS, HEAD)["lm_head.weight"])


@pytest.mark.multiprocess
def test_the_standing_pipeline_is_re_formed_with_an_untied_head(tmp_path):
    """The fixed 2-stage layout places every layer in both phases; it is built again (plain head, no tied
    copies) when the head unties: stage 0 (embedding, stack 0) runs forward only in phase 1."""
    run_training(2, tmp_path, *RUN, "parallel.phase_layout=fixed", "parallel.pipeline_stages=2")
    embedding = layer_state(tmp_path, STEPS, EMBEDDING)["embedding.weight"]
    assert torch.equal(layer_state(tmp_path, 2 * STEPS, EMBEDDING)["embedding.weight"], embedding)
    assert torch.equal(layer_state(tmp_path, 2 * STEPS, PREFIX)["attn.q_proj.weight"],
                       layer_state(tmp_path, STEPS, PREFIX)["attn.q_proj.weight"])
    head = layer_state(tmp_path, 2 * STEPS, HEAD)["lm_head.weight"]
    assert not torch.equal(head, embedding)
    assert not list((tmp_path / "checkpoints" / f"step{2 * STEPS:08d}").glob("zero_pp_rank_*_mp_rank_00_*")), \
        "stage 0 holds nothing that trains in phase 1: no optimizer"
    assert all(p["val_loss_after"] < p["val_loss_before"] for p in results(tmp_path)["phases"])
