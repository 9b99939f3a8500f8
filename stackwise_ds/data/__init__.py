"""Data for StackWise-DS: tokenizers (byte, trained BPE, local Hugging Face), text sources, packed fixed-length windows,
seeded train/val split, on-disk cache and a deterministic, resumable batch stream.

Typical use by the trainer::

    bundle = build_datasets(source="stdlib", seq_len=256, seed=0, cache_dir=...)
    check_enough_data(bundle.train, global_batch_size)
    stream = TrainBatchStream(bundle.train, global_batch_size=G, micro_batch_size=m,
                              dp_rank=r, dp_world_size=D, seed=0, consumed_samples=resumed)
    engine.train_batch(data_iter=stream)
"""

from .build import DataBundle, build_datasets
from .cache import default_cache_dir
from .corpus import list_stdlib_files, list_text_files
from .packing import IGNORE_INDEX, PackedDataset, split_windows
from .stream import TrainBatchStream, check_enough_data, padded_val_batch, val_batches
from .tokenizer import (
                        TOKENIZER_FILE,
                        ByteTokenizer,
                        HFTokenizer,
                        Tokenizer,
                        TokenizerError,
                        load_tokenizer_json,
                        make_tokenizer,
)

__all__ = [
    "IGNORE_INDEX", "TOKENIZER_FILE",
    "ByteTokenizer", "DataBundle", "HFTokenizer", "Tokenizer", "TokenizerError",
    "load_tokenizer_json", "make_tokenizer", "PackedDataset", "TrainBatchStream",
    "build_datasets", "check_enough_data", "default_cache_dir",
    "list_stdlib_files", "list_text_files", "padded_val_batch", "split_windows", "val_batches",
]
