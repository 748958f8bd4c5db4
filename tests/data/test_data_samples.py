"""Dialogue -> samples, length strategies and packing (no files involved)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glmtune.data.dataset import block_causal_mask, cu_seqlens
from glmtune.data.fitting import fit_length
from glmtune.data.packing import Packer, pack_record
from glmtune.data.readers import Dialogue
from glmtune.data.samples import answer_header_length, build_samples, supervised_spans
from glmtune.data.settings import LengthSettings
from tests.data.test_data_fakes import (
    EOS,
    IGNORE,
    CharTemplate,
    SystemCharTemplate,
    TurnOnlyTemplate,
    decode,
    encode,
)

DIALOGUE = Dialogue(turns=[("q1", "a1"), ("q2", "a2"), ("q3", "a3")], source="f:1")


def supervised(ids, labels) -> str:
    return decode(i for i, label in zip(ids, labels) if label != IGNORE)


# ------------------------------------------------------------------------------------------- multi-turn


def test_per_turn_one_sample_per_turn_with_history():
    samples = build_samples(DIALOGUE, CharTemplate(), "per_turn")
    assert [decode(ids) for ids, _ in samples] == [
        "<g><s>Q:q1\nA:a1</s>",
        "<g><s>Q:q1\nA:a1\nQ:q2\nA:a2</s>",
        "<g><s>Q:q1\nA:a1\nQ:q2\nA:a2\nQ:q3\nA:a3</s>",
    ]
    assert [supervised(*s) for s in samples] == ["a1</s>", "a2</s>", "a3</s>"]


def test_dialogue_mode_one_sample_supervising_every_answer():
    [(ids, labels)] = build_samples(DIALOGUE, CharTemplate(), "dialogue")
    assert supervised(ids, labels) == "a1</s>a2</s>a3</s>"
    with pytest.raises(TypeError, match="no build_dialogue_sample"):
        build_samples(DIALOGUE, TurnOnlyTemplate(), "dialogue")


def test_system_prompt_passed_or_prepended():
    d = Dialogue(turns=[("q", "a")], system="sys", source="f:1")
    [(ids, _)] = build_samples(d, CharTemplate())
    assert decode(ids) == "<g><s>Q:sys\nq\nA:a</s>"  # no system= parameter: before the first query
    [(ids, _)] = build_samples(d, SystemCharTemplate())
    assert decode(ids) == "<g><s>S:sys\nQ:q\nA:a</s>"


# ---------------------------------------------------------------------------------------------- lengths


def sample(prompt: str, answer: str):
    return CharTemplate().build_train_sample(prompt, answer)


def test_short_sample_untouched():
    ids, labels = sample("q", "a")
    assert fit_length(ids, labels, LengthSettings(max_seq_length=64)) == ([(ids, labels)], "ok")


def test_no_supervised_token_dropped():
    assert fit_length([1, 2, 5], [IGNORE] * 3, LengthSettings(max_seq_length=64)) == ([], "dropped")


def test_truncate_cuts_prompt_head_keeps_protected_prefix_and_answer():
    ids, labels = sample("0123456789" * 3, "answer")  # prompt 2 + 35, answer 7
    s = LengthSettings(max_seq_length=30, protected_head=2)
    [(out, out_labels)], outcome = fit_length(ids, labels, s)
    assert outcome == "truncated" and len(out) == 30
    assert decode(out) == "<g><s>" + ("0123456789" * 3 + "\nA:")[-21:] + "answer</s>"
    assert supervised(out, out_labels) == "answer</s>"


def test_truncate_prompt_tail_side():
    ids, labels = sample("0123456789" * 3, "answer")
    s = LengthSettings(max_seq_length=30, protected_head=2, truncate_side="prompt_tail")
    [(out, out_labels)], _ = fit_length(ids, labels, s)
    assert decode(out) == "<g><s>" + ("Q:" + "0123456789" * 3)[:21] + "answer</s>"
    assert supervised(out, out_labels) == "answer</s>"


@pytest.mark.parametrize("side", ["prompt_head", "prompt_tail"])
def test_truncate_keeps_the_protected_tail_next_to_the_answer(side):
    """The last `protected_tail` prompt tokens (ChatGLM3's `<|assistant|>`, here "\nA:") survive on both sides."""
    ids, labels = sample("0123456789" * 3, "answer")  # <g><s>Q:0123...789\nA:answer</s>
    s = LengthSettings(max_seq_length=30, protected_head=2, protected_tail=3, truncate_side=side)
    [(out, out_labels)], outcome = fit_length(ids, labels, s)
    assert outcome == "truncated" and len(out) == 30
    kept = 30 - 2 - 3 - 7  # the prompt tokens between head and tail; the answer ("answer" + </s>) is whole
    body = ("Q:" + "0123456789" * 3)[-kept:] if side == "prompt_head" else ("Q:" + "0123456789" * 3)[:kept]
    assert decode(out) == "<g><s>" + body + "\nA:answer</s>"
    assert supervised(out, out_labels) == "answer</s>"


def test_answer_header_is_what_every_prompt_ends_with():
    assert answer_header_length(CharTemplate()) == len("\nA:")
    assert answer_header_length(SystemCharTemplate()) == len("\nA:")


def test_truncate_ensure_answer_min_length_keeps_end_token():
    ids, labels = sample("p" * 40, "a" * 40)  # prompt 2 + 45, answer 41
    s = LengthSettings(max_seq_length=30, protected_head=2, ensure_answer_min_length=10)
    [(out, out_labels)], outcome = fit_length(ids, labels, s)
    assert outcome == "truncated" and len(out) == 30
    assert supervised(out, out_labels) == "a" * 9 + "</s>"  # 10 answer tokens, the end token kept
    assert out[:2] == [1, 2]
    # A short prompt leaves the rest to the answer.
    ids, labels = sample("p", "a" * 40)
    [(out, out_labels)], _ = fit_length(ids, labels, s)
    assert len(out) == 30 and decode(out).startswith("<g><s>Q:p\nA:") and out[-1] == EOS


def test_truncate_default_splits_the_window_between_prompt_and_answer():
    ids, labels = sample("p" * 100, "a" * 100)
    [(out, out_labels)], _ = fit_length(ids, labels, LengthSettings(max_seq_length=42, protected_head=2))
    assert out[:2] == [1, 2] and len(out) == 42
    assert supervised(out, out_labels) == "a" * 19 + "</s>"  # half of the 40 unprotected tokens
    assert decode(out[2:22]) == "p" * 17 + "\nA:"


def test_max_target_length_caps_every_answer():
    ids, labels = CharTemplate().build_dialogue_sample([("q", "a" * 10), ("q", "b" * 3)])
    [(out, out_labels)], outcome = fit_length(
        ids, labels, LengthSettings(max_seq_length=64, max_target_length=5)
    )
    assert outcome == "truncated"
    assert supervised(out, out_labels) == "aaaa</s>bbb</s>"


def test_truncate_dialogue_sample_drops_oldest_context():
    ids, labels = CharTemplate().build_dialogue_sample([("q" * 10, "a" * 10), ("r" * 10, "b" * 10)])
    [(out, out_labels)], _ = fit_length(ids, labels, LengthSettings(max_seq_length=24, protected_head=2))
    assert decode(out) == "<g><s>" + "r" * 8 + "\nA:" + "b" * 10 + "</s>"  # 11 answer + 11 prompt tokens
    [(out, out_labels)], _ = fit_length(ids, labels, LengthSettings(max_seq_length=34, protected_head=2))
    assert decode(out) == "<g><s>aaaa</s>\nQ:" + "r" * 10 + "\nA:" + "b" * 10 + "</s>"
    assert supervised(out, out_labels) == "aaaa</s>" + "b" * 10 + "</s>"  # the earlier answer's kept tail too


@pytest.mark.parametrize("stride", [None, 5, 10, 22])
def test_slide_windows_cover_every_supervised_token_once(stride):
    ids, labels = CharTemplate().build_dialogue_sample([("q" * 12, "a" * 20), ("r" * 15, "b" * 25)])
    s = LengthSettings(max_seq_length=24, strategy="slide", stride=stride, protected_head=2)
    windows, outcome = fit_length(ids, labels, s)
    assert outcome == "split" and len(windows) > 1
    for w_ids, w_labels in windows:
        assert len(w_ids) <= 24 and w_ids[:2] == [1, 2]
        assert any(label != IGNORE for label in w_labels)
    # Stitch the supervised tokens back together: each original target exactly once, in order.
    assert "".join(supervised(*w) for w in windows) == supervised(ids, labels)


def test_slide_drops_windows_without_targets():
    ids, labels = sample("p" * 60, "ans")  # a long prompt: the first windows supervise nothing
    windows, outcome = fit_length(ids, labels, LengthSettings(max_seq_length=20, strategy="slide", stride=18))
    assert outcome == "split"
    assert len(windows) == 1 and supervised(*windows[0]) == "ans</s>"


def test_drop_strategy():
    ids, labels = sample("p" * 60, "ans")
    assert fit_length(ids, labels, LengthSettings(max_seq_length=20, strategy="drop")) == ([], "dropped")


def test_length_settings_validate():
    with pytest.raises(ValueError, match="strategy.*stride"):
        LengthSettings(max_seq_length=10, strategy="cut", stride=20)
    with pytest.raises(ValueError, match="no room"):
        LengthSettings(max_seq_length=2, protected_head=2)


def test_supervised_spans():
    assert supervised_spans([IGNORE, 5, 6, IGNORE, 7]) == [(1, 3), (4, 5)]


# ---------------------------------------------------------------------------------------------- packing


def test_packer_fills_sequences_and_restarts_positions():
    packer = Packer(max_seq_length=10)
    records = []
    for n in [6, 3, 5, 4, 1, 7]:
        records += packer.add(list(range(10, 10 + n)), [IGNORE] + list(range(11, 10 + n)))
    records += packer.flush()
    assert sum(len(r["input_ids"]) for r in records) == 26
    assert all(len(r["input_ids"]) <= 10 for r in records)
    assert packer.num_samples == 6
    first = records[0]  # 6 + 3 + 1 (first fit)
    assert first["seq_ids"].tolist() == [1] * 6 + [2] * 3 + [3]
    assert first["position_ids"].tolist() == list(range(6)) + list(range(3)) + [0]
    assert first["labels"][[0, 6, 9]].tolist() == [IGNORE] * 3  # no prediction across samples


def test_pack_record_masks_the_first_label_of_every_sample():
    """A sample's first token would be predicted from the previous sample's last token: no loss there, even
    where the sample itself supervises its first token; every other label is kept as it was."""
    samples = [
        ([10, 11, 12], [10, 11, 12]),
        ([20, 21], [20, 21]),
        ([30, 31, 32, 33], [IGNORE, 31, IGNORE, 33]),
    ]
    record = pack_record(samples)
    assert record["labels"].tolist() == [IGNORE, 11, 12, IGNORE, 21, IGNORE, 31, IGNORE, 33]
    assert record["input_ids"].tolist() == [10, 11, 12, 20, 21, 30, 31, 32, 33]
    packer = Packer(max_seq_length=16)
    for ids, labels in samples:
        assert packer.add(ids, labels) == []
    [flushed] = packer.flush()
    assert flushed["labels"].tolist() == record["labels"].tolist()


def test_packer_bounded_open_sequences():
    packer = Packer(max_seq_length=10, max_open=2)
    closed = [packer.add([5] * 9, [5] * 9) for _ in range(3)]
    assert [len(c) for c in closed] == [0, 0, 1]


def test_block_causal_mask_never_crosses_samples():
    seq_ids = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 0]])
    mask = block_causal_mask(seq_ids)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(8):
            for j in range(8):
                same = seq_ids[b, i] == seq_ids[b, j] != 0
                assert mask[b, 0, i, j] == ((same and j <= i) or i == j)
    additive = block_causal_mask(seq_ids, dtype=torch.float32)
    assert torch.equal(additive == 0, mask)


def test_packed_attention_equals_separate_attention():
    torch.manual_seed(0)
    lengths = [5, 3, 4]
    record = pack_record([(list(range(n)), list(range(n))) for n in lengths])
    seq_ids = torch.from_numpy(record["seq_ids"].astype(np.int64))[None]
    q, k, v = (torch.randn(1, 2, sum(lengths), 8) for _ in range(3))
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(seq_ids))
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = F.scaled_dot_product_attention(q[:, :, part], k[:, :, part], v[:, :, part], is_causal=True)
        torch.testing.assert_close(packed[:, :, part], alone)
        start += n
    cu, longest = cu_seqlens(seq_ids)
    assert cu.tolist() == [0, 5, 8, 12] and longest == 5


def test_mask_has_no_empty_rows_for_padding():
    seq_ids = torch.tensor([[1, 1, 0, 0]])
    q = k = v = torch.randn(1, 1, 4, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(seq_ids))
    assert torch.isfinite(out).all()


def test_answer_ids_roundtrip():
    assert decode(encode("ab") + [EOS]) == "ab</s>"
