"""Data pipeline: read data files, build tokenized records (cached, atomic), and serve them to training."""

from glmtune.data.build import build_records, build_records_cli
from glmtune.data.dataset import Collator, RecordDataset, block_causal_mask, collate_fn, cu_seqlens
from glmtune.data.fitting import fit_length
from glmtune.data.packing import Packer, pack_record
from glmtune.data.readers import FORMATS, DataError, Dialogue, detect_format, iter_dialogues, read_dialogues
from glmtune.data.records import RecordReader, RecordWriter, open_reader, open_writer
from glmtune.data.report import BuildReport
from glmtune.data.samples import IGNORE_INDEX, Template, build_samples
from glmtune.data.settings import BuildSettings, LengthSettings, SettingsError

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "BuildReport",
    "BuildSettings",
    "Collator",
    "DataError",
    "Dialogue",
    "LengthSettings",
    "Packer",
    "RecordDataset",
    "RecordReader",
    "RecordWriter",
    "SettingsError",
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
