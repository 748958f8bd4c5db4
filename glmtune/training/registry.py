"""The tuning methods, one entry each: what a method wraps, what it trains, what its artifact holds, and how
that artifact loads back.

Training (`apply_method`, `save_artifact`), inference (`glmtune.inference.artifacts`), merging and serving
ask this table; none keeps its own list of method names. Every artifact folder also holds HPARAMS_FILE, the
resolved task config of its run, from which inference reads the method, the base model and the template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from glmtune.config import ConfigError

HPARAMS_FILE = "hyperparameters.yaml"

# "model": a complete model folder; "prefix": the published P-Tuning v2 file (transformer.prefix_encoder.*
# in pytorch_model.bin), loaded onto its base model; "adapter": a PEFT adapter folder, loaded onto its base.
ArtifactKind = Literal["model", "prefix", "adapter"]
# Which loader reads the artifact back: "finetuned" (infer_finetuning.py) or "lora" (infer_lora_finetuning.py).
LoaderKind = Literal["finetuned", "lora"]


@dataclass(frozen=True)
class TuningMethod:
    name: str
    wraps: Literal["nothing", "prefix encoder", "peft"]  # what is put around the unchanged backbone
    trains: str  # which weights learn, in words (for messages)
    artifact: ArtifactKind

    @property
    def uses_peft(self) -> bool:
        return self.wraps == "peft"

    @property
    def trains_base_weights(self) -> bool:
        """Whether the backbone's own weights learn (so they must be float, and the artifact is a model)."""
        return self.artifact == "model"

    @property
    def mergeable(self) -> bool:
        """Whether the artifact folds into its base weights as a complete model (infer_lora_finetuning.py --merge)."""
        return self.artifact == "adapter"

    @property
    def loader(self) -> LoaderKind:
        return "lora" if self.artifact == "adapter" else "finetuned"

    @property
    def script(self) -> str:
        """The inference script that loads this method's artifact."""
        return "infer_lora_finetuning.py" if self.loader == "lora" else "infer_finetuning.py"


METHODS: dict[str, TuningMethod] = {
    m.name: m
    for m in (
        TuningMethod("full", "nothing", "every floating-point weight", "model"),
        TuningMethod("freeze", "nothing", "the last blocks (and with freeze.train_head the head)", "model"),
        TuningMethod("ptv2", "prefix encoder", "the prefix encoder the model was loaded with", "prefix"),
        TuningMethod("lora", "peft", "low-rank updates of the target linears", "adapter"),
        TuningMethod("adalora", "peft", "low-rank updates under a shrinking rank budget", "adapter"),
        TuningMethod("ia3", "peft", "scaling vectors of the target linears' activations", "adapter"),
    )
}
PEFT_METHODS = tuple(name for name, m in METHODS.items() if m.uses_peft)
# Methods whose trained weights are small, new ones beside a frozen backbone.
ADAPTER_METHODS = tuple(name for name, m in METHODS.items() if not m.trains_base_weights)


def tuning_method(name: object, source: str | Path) -> TuningMethod:
    """The entry for `name` as a run config gave it; ConfigError naming `source` (where it was read) if none."""
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{source}: method {name!r} is not a glmtune tuning method ({', '.join(METHODS)})")
    return METHODS[name]
