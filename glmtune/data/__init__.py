"""Data pipeline: read data files, build tokenized records (cached, atomic), and serve them to training."""

from glmtune.data.build import (
    BuildReport,
    LengthSettings,
    Packer,
    Template,
    build_records,
    build_records_cli,
    build_samples,
    fit_length,
    pack_record,
)
from glmtune.data.dataset import Collator, RecordDataset, block_causal_mask, collate_fn, cu_seqlens
from glmtune.data.readers import FORMATS, DataError, Dialogue, detect_format, iter_dialogues, read_dialogues
from glmtune.data.records import RecordReader, RecordWriter, open_reader, open_writer

__all__ = [
    "FORMATS",
    "BuildReport",
    "Collator",
    "DataError",
    "Dialogue",
    "LengthSettings",
    "Packer",
    "RecordDataset",
    "RecordReader",
    "RecordWriter",
    "Template",
    "block_causal_mask",
    "build_records",
    "build_records_cli",
    "build_samples",
    "collate_fn",
    "cu_seqlens",
    "detect_format",
    "fit_length",
    "iter_dialogues",
    "open_reader",
    "open_writer",
    "pack_record",
    "read_dialogues",
]
