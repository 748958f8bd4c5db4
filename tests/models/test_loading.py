"""glmtune.load_model / load_tokenizer / save_pretrained on the published checkpoint formats.

Everything goes through the public loader, as a user's code would: the reference folders are published-layout
checkpoints (sharded .bin for ChatGLM-6B, single safetensors for ChatGLM2/3), compared against the published
implementation's golden outputs (see ../shared/chatglm-reference/README.md).
"""

from __future__ import annotations

import json
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import glmtune
from glmtune.models import reading
from glmtune.models.families import detect_family
from glmtune.models.quantization import is_quantizable_weight, quantize_weight
from glmtune.models.reading import CheckpointError, checkpoint_files, read_safetensors
from glmtune.models.saving import GENERIC_CONFIG_KEYS

TOL_LOGITS = 1e-4  # max abs, fp32, real-token positions (the bound; the README says ~1e-5 is typical)
TOL_LOSS = 1e-5

FAMILIES = {"chatglm-6b-tiny": "chatglm", "chatglm2-6b-tiny": "chatglm2", "chatglm3-6b-tiny": "chatglm3"}


@dataclass
class Reference:
    name: str
    folder: Path
    family: str
    golden: dict

    @property
    def batch(self) -> dict[str, torch.Tensor]:
        return self.golden["batch"]

    @property
    def real(self) -> torch.Tensor:
        """[b, L] bool: positions holding real tokens, not left padding."""
        mask = self.batch["attention_mask"]
        if mask.dim() == 2:  # ChatGLM2/3: 1 = keep
            return mask.bool()
        return (
            self.batch["input_ids"] != json.loads((self.folder / "config.json").read_text())["pad_token_id"]
        )

    def logits(self, model: torch.nn.Module, **extra: object) -> torch.Tensor:
        """Batch logits at the golden vocab columns, float32, [b, L, len(vocab_index)]."""
        with torch.no_grad():
            return model(**self.batch, **extra).logits[..., self.golden["vocab_index"]].float()

    def state(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors as stored, read with the standard readers (not glmtune's)."""
        state: dict[str, torch.Tensor] = {}
        for file in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                state.update({k: f.get_tensor(k).clone() for k in f.keys()})  # noqa: SIM118
        for file in sorted(self.folder.glob("pytorch_model*.bin")):
            state.update(torch.load(file, weights_only=True))
        return state


@pytest.fixture(scope="module", params=list(FAMILIES))
def ref(request: pytest.FixtureRequest, reference_dir: Path) -> Reference:
    folder = reference_dir / request.param
    golden = torch.load(folder / "golden.pt", weights_only=True)
    return Reference(request.param, folder, FAMILIES[request.param], golden)


@pytest.fixture(scope="module")
def model(ref: Reference) -> torch.nn.Module:
    return glmtune.load_model(ref.folder, torch_dtype=torch.float32)


def max_diff_real(logits: torch.Tensor, golden: torch.Tensor, ref: Reference) -> float:
    return (logits - golden)[ref.real].abs().max().item()


def rel_rms(logits: torch.Tensor, golden: torch.Tensor, ref: Reference) -> float:
    """||logits - golden|| / ||golden|| over real positions."""
    diff = (logits - golden)[ref.real]
    return (diff.norm() / golden[ref.real].norm()).item()


def copy_checkpoint(ref: Reference, to: Path, *, weights: bool = True) -> Path:
    """config.json, tokenizer files and (symlinked) weights of a reference folder under another name."""
    to.mkdir(parents=True)
    for file in ref.folder.iterdir():
        if file.name == "golden.pt":
            continue
        if file.suffix in (".bin", ".safetensors"):
            if weights:
                (to / file.name).symlink_to(file)
        elif not file.name.endswith(".index.json") or weights:
            shutil.copy(file, to / file.name)
    return to


# ---------------------------------------------------------------------------------------------------------
# Family detection
# ---------------------------------------------------------------------------------------------------------


def test_family_detection(ref: Reference, model: torch.nn.Module) -> None:
    assert detect_family(ref.folder) == ref.family
    assert model.glmtune_family == ref.family
    tokenizer = glmtune.load_tokenizer(ref.folder)
    expected = {
        "chatglm": "ChatGLMTokenizer",
        "chatglm2": "ChatGLM2Tokenizer",
        "chatglm3": "ChatGLM3Tokenizer",
    }
    assert type(tokenizer).__name__ == expected[ref.family]


@pytest.mark.parametrize("declared", ["chatglm2", "chatglm3"])
def test_glmtune_family_in_config_beats_the_folder_name(
    reference_dir: Path, tmp_path: Path, declared: str
) -> None:
    """ChatGLM2 and ChatGLM3 share config schema and network; `glmtune_family` decides, not the folder name."""
    other = "chatglm3" if declared == "chatglm2" else "chatglm2"
    source = Reference(f"{declared}-6b-tiny", reference_dir / f"{declared}-6b-tiny", declared, {})
    folder = copy_checkpoint(source, tmp_path / f"{other}-6b-misnamed")
    config = json.loads((folder / "config.json").read_text())
    assert detect_family(folder) == other  # without the key, the name is all there is
    (folder / "config.json").write_text(json.dumps({**config, "glmtune_family": declared}))
    assert detect_family(folder) == declared
    assert glmtune.load_model(folder).glmtune_family == declared
    assert type(glmtune.load_tokenizer(folder)).__name__ == f"ChatGLM{declared[-1]}Tokenizer"


def test_chatglm3_detected_from_role_tokens_in_tokenizer_files(reference_dir: Path, tmp_path: Path) -> None:
    source = Reference("chatglm3-6b-tiny", reference_dir / "chatglm3-6b-tiny", "chatglm3", {})
    folder = copy_checkpoint(source, tmp_path / "some-model", weights=False)
    assert detect_family(folder) == "chatglm2"
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["added_tokens_decoder"] = {"64795": {"content": "<|user|>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert detect_family(folder) == "chatglm3"


# ---------------------------------------------------------------------------------------------------------
# Golden outputs of the published implementation
# ---------------------------------------------------------------------------------------------------------


def test_logits_match_golden(ref: Reference, model: torch.nn.Module) -> None:
    diff = max_diff_real(ref.logits(model), ref.golden["logits"], ref)
    print(f"{ref.name}: batch logits max diff {diff:.3g}")
    assert diff <= TOL_LOGITS


def test_train_loss_and_logits_match_golden(ref: Reference, model: torch.nn.Module) -> None:
    train = ref.golden["train"]
    with torch.no_grad():
        out = model(input_ids=train["input_ids"], labels=train["labels"])
    loss_diff = abs(out.loss.item() - train["loss"].item())
    logits_diff = (out.logits[..., ref.golden["vocab_index"]] - train["logits"]).abs().max().item()
    print(f"{ref.name}: loss diff {loss_diff:.3g}, train logits max diff {logits_diff:.3g}")
    assert loss_diff <= TOL_LOSS
    assert logits_diff <= TOL_LOGITS


def test_greedy_generation_matches_golden(ref: Reference, model: torch.nn.Module) -> None:
    golden = ref.golden["generate"]
    out = model.generate(
        **ref.batch,
        max_new_tokens=golden["output_ids"].shape[1] - ref.batch["input_ids"].shape[1],
        do_sample=False,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert torch.equal(out.sequences, golden["output_ids"])
    steps = golden["step_logits"]
    step_logits = torch.stack([s[:, ref.golden["vocab_index"]] for s in out.logits[: len(steps)]])
    diff = (step_logits - steps).abs().max().item()
    print(f"{ref.name}: first {len(steps)} step logits max diff {diff:.3g}")
    assert diff <= TOL_LOGITS


@pytest.mark.parametrize("variant", ["plain", "projection"])
@pytest.mark.parametrize("form", ["file", "folder"])
def test_ptuning_checkpoint_matches_golden(ref: Reference, tmp_path: Path, variant: str, form: str) -> None:
    """The prefix saved as the published P-Tuning scripts save it: only transformer.prefix_encoder.*, in a
    file, or a folder's pytorch_model.bin."""
    case = ref.golden["ptv2"][variant]
    assert all(k.startswith("transformer.prefix_encoder.") for k in case["prefix_state"])
    if form == "file":
        checkpoint = tmp_path / "prefix.bin"
    else:
        checkpoint = tmp_path / "checkpoint-1000"
        checkpoint.mkdir()
    torch.save(case["prefix_state"], checkpoint if form == "file" else checkpoint / "pytorch_model.bin")
    model = glmtune.load_model(
        ref.folder,
        torch_dtype="float32",
        pre_seq_len=case["config"]["pre_seq_len"],
        prefix_projection=case["config"]["prefix_projection"],
        ptuning_checkpoint=checkpoint,
    )
    diff = max_diff_real(ref.logits(model), case["logits"], ref)
    print(f"{ref.name}: P-Tuning v2 {variant} logits max diff {diff:.3g}")
    assert diff <= TOL_LOGITS
    encoder = model.transformer.prefix_encoder
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    if form == "folder":  # a whole P-Tuning v2 model, saved and loaded back, keeps its prefix
        model.save_pretrained(tmp_path / "saved")
        assert torch.equal(ref.logits(glmtune.load_model(tmp_path / "saved")), ref.logits(model))


def test_ptuning_checkpoint_of_the_other_variant_is_refused(ref: Reference, tmp_path: Path) -> None:
    torch.save(ref.golden["ptv2"]["projection"]["prefix_state"], tmp_path / "prefix.bin")
    with pytest.raises(CheckpointError, match="prefix_projection"):
        glmtune.load_model(
            ref.folder, pre_seq_len=4, prefix_projection=False, ptuning_checkpoint=tmp_path / "prefix.bin"
        )


def test_fresh_prefix_encoder_is_initialised(ref: Reference) -> None:
    model = glmtune.load_model(ref.folder, torch_dtype="float16", pre_seq_len=4)
    weight = model.transformer.prefix_encoder.embedding.weight
    assert weight.dtype == torch.float32 and weight.device.type == "cpu"
    assert 0.5 < weight.std().item() < 2  # torch's N(0, 1) embedding init, as published


# ---------------------------------------------------------------------------------------------------------
# dtypes and file formats
# ---------------------------------------------------------------------------------------------------------

# Measured against the fp32 golden logits (relative RMS over real positions): fp16 <= 7.1e-4, bf16 <= 8.5e-3.
HALF_BOUNDS = {"float16": 0.01, "bfloat16": 0.05}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_loads_and_runs(ref: Reference, dtype: str) -> None:
    model = glmtune.load_model(ref.folder, torch_dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    logits = ref.logits(model)
    assert torch.isfinite(logits[ref.real]).all()
    error = rel_rms(logits, ref.golden["logits"], ref)
    print(f"{ref.name}: {dtype} logits relative RMS error vs fp32 golden {error:.3g}")
    assert error < HALF_BOUNDS[dtype]
    out = model.generate(**ref.batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ref.batch["input_ids"].shape[1] + 3


def test_checkpoint_dtype_is_kept_by_default(ref: Reference) -> None:
    """torch_dtype None / "auto" keeps config.json's torch_dtype (float16 for the references)."""
    for dtype in (None, "auto"):
        model = glmtune.load_model(ref.folder, torch_dtype=dtype)
        assert next(model.parameters()).dtype == torch.float16


def test_reference_formats(ref: Reference) -> None:
    """ChatGLM-6B is published as sharded .bin with an index, ChatGLM2/3 as one safetensors file."""
    files = [f.name for f in checkpoint_files(ref.folder)]
    if ref.family == "chatglm":
        assert files == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    else:
        assert files == ["model.safetensors"]


def split_into_shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    names = list(state)
    size = -(-len(names) // n)
    return [{k: state[k] for k in names[i : i + size]} for i in range(0, len(names), size)]


@pytest.mark.parametrize("layout", ["sharded_safetensors", "single_bin", "sharded_bin_no_index"])
def test_other_weight_layouts_load_identically(
    ref: Reference, model: torch.nn.Module, tmp_path: Path, layout: str
) -> None:
    folder = copy_checkpoint(ref, tmp_path / "converted", weights=False)
    state = ref.state()
    if layout == "sharded_safetensors":
        shards = split_into_shards(state, 3)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif layout == "single_bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        for i, shard in enumerate(split_into_shards(state, 2), 1):
            torch.save(shard, folder / f"pytorch_model-{i:05d}-of-00002.bin")
    loaded = glmtune.load_model(folder, torch_dtype="float32")
    assert torch.equal(ref.logits(loaded), ref.logits(model))


def test_safetensors_reader_matches_safetensors(
    ref: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glmtune reads safetensors without memory-mapping them; the tensors must be the library's."""
    state = {
        "f16": torch.randn(3, 5).half(),
        "bf16": torch.randn(7).bfloat16(),
        "f32": torch.randn(2, 2, 2),
        "f16_odd": torch.randn(13).half(),
        "i8": torch.randint(-128, 127, (4, 6), dtype=torch.int8),
        "i64": torch.arange(5),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False]),
    }
    save_file(state, str(tmp_path / "t.safetensors"))
    read = dict(read_safetensors(tmp_path / "t.safetensors"))
    assert set(read) == set(state)
    for name, tensor in state.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    # Converted while reading, through a staging buffer smaller than a tensor (several chunks each).
    monkeypatch.setattr(reading, "STAGING_BYTES", 6)
    as_float = dict(
        read_safetensors(
            tmp_path / "t.safetensors", lambda name, d: torch.float32 if d.is_floating_point else d
        )
    )
    for name, tensor in state.items():
        expected = tensor.float() if tensor.is_floating_point() else tensor
        assert as_float[name].dtype == expected.dtype and torch.equal(as_float[name], expected), name
    if ref.family != "chatglm":
        with safe_open(str(ref.folder / "model.safetensors"), framework="pt") as f:
            for name, tensor in read_safetensors(ref.folder / "model.safetensors"):
                assert torch.equal(tensor, f.get_tensor(name)), name


def test_truncated_safetensors_is_reported(tmp_path: Path) -> None:
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="ends 100 bytes early"):
        dict(read_safetensors(tmp_path / "t.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints that do not fit
# ---------------------------------------------------------------------------------------------------------


def test_shape_mismatch_names_the_tensor(ref: Reference, tmp_path: Path) -> None:
    folder = copy_checkpoint(ref, tmp_path / "wrong")
    config = json.loads((folder / "config.json").read_text())
    config["inner_hidden_size" if ref.family == "chatglm" else "ffn_hidden_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor '.*' has shape"):
        glmtune.load_model(folder)


def test_missing_tensor_is_reported(ref: Reference, tmp_path: Path) -> None:
    folder = copy_checkpoint(ref, tmp_path / "partial", weights=False)
    state = ref.state()
    dropped = next(k for k in state if k.endswith("final_layernorm.weight"))
    del state[dropped]
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        glmtune.load_model(folder)


def test_bad_arguments_are_refused(ref: Reference) -> None:
    with pytest.raises(ValueError, match="torch_dtype"):
        glmtune.load_model(ref.folder, torch_dtype="float64")
    with pytest.raises(ValueError, match="family"):
        glmtune.load_model(ref.folder, family="gpt2")
    wrong = "chatglm2" if ref.family == "chatglm" else "chatglm"
    with pytest.raises(ValueError, match="config"):
        glmtune.load_model(ref.folder, family=wrong)
    with pytest.raises(ValueError, match="pre_seq_len"):
        glmtune.load_model(ref.folder, ptuning_checkpoint=ref.folder)


# ---------------------------------------------------------------------------------------------------------
# save_pretrained
# ---------------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(ref: Reference, model: torch.nn.Module, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    published = json.loads((ref.folder / "config.json").read_text())
    for key, value in published.items():
        if key != "torch_dtype":
            assert saved[key] == value, key
    assert saved["torch_dtype"] == "float32"
    assert saved["glmtune_family"] == ref.family
    assert not set(saved) & (set(GENERIC_CONFIG_KEYS) - {"glmtune_family", "torch_dtype"})
    assert detect_family(tmp_path / "saved") == ref.family

    # Published parameter names, every tensor written (ChatGLM-6B: lm_head apart from word_embeddings).
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        written = set(f.keys())
        assert written == set(ref.state())
        if ref.family == "chatglm":
            assert torch.equal(
                f.get_tensor("lm_head.weight"), f.get_tensor("transformer.word_embeddings.weight")
            )

    loaded = glmtune.load_model(tmp_path / "saved")
    assert torch.equal(ref.logits(loaded), ref.logits(model))
    assert loaded.glmtune_family == ref.family


def test_tied_head_as_published(ref: Reference, model: torch.nn.Module) -> None:
    """ChatGLM-6B ties lm_head to word_embeddings (the published checkpoint stores both, equal); ChatGLM2/3 do not."""
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head is embeddings) == (ref.family == "chatglm")


def test_sharded_save_and_save_over_the_source_folder(ref: Reference, tmp_path: Path) -> None:
    """Loaded weights do not point into the files: saving over the folder they came from is safe."""
    folder = tmp_path / "model"
    folder.mkdir()
    for file in ref.folder.iterdir():
        shutil.copy(file, folder / file.name)
    model = glmtune.load_model(folder, torch_dtype="float32")
    expected = ref.logits(model)
    model.save_pretrained(folder, max_shard_size="10MB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert not (folder / "model.safetensors").exists()  # replaced, not left to shadow the shards
    assert torch.equal(ref.logits(glmtune.load_model(folder)), expected)
    model.save_pretrained(folder)  # back to one file: the shards and index go
    assert [p.name for p in checkpoint_files(folder)] == ["model.safetensors"]
    assert not list(folder.glob("model-*.safetensors"))
    assert torch.equal(ref.logits(glmtune.load_model(folder)), expected)


def test_save_pretrained_without_loader_attributes(ref: Reference, tmp_path: Path) -> None:
    """A model built directly (no glmtune_family attribute) saves by its class, not via transformers."""
    model = glmtune.load_model(ref.folder, torch_dtype="float32")
    config = type(model.config)(**{k: v for k, v in model.config.to_dict().items() if k != "glmtune_family"})
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    assert not hasattr(fresh, "glmtune_family") and not hasattr(fresh.config, "glmtune_family")
    fresh.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["glmtune_family"] == ("chatglm" if ref.family == "chatglm" else "chatglm2")
    assert torch.equal(ref.logits(glmtune.load_model(tmp_path)), ref.logits(model))
    with pytest.raises(TypeError, match="push_to_hub"):
        fresh.save_pretrained(tmp_path, push_to_hub=True)


# ---------------------------------------------------------------------------------------------------------
# int8 / int4
# ---------------------------------------------------------------------------------------------------------

# Relative RMS error of the batch logits (real positions) against the fp32 golden logits, measured on the
# three references: int8 <= 0.014, int4 <= 0.22 (ChatGLM-6B: 0.0003 / 0.006; its sqrt(2 * 28)-scaled residual
# of normalized inputs dwarfs the block outputs). The references' weights are random N(0, 0.05) rows of 64..368
# values, for which int4's 7 levels per sign give ~10% error per matmul (test_quantization.py); a real checkpoint
# does far better. A wrong format (nibble order, scale) gives errors of order 1.
QUANT_BOUNDS = {8: 0.05, 4: 0.4}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load(ref: Reference, tmp_path: Path, bits: int) -> None:
    model = glmtune.load_model(ref.folder, torch_dtype="float32", quantization_bit=bits)
    assert model.config.quantization_bit == bits

    # Packed weights = the published formula applied to the checkpoint tensor in its own dtype (fp16).
    state = ref.state()
    quantized = [k for k in state if is_quantizable_weight(k)]
    assert len(quantized) == 4 * model.config.num_layers
    for name in quantized:
        expected_q, expected_scale = quantize_weight(state[name], bits)
        layer = model.get_submodule(name.removesuffix(".weight"))
        assert torch.equal(layer.weight, expected_q), name
        assert torch.equal(layer.weight_scale, expected_scale.float()), name

    logits = ref.logits(model)
    error = rel_rms(logits, ref.golden["logits"], ref)
    print(f"{ref.name}: int{bits} logits relative RMS error vs fp32 {error:.3g}")
    assert error < QUANT_BOUNDS[bits]

    # Saved after quantization: packed weights and quantization_bit in config.json; loads as is.
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_bit"] == bits
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor(quantized[0]).dtype == torch.int8
        assert f"{quantized[0]}_scale" in set(f.keys())
    reloaded = glmtune.load_model(tmp_path / "q", torch_dtype="float32")
    assert torch.equal(ref.logits(reloaded), logits)
    assert torch.equal(
        reloaded.get_submodule(quantized[0].removesuffix(".weight")).weight,
        model.get_submodule(quantized[0].removesuffix(".weight")).weight,
    )
    with pytest.raises(ValueError, match=f"holds {bits}-bit weights"):
        glmtune.load_model(tmp_path / "q", quantization_bit=12 - bits)


def test_packed_checkpoint_without_quantization_bit_is_reported(ref: Reference, tmp_path: Path) -> None:
    glmtune.load_model(ref.folder, quantization_bit=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_bit": 0}))
    with pytest.raises(CheckpointError, match="no quantization_bit"):
        glmtune.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Other models go to transformers
# ---------------------------------------------------------------------------------------------------------

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_vocab(kind: str) -> dict[str, int]:
    """Specials, the model's space symbol and a-z: every test text is spelled letter by letter."""
    space = "\u2581" if kind == "llama" else "\u0120"  # SentencePiece-style vs byte-level BPE
    return {token: i for i, token in enumerate([*SPECIALS, space, *string.ascii_lowercase])}


def save_tiny_tokenizer(folder: Path, kind: str) -> None:
    """The model's own tokenizer class (as its checkpoints ship it) over a letters-only vocabulary."""
    from transformers import LlamaTokenizer, Qwen2Tokenizer

    cls = LlamaTokenizer if kind == "llama" else Qwen2Tokenizer
    tokenizer = cls(
        vocab=tiny_vocab(kind),
        merges=[],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(folder)


def tiny_hf_model(kind: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(
        vocab_size=len(tiny_vocab(kind)),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes))
    return Qwen2ForCausalLM(Qwen2Config(**sizes))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_other_models_load_through_transformers(tmp_path: Path, kind: str) -> None:
    original = tiny_hf_model(kind).eval()
    original.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, kind)
    assert detect_family(tmp_path) == "hf"

    tokenizer = glmtune.load_tokenizer(tmp_path)
    model = glmtune.load_model(tmp_path, torch_dtype="float32")
    assert type(model) is type(original) and model.glmtune_family == "hf"

    tokenizer.padding_side = "left"
    batch = tokenizer(["the quick brown fox", "a cat sat"], return_tensors="pt", padding=True)
    assert batch["input_ids"][1, 0].item() == tokenizer.pad_token_id
    assert tokenizer.decode(batch["input_ids"][1], skip_special_tokens=True) == "a cat sat"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, original(**batch).logits)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    assert torch.equal(out, original.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0))

    half = glmtune.load_model(tmp_path, torch_dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="ChatGLM checkpoints only"):
        glmtune.load_model(tmp_path, quantization_bit=8)


# ---------------------------------------------------------------------------------------------------------
# Models that exist only as code shipped in their folder (Baichuan, ...)
# ---------------------------------------------------------------------------------------------------------

REMOTE_CONFIG = """
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
"""
REMOTE_MODELING = """
from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


def save_remote_code_model(folder: Path) -> torch.nn.Module:
    """A folder whose architecture transformers knows only from the code beside its weights (as Baichuan ships)."""
    llama = tiny_hf_model("llama").eval()
    llama.save_pretrained(folder)
    save_tiny_tokenizer(folder, "llama")
    (folder / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny_remote.py").write_text(REMOTE_MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tiny_remote",
        architectures=["TinyRemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return llama


def test_remote_code_runs_only_when_the_config_allows_it(tmp_path: Path, caplog) -> None:
    from glmtune.config import ConfigError

    llama = save_remote_code_model(tmp_path)
    with pytest.raises(ConfigError, match="model.trust_remote_code: true"):
        glmtune.load_model(tmp_path)
    with caplog.at_level("WARNING"):
        model = glmtune.load_model(tmp_path, trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteForCausalLM"
    assert "trust_remote_code is on" in caplog.text
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, llama(input_ids=ids).logits)
