"""Tests for stackwise_ds.data: tokenizer, sources, packing, split, stream, masking, cache, errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from stackwise_ds.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    PackedDataset,
    TrainBatchStream,
    build_datasets,
    check_enough_data,
    default_cache_dir,
    list_stdlib_files,
    list_text_files,
    split_windows,
    val_batches,
)
from stackwise_ds.data import cache as cache_mod
from stackwise_ds.data.corpus import stdlib_root

TOK = ByteTokenizer()


def write_docs(directory: Path, docs: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def id_dataset(n_windows: int, seq_len: int = 4) -> PackedDataset:
    """Window i is filled with the value i, so input_ids[:, 0] identifies the sample."""
    windows = np.repeat(np.arange(n_windows, dtype=np.int64)[:, None], seq_len + 1, axis=1)
    return PackedDataset(windows, np.arange(n_windows))


def ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return batch[0][:, 0].tolist()


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_non_ascii():
    text = "héllo wörld — 日本語 🚀\n\ttabs"
    encoded = TOK.encode(text)
    assert all(0 <= i < 256 for i in encoded)
    assert len(encoded) == len(text.encode("utf-8")) > len(text)  # multi-byte chars
    assert TOK.decode(encoded) == text
    assert TOK.encode_to_array(text).tolist() == encoded


def test_tokenizer_specials_and_vocab():
    assert (TOK.eos_id, TOK.mask_id, TOK.vocab_size) == (256, 257, 258)
    ids_ = TOK.encode("ab") + [TOK.eos_id, TOK.mask_id] + TOK.encode("é")
    assert TOK.decode(ids_) == "abé"
    assert TOK.decode(TOK.encode("é")[:1]) == "\ufffd"  # a cut character is replaced, not raised


# ---------------------------------------------------------------- sources


def test_stdlib_source_lists_interpreter_sources():
    files = list_stdlib_files()
    assert len(files) > 500
    assert files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not any({"site-packages", "__pycache__"} & set(f.parts) for f in files)
    root = stdlib_root()
    assert all(root in f.parents for f in files)
    assert Path(os.__file__).resolve() in set(files)


def test_stdlib_build_with_max_files(tmp_path):
    bundle = build_datasets(source="stdlib", max_files=20, seq_len=64, val_fraction=0.0, cache_dir=str(tmp_path))
    first = [p.read_bytes() for p in list_stdlib_files()[:20]]
    nonempty = [b for b in first if b]
    assert bundle.n_tokens == sum(len(b) + 1 for b in nonempty)  # +1 eos per document
    assert len(bundle.train) == bundle.n_tokens // 65
    x, _ = bundle.train[0]
    assert bytes(x.tolist()[:40]) == nonempty[0][:40]


def test_text_files_directory_sorted_and_hidden_skipped(tmp_path):
    write_docs(tmp_path / "d", {"b.txt": "B", "a.md": "A", ".hidden": "H"})
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "c.py").write_text("C")
    names = [p.name for p in list_text_files([str(tmp_path / "d")])]
    assert names == ["a.md", "b.txt", "c.py"]


# ---------------------------------------------------------------- packing


def test_packing_shapes_shift_and_eos(tmp_path):
    docs = {"a.txt": "first doc", "b.txt": "second document!", "c.txt": "third"}
    write_docs(tmp_path / "docs", docs)
    seq_len = 7
    bundle = build_datasets(source="text_files", paths=[str(tmp_path / "docs")], seq_len=seq_len,
                            val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    stream = []
    for name in sorted(docs):
        stream += TOK.encode(docs[name]) + [TOK.eos_id]
    n_windows = len(stream) // (seq_len + 1)
    assert bundle.n_tokens == len(stream)
    assert len(bundle.train) == n_windows and len(bundle.val) == 0
    windows = np.stack([bundle.train.window(i).numpy() for i in range(n_windows)])
    assert windows.shape == (n_windows, seq_len + 1)
    assert windows.reshape(-1).tolist() == stream[: n_windows * (seq_len + 1)]  # tail dropped
    assert (windows == TOK.eos_id).sum() >= 2  # eos separates the documents
    for i in range(n_windows):
        x, y = bundle.train[i]
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (seq_len,)
        assert torch.equal(x[1:], y[:-1])
        assert torch.equal(y, bundle.train.window(i)[1:])


# ---------------------------------------------------------------- split


def test_split_deterministic_disjoint_complete():
    train, val = split_windows(1000, 0.1, seed=3)
    train2, val2 = split_windows(1000, 0.1, seed=3)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    _, val_other = split_windows(1000, 0.1, seed=4)
    assert not np.array_equal(val, val_other)
    assert len(val) == 100 and len(train) == 900
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    assert len(split_windows(50, 0.001, seed=0)[1]) == 1  # at least one validation window
    assert len(split_windows(50, 0.0, seed=0)[1]) == 0


def test_split_through_build_is_seeded(tmp_path):
    write_docs(tmp_path / "docs", {"a.txt": "x" * 2000})
    kwargs = dict(source="text_files", paths=[str(tmp_path / "docs")], seq_len=15, val_fraction=0.2,
                  cache_dir=str(tmp_path / "cache"))
    a, b, c = build_datasets(seed=1, **kwargs), build_datasets(seed=1, **kwargs), build_datasets(seed=2, **kwargs)
    assert np.array_equal(a.val.rows, b.val.rows) and np.array_equal(a.train.rows, b.train.rows)
    assert not np.array_equal(a.val.rows, c.val.rows)
    assert not set(a.train.rows.tolist()) & set(a.val.rows.tolist())


# ---------------------------------------------------------------- stream


def take(stream: TrainBatchStream, n: int) -> list[list[int]]:
    return [ids(next(stream)) for _ in range(n)]


STREAM_KW = dict(global_batch_size=8, micro_batch_size=2, dp_world_size=2, seed=5)  # grad_accum = 2


def test_stream_resume_matches_uninterrupted():
    data = id_dataset(50)
    full = take(TrainBatchStream(data, dp_rank=1, **STREAM_KW), 2 * 10)

    first = TrainBatchStream(data, dp_rank=1, **STREAM_KW)
    head = take(first, 2 * 4)
    state = first.state_dict()
    assert state == {"consumed_samples": 4 * 8}
    resumed = TrainBatchStream(data, dp_rank=1, **STREAM_KW)
    resumed.load_state_dict(state)
    assert head + take(resumed, 2 * 6) == full
    from_step = TrainBatchStream(data, dp_rank=1, start_step=4, **STREAM_KW)
    assert take(from_step, 2 * 6) == full[8:]

    # stop and restart after every single step: still the same stream
    pieces, consumed = [], 0
    for _ in range(10):
        s = TrainBatchStream(data, dp_rank=1, consumed_samples=consumed, **STREAM_KW)
        pieces += take(s, 2)
        consumed = s.state_dict()["consumed_samples"]
    assert pieces == full


def test_stream_consumed_samples_and_mid_step_state():
    s = TrainBatchStream(id_dataset(50), dp_rank=0, **STREAM_KW)
    next(s)
    assert s.consumed_samples == 0 and s.state_dict()["consumed_samples"] == 0  # step unfinished
    next(s)
    assert s.consumed_samples == 8 and s.step == 1
    step_start = s.state_dict()
    first_micro = ids(next(s))
    next(s), next(s)  # into the middle of the following step
    s.load_state_dict(step_start)
    assert ids(next(s)) == first_micro  # loading restarts at a step boundary


def test_stream_dp_ranks_partition_global_batches_and_epochs():
    n = 50
    data = id_dataset(n)
    per_rank = [take(TrainBatchStream(data, dp_rank=r, **STREAM_KW), 2 * 13) for r in range(2)]
    global_order = []
    for step in range(13):
        rank_slices = [sum(per_rank[r][2 * step: 2 * step + 2], []) for r in range(2)]
        assert not set(rank_slices[0]) & set(rank_slices[1])
        global_order += rank_slices[0] + rank_slices[1]  # rank 0's slice comes first
    assert sorted(global_order[:n]) == list(range(n))  # epoch 0 is a permutation
    assert sorted(global_order[n:2 * n]) == list(range(n))  # epoch 1, across the straddling step
    assert global_order[:n] != global_order[n:2 * n]  # reshuffled per epoch
    assert global_order[:n] != list(range(n))
    other_seed = TrainBatchStream(data, dp_rank=0, **{**STREAM_KW, "seed": 6})
    assert take(other_seed, 4) != per_rank[0][:4]


def test_stream_batch_shapes_and_validation(tmp_path):
    data = id_dataset(20, seq_len=6)
    x, y = next(TrainBatchStream(data, dp_rank=0, global_batch_size=4, micro_batch_size=2, dp_world_size=1, seed=0))
    assert x.shape == y.shape == (2, 6) and x.dtype == torch.long
    with pytest.raises(ValueError, match="not divisible by micro_batch_size\\*dp_world_size"):
        TrainBatchStream(data, dp_rank=0, global_batch_size=6, micro_batch_size=2, dp_world_size=2, seed=0)
    with pytest.raises(ValueError, match="dp_rank=2 is outside"):
        TrainBatchStream(data, dp_rank=2, global_batch_size=4, micro_batch_size=2, dp_world_size=2, seed=0)


def test_val_batches_in_order_full_batches_only():
    data = id_dataset(7)
    batches = list(val_batches(data, micro_batch_size=2))
    assert [ids(b) for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert len(list(val_batches(data, 2, max_batches=2))) == 2
    shard = [ids(b) for b in val_batches(data, 2, dp_rank=1, dp_world_size=2)]
    assert shard == [[2, 3]]


# ---------------------------------------------------------------- masked LM


@pytest.fixture
def text_windows() -> np.ndarray:
    text = ("The quick brown fox jumps over the lazy dog. " * 200).encode()
    return np.frombuffer(text, dtype=np.uint8)[: 40 * 129].astype(np.uint16).reshape(40, 129)


def test_masked_lm_labels_and_inputs(text_windows):
    ds = PackedDataset(text_windows, np.arange(40), objective="masked_lm", mask_prob=0.15, seed=0)
    n_masked = n_mask_id = 0
    for i in range(len(ds)):
        x, y = ds[i]
        original = torch.from_numpy(text_windows[i, :128].astype(np.int64))
        masked = y != IGNORE_INDEX
        assert masked.any()
        assert torch.equal(y[masked], original[masked])
        assert torch.equal(x[~masked], original[~masked])  # untouched elsewhere
        n_masked += int(masked.sum())
        n_mask_id += int((x == TOK.mask_id).sum())
    assert 0.10 < n_masked / (40 * 128) < 0.20
    assert 0.65 < n_mask_id / n_masked < 0.95  # ~80% of masked positions become mask_id


def test_masked_lm_deterministic_per_seed_and_index(text_windows):
    def make(seed):
        return PackedDataset(text_windows, np.arange(40), objective="masked_lm", seed=seed)

    a, b, c = make(0), make(0), make(1)
    for i in (0, 7, 39):
        assert all(torch.equal(u, v) for u, v in zip(a[i], b[i], strict=True))
    assert any(not torch.equal(a[i][1], c[i][1]) for i in range(5))
    masked_0, masked_1 = (a[i][1] != IGNORE_INDEX for i in (0, 1))
    assert not torch.equal(masked_0, masked_1)  # different samples, different masks
    tiny = PackedDataset(text_windows[:, :9], np.arange(40), objective="masked_lm", mask_prob=0.001)
    assert all((tiny[i][1] != IGNORE_INDEX).sum() >= 1 for i in range(40))


# ---------------------------------------------------------------- cache


def test_cache_hit_skips_tokenisation_and_matches(tmp_path, monkeypatch):
    write_docs(tmp_path / "docs", {"a.txt": "alpha " * 300, "b.txt": "beta " * 300})
    kwargs = dict(source="text_files", paths=[str(tmp_path / "docs")], seq_len=31, cache_dir=str(tmp_path / "c"))
    first = build_datasets(**kwargs)
    assert not first.cache_hit

    def no_tokenising(self, text):
        raise AssertionError("tokenizer called on a cache hit")

    monkeypatch.setattr(ByteTokenizer, "encode_to_array", no_tokenising)
    second = build_datasets(**kwargs)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert second.n_tokens == first.n_tokens
    assert np.array_equal(np.asarray(first.train.windows), np.asarray(second.train.windows))
    assert np.array_equal(first.val.rows, second.val.rows)
    leftovers = [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith((".tmp", ".scratch"))]
    assert leftovers == []
    monkeypatch.undo()

    (tmp_path / "docs" / "a.txt").write_text("changed " * 300)  # new size+mtime -> new key
    third = build_datasets(**kwargs)
    assert not third.cache_hit and third.cache_path != first.cache_path


def test_cache_concurrent_builders_build_once(tmp_path):
    write_docs(tmp_path / "docs", {"a.txt": "concurrency " * 500})
    kwargs = dict(source="text_files", paths=[str(tmp_path / "docs")], seq_len=31, cache_dir=str(tmp_path / "c"))
    results, errors = [], []

    def build():
        try:
            results.append(build_datasets(**kwargs))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.cache_hit for r in results) == [False, True, True, True]
    entries = [p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and cache_mod.is_complete(entries[0])
    assert all(np.array_equal(np.asarray(r.train.windows), np.asarray(results[0].train.windows)) for r in results)


def test_default_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKWISE_DS_CACHE", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    write_docs(tmp_path / "docs", {"a.txt": "env " * 100})
    bundle = build_datasets(source="text_files", paths=[str(tmp_path / "docs")], seq_len=15)
    assert bundle.cache_path.parent == tmp_path / "envcache"
    monkeypatch.delenv("STACKWISE_DS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "stackwise_ds" / "data"


# ---------------------------------------------------------------- errors


def test_error_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'nope'.*data.source"):
        build_datasets(source="nope", cache_dir=str(tmp_path))


def test_error_missing_path(tmp_path):
    missing = str(tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError, match="absent.txt.*fix data.paths"):
        build_datasets(source="text_files", paths=[missing], cache_dir=str(tmp_path))


def test_error_empty_dataset(tmp_path):
    write_docs(tmp_path / "docs", {"empty.txt": ""})
    with pytest.raises(ValueError, match="dataset is empty"):
        build_datasets(source="text_files", paths=[str(tmp_path / "docs")], cache_dir=str(tmp_path / "c"))
    write_docs(tmp_path / "short", {"s.txt": "tiny"})
    with pytest.raises(ValueError, match="dataset is empty after packing.*shorten data.seq_len"):
        build_datasets(source="text_files", paths=[str(tmp_path / "short")], seq_len=64, cache_dir=str(tmp_path / "c"))
    assert [p for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []  # nothing half-written


def test_error_not_enough_data():
    data = id_dataset(3, seq_len=8)
    with pytest.raises(ValueError, match=(
        "the training split has 3 sequences of length 8 but one global batch needs 16: add data, "
        "lower training.micro_batch_size/gradient_accumulation_steps, or shorten data.seq_len")):
        check_enough_data(data, 16)
    check_enough_data(data, 3)  # exactly enough is fine


@pytest.mark.parametrize("bad", [0, -4])
def test_error_seq_len(tmp_path, bad):
    with pytest.raises(ValueError, match="seq_len must be a positive integer.*data.seq_len"):
        build_datasets(seq_len=bad, cache_dir=str(tmp_path))


@pytest.mark.parametrize("bad", [0.5, -0.01, 0.9])
def test_error_val_fraction(tmp_path, bad):
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 0.5\).*data.val_fraction"):
        build_datasets(val_fraction=bad, cache_dir=str(tmp_path))


def test_error_other_arguments(tmp_path):
    with pytest.raises(ValueError, match="needs data.hf_name"):
        build_datasets(source="hf", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs data.paths"):
        build_datasets(source="text_files", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown objective"):
        build_datasets(objective="seq2seq", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="mask_prob"):
        build_datasets(objective="masked_lm", mask_prob=0.0, cache_dir=str(tmp_path))


def test_validation_set_is_the_same_for_every_data_parallel_degree():
    """The run's first eval_batches micro-batches, dealt to replicas and padded to equal counts (only
    the real ones count), so a phase that changes the data-parallel degree validates on the same data."""
    from stackwise_ds.training.data_setup import validation_set

    data = id_dataset(12)
    for dp in (1, 2, 4):
        sets = [validation_set(data, 2, 3, rank, dp) for rank in range(dp)]
        assert len({len(s.batches) for s in sets}) == 1  # one pipeline pass per replica, equal counts
        real = sorted(i for s in sets for batch in s.batches[:s.real] for i in ids(batch))
        assert real == sorted(i for batch in val_batches(data, 2, 3) for i in ids(batch))
    assert validation_set(data, 2, 0, 0, 1) is None  # eval_batches 0: no validation


def test_a_validation_split_smaller_than_a_micro_batch_is_evaluated_as_one_padded_batch():
    """1 window with micro-batches of 4: one batch of that window and 3 copies whose labels are all ignored,
    so the loss is exactly the window's own; the other replicas repeat it uncounted."""
    import torch.nn.functional as F

    from stackwise_ds.training.data_setup import validation_note, validation_set

    data = id_dataset(1)
    sets = [validation_set(data, 4, 8, rank, 2) for rank in range(2)]
    assert [s.real for s in sets] == [1, 0] and [len(s.batches) for s in sets] == [1, 1]
    inputs, labels = sets[0].batches[0]
    assert inputs.shape == (4, 4) and (labels[1:] == IGNORE_INDEX).all() and torch.equal(labels[0], data[0][1])
    logits = torch.randn(4, 4, 8)  # [B, T, V]: the pipeline's loss over the padded batch is the window's own
    padded_loss = F.cross_entropy(logits.reshape(-1, 8), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(padded_loss, F.cross_entropy(logits[0], labels[0]))
    assert validation_set(id_dataset(0), 4, 8, 0, 1) is None
    assert "holds 1 window(s), fewer than one micro-batch" in validation_note(1, 4, 8)
    assert "no validation windows" in validation_note(0, 4, 8) and validation_note(4, 4, 8) is None


def test_json_files_hold_null_where_a_figure_is_nan(tmp_path):
    """results.json and stackwise_state.json stay strict JSON: NaN (a loss with no validation split) is null."""
    import json

    from stackwise_ds.checkpoint.files import write_json_atomic

    path = tmp_path / "results.json"
    write_json_atomic(path, {"val": float("nan"), "history": [(3, float("inf")), (4, 1.5)], "n": 2})
    assert json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON")) == {
        "val": None, "history": [[3, None], [4, 1.5]], "n": 2}


def test_text_files_skip_fifos_and_binaries_and_report_replaced_bytes(tmp_path):
    from stackwise_ds.data.corpus import SourceFile, read_file_documents

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "good.txt").write_text("hello")
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02")
    os.mkfifo(folder / "pipe")
    with pytest.warns(UserWarning, match=r"skipping 1 entries that are not regular files .*pipe"):
        files = list_text_files([str(folder)])
    assert [f.name for f in files] == ["blob.bin", "good.txt", "latin1.txt"]
    with pytest.warns(UserWarning, match=r"skipped 1 binary file.*blob.bin; 1 file\(s\) had invalid UTF-8, 2 byte"):
        docs = list(read_file_documents([SourceFile.stat(f) for f in files], None, user_files=True))
    assert docs == ["hello", "caf\ufffd cr\ufffdme"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*empty' \(.*\) holds no regular, non-hidden file"):
        list_text_files([str(empty)])


# ---------------------------------------------------------------- hf source: local folders


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """datasets' own cache under tmp_path (load_dataset of a local folder writes one)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts), encoding="utf-8")


def test_a_local_hf_folder_is_keyed_by_its_files(hf_home):
    folder = hf_home / "corpus"
    write_jsonl(folder / "a.jsonl", [f"first file, line {i} " * 5 for i in range(20)])
    kwargs = {"source": "hf", "hf_name": str(folder), "seq_len": 31, "cache_dir": str(hf_home / "c")}
    first = build_datasets(**kwargs)
    assert not first.cache_hit and build_datasets(**kwargs).cache_hit
    write_jsonl(folder / "b.jsonl", [f"a file added later, line {i} " * 5 for i in range(20)])
    second = build_datasets(**kwargs)
    assert not second.cache_hit and second.n_tokens > first.n_tokens  # the added file is read, not ignored


def test_a_save_to_disk_folder_loads_and_hf_errors_are_one_clear_line(hf_home):
    import datasets

    saved = hf_home / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["saved text " * 40] * 8})}).save_to_disk(saved)
    bundle = build_datasets(source="hf", hf_name=str(saved), text_field="body", seq_len=31,
                            cache_dir=str(hf_home / "c"))
    assert bundle.n_tokens == 8 * (len("saved text " * 40) + 1)
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['body'\]: set data.text_field"):
        build_datasets(source="hf", hf_name=str(saved), seq_len=31, cache_dir=str(hf_home / "c"))
    with pytest.raises(ValueError, match=r"'validation' is not a split of the saved dataset .*\['train'\]"):
        build_datasets(source="hf", hf_name=str(saved), hf_split="validation", text_field="body", seq_len=31,
                       cache_dir=str(hf_home / "c"))
    with pytest.raises(FileNotFoundError, match=r"data.hf_name '\./no_such_folder' is not an existing folder"):
        build_datasets(source="hf", hf_name="./no_such_folder", seq_len=31, cache_dir=str(hf_home / "c"))
    broken = hf_home / "broken"
    broken.mkdir()
    (broken / "a.jsonl").write_text('{"text": "cut short', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"could not load the local folder {broken} .*Error: .*; fix data.hf_name"):
        build_datasets(source="hf", hf_name=str(broken), seq_len=31, cache_dir=str(hf_home / "c"))
