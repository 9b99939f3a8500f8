"""stackwise-eval (stackwise_ds.checkpoint.evaluation): the trainer's validation loss of a run, a tag or a
consolidated file, on the run's data or on other data a config describes.

The fast tests evaluate small random racks saved as consolidated files on a text file the test writes; the
multi-process ones read the run of tests/conftest.py (tiny_rackwise_run) and launch the tool on 2 ranks.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launch_utils import REPO, free_port, rack_of, results
from stackwise_ds.checkpoint import consolidate, evaluate
from stackwise_ds.checkpoint.consolidation import save_consolidated
from stackwise_ds.config import StackWiseConfig
from stackwise_ds.data import ByteTokenizer, build_datasets, val_batches
from stackwise_ds.data.tokenizer import train_bpe
from stackwise_ds.parallel.pipe import lm_loss
from stackwise_ds.tools_cli import eval_main

WORDS = ("the of and a to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up").split()


def write_text(path: Path, seed: int, lines: int = 600) -> Path:
    """A text file of random words (different seeds: different text, the same kind)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines)))
    return path


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_config(text_dir: Path, vocab_size: int = 258) -> StackWiseConfig:
    return StackWiseConfig.from_dict({
        "model": {"vocab_size": vocab_size, "d_model": 32, "n_heads": 4, "max_seq_len": 32,
                  "architecture": {"n_stacks": 2, "blocks_per_stack": 1}},
        "data": {"source": "text_files", "paths": [str(text_dir)], "seq_len": 16, "val_fraction": 0.1},
        "training": {"micro_batch_size": 3, "eval_batches": 4, "seed": 5}})


@pytest.fixture(scope="module")
def text_rack(tmp_path_factory):
    """A random byte-tokenizer rack in a consolidated file whose config trains on a text folder."""
    work = tmp_path_factory.mktemp("eval_rack")
    text_dir = write_text(work / "text" / "a.txt", seed=0).parent
    config = tiny_config(text_dir)
    rack = rack_of(config)
    path = save_consolidated(dict(rack.state_dict()), config, work / "rack.safetensors", ByteTokenizer())
    train_bpe(lambda: [" ".join(WORDS)] * 20, vocab_size=280).save(work / "bpe.json")  # another tokenizer
    return {"path": path, "rack": rack.eval(), "config": config, "work": work}


def run_eval(capsys, *args) -> tuple[int, str, str]:
    code = eval_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_loss(rack, config: StackWiseConfig) -> tuple[float, int]:
    """The trainer's validation loss, from the data library directly: the mean of the first eval_batches
    micro-batches' losses over the seeded validation split (and the number of windows)."""
    d, t = config.data, config.training
    bundle = build_datasets(source=d.source, paths=d.paths, seq_len=d.seq_len, val_fraction=d.val_fraction,
                            seed=t.seed, tokenizer="byte", vocab_size=config.model.vocab_size)
    batches = list(val_batches(bundle.val, t.micro_batch_size, t.eval_batches))
    with torch.no_grad():
        losses = [float(lm_loss(rack(inputs), labels)) for inputs, labels in batches]
    return sum(losses) / len(losses), len(batches) * t.micro_batch_size


# ----------------------------------------------------------------------------- fast: what it computes


def test_eval_is_the_mean_loss_of_the_first_validation_batches(text_rack, capsys):
    code, out, err = run_eval(capsys, text_rack["path"], "--json")
    assert code == 0, err
    report = json.loads(out)
    loss, windows = expected_loss(text_rack["rack"], text_rack["config"])
    assert report["loss"] == pytest.approx(loss, abs=1e-6)
    assert report["windows"] == windows == 12 and report["tokens"] == 12 * 16 and report["micro_batches"] == 4
    assert report["tag"] is None and report["world_size"] == 1 and report["seed"] == 5
    assert report["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-6)


def test_eval_line_and_config_keys_on_top_of_the_models(text_rack, capsys):
    other = write_text(text_rack["work"] / "other" / "b.txt", seed=1).parent
    config = write_yaml(text_rack["work"] / "other.yaml", {"data": {"paths": [str(other)]}})
    code, out, err = run_eval(capsys, text_rack["path"], "--config", config, "--set", "training.eval_batches=2")
    assert code == 0, err
    expected = tiny_config(other)
    expected.training.eval_batches = 2  # the rest (seq_len, val_fraction, seed, batch size) stays the model's
    loss, windows = expected_loss(text_rack["rack"], expected)
    assert out == f"val loss {loss:.4f}  ppl {torch.tensor(loss).exp().item():.2f}  ({windows} windows, 96 tokens)\n"


# ----------------------------------------------------------------------------- fast: bad inputs


@pytest.mark.parametrize("args, message", [
    (["{work}/missing.safetensors"], "missing.safetensors does not exist"),
    (["{work}/text"], "no checkpoint in .*text: it holds no tag folder"),
    (["{rack}", "--set", "data.bogus=1"], "unknown key 'bogus' in data"),
    (["{rack}", "--set", "model.d_model=64"], r"sets model.d_model 64 \(the model's: 32\), but the model section"),
    (["{rack}", "--config", "{work}/none.yaml"], "config file .*none.yaml does not exist"),
    (["{rack}", "--set", "data.tokenizer=bpe"], "'bpe' would train a new BPE .* trained with data.tokenizer 'byte'"),
    (["{rack}", "--set", "data.tokenizer={work}/bpe.json"], "gives a 280-token tokenizer, but the model was trained "
                                                            "with a 258-token byte tokenizer"),
    (["{rack}", "--set", "data.seq_len=64"], r"data.seq_len \(64\) is longer than the model's max_seq_len \(32\)"),
    (["{rack}", "--set", "data.val_fraction=0"], "validation split holds 0 windows, fewer than one micro-batch"),
    (["{rack}", "--set", "set-without-equals"], "is not of the form section.key=value"),
])
def test_bad_inputs_are_one_clear_line_and_status_2(text_rack, capsys, args, message):
    filled = [a.format(work=text_rack["work"], rack=text_rack["path"]) for a in args]
    code, out, err = run_eval(capsys, *filled)
    assert code == 2 and out == ""
    assert err.startswith("eval: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_a_model_without_tokenizer_needs_data_tokenizer(text_rack, capsys):
    config = tiny_config(Path(text_rack["config"].data.paths[0]), vocab_size=300)
    source = save_consolidated(dict(rack_of(config).state_dict()), config,
                               text_rack["work"] / "no_tokenizer.safetensors")  # as if imported without one
    code, _, err = run_eval(capsys, source)
    assert code == 2 and "carries no tokenizer" in err and "--set data.tokenizer=PATH" in err, err
    byte_json = ByteTokenizer().save(text_rack["work"] / "byte" / "tokenizer.json")
    code, out, err = run_eval(capsys, source, "--set", f"data.tokenizer={byte_json.parent}", "--json")
    assert code == 0 and json.loads(out)["windows"] == 12, err


# ----------------------------------------------------------------------------- multi-process: a trained run


def final_val_loss(run: Path) -> float:
    return results(run)["phases"][-1]["val_loss_after"]


@pytest.mark.multiprocess
def test_eval_of_a_run_and_of_its_consolidated_file_is_the_runs_validation_loss(tiny_rackwise_run, tmp_path):
    run = tiny_rackwise_run
    of_run = evaluate(run)
    assert of_run.loss == pytest.approx(final_val_loss(run), abs=1e-6) and of_run.tag == "step00000006"
    assert of_run.windows == 4 and of_run.tokens == 4 * 32  # eval_batches 2 x micro_batch_size 2, seq_len 32
    consolidated = consolidate(run, tmp_path / "rack.safetensors")
    assert evaluate(consolidated).loss == pytest.approx(final_val_loss(run), abs=1e-6)
    assert evaluate(run, tag="step00000002").loss > of_run.loss  # an earlier tag: the run had learned less
    text = write_text(tmp_path / "text" / "a.txt", seed=0, lines=3000).parent
    other = evaluate(run, write_yaml(tmp_path / "other.yaml", {"data": {"source": "text_files", "paths": [str(text)],
                                                                        "max_files": None}}))
    assert other.windows == 4 and other.config.data.seq_len == 32 and Path(other.cache_entry).name.startswith("text")
    assert abs(other.loss - of_run.loss) > 0.01, (other.loss, of_run.loss)


@pytest.mark.multiprocess
def test_eval_under_deepspeed_shares_the_windows_and_reports_the_same_loss(tiny_rackwise_run):
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    command = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "tools" / "eval.py"),
               str(tiny_rackwise_run), "--json"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, proc.stdout  # rank 0 reports
    assert reports[0]["world_size"] == 2 and reports[0]["micro_batches"] == 2 and reports[0]["windows"] == 4
    assert reports[0]["loss"] == pytest.approx(final_val_loss(tiny_rackwise_run), abs=1e-6)
