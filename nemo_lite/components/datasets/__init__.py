"""The packed-sequence data pipeline: sources -> tokenizer -> packer -> loader.

``import nemo_lite.components.datasets`` needs torch alone; ``datasets``, ``tokenizers`` and
``transformers`` are imported where they are used. See docs/data.md.

``DataConfig`` is also the schema of a recipe's ``data:`` group; the trainer passes the composed
values through ``resolve_data_config`` (``tokenizer: model``, "a,b" source lists, ``pin_memory``).

The trainer's entry points::

    cfg = DataConfig(source="data/*.jsonl", seq_len=4096, batch_size=2)
    loader = build_dataloader(cfg, split="train", rank=rank, world_size=world_size)
    for batch in loader:  # {"input_ids", "labels", "position_ids"}: CPU int64 [B, S]
        ...
    state = loader.state_dict()  # save with the checkpoint; loader.load_state_dict(state) resumes
    loader.prompt_ids("Hello"), loader.end_id  # what sampling the trained model needs

Importing this package registers the built-in record kinds, ``text``, ``chat``, ``token_ids`` and ``preference``
(``kinds.py``).
"""

from nemo_lite.components.datasets import chat, preference, text, token_ids  # noqa: F401  (registers the record kinds)
from nemo_lite.components.datasets.config import DataConfig, resolve_data_config
from nemo_lite.components.datasets.default_corpus import (
    DEFAULT_EOS_TOKEN,
    cache_dir,
    default_corpus_file,
    default_tokenizer_file,
)
from nemo_lite.components.datasets.documents import Document, DocumentSource
from nemo_lite.components.datasets.kinds import (
    RecordEncoder,
    UnknownRecordKindError,
    build_encoder,
    list_record_kinds,
    record_kind,
    register_record_kind,
    unregister_record_kind,
)
from nemo_lite.components.datasets.loader import PackedDataLoader, build_dataloader
from nemo_lite.components.datasets.packing import (
    IGNORE_INDEX,
    DocumentPacker,
    PackedRow,
    collate_rows,
    pack_documents,
)
from nemo_lite.components.datasets.tokenizer import build_tokenizer, resolve_eos_id

__all__ = [
    "DEFAULT_EOS_TOKEN",
    "IGNORE_INDEX",
    "DataConfig",
    "Document",
    "DocumentPacker",
    "DocumentSource",
    "PackedDataLoader",
    "PackedRow",
    "RecordEncoder",
    "UnknownRecordKindError",
    "build_dataloader",
    "build_encoder",
    "build_tokenizer",
    "cache_dir",
    "collate_rows",
    "default_corpus_file",
    "default_tokenizer_file",
    "list_record_kinds",
    "pack_documents",
    "record_kind",
    "register_record_kind",
    "resolve_data_config",
    "resolve_eos_id",
    "unregister_record_kind",
]
