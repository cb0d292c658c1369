"""Incremental detokenization (runtime/detokenize.py) against decoding the whole output each
step, as the engine did: the same text at every step, for byte-level BPE (characters split across
tokens), SentencePiece-style (leading-space markers) and word-level tokenizers, on random ids."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertlora.runtime.detokenize import IncrementalText

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "naïve café déjà vu — señor", "中文分词测试 日本語のテキスト",
    "emoji 🙂🚀 and ünïcödé", "don't stop, it's fine: x = y + 1;", "  spaces   and\ttabs\nnew lines",
]


def byte_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def sentencepiece_like():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def word_level():
    import tempfile

    from transformers import AutoTokenizer

    from expertlora.tiny import save_tokenizer

    return AutoTokenizer.from_pretrained(save_tokenizer(tempfile.mkdtemp(prefix="expertlora-tok-")))


TOKENIZERS = {"byte-level BPE": byte_level(), "SentencePiece-like": sentencepiece_like(), "word-level": word_level()}


def whole_output_each_step(tokenizer, ids: list[int]) -> list[str]:
    """The texts the engine gave before: the whole output decoded, an incomplete last character held back."""
    texts, shown = [], ""
    for n in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:n], skip_special_tokens=True)
        shown = full if not full.endswith("\ufffd") else shown
        texts.append(shown)
    return texts


@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_text_equals_decoding_the_whole_output(name, data):
    tokenizer = TOKENIZERS[name]
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), min_size=1, max_size=40))
    expected = whole_output_each_step(tokenizer, ids)
    text = IncrementalText(tokenizer)
    got = [text.update(ids[:n]) for n in range(1, len(ids) + 1)]
    assert got == expected
    assert text.update(ids, final=True) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_real_text_round_trips(name):
    """Text encoded and fed back token by token gives the text (characters split across tokens)."""
    tokenizer = TOKENIZERS[name]
    for line in CORPUS if name != "word-level" else ["t5 t17 t3 t90"]:
        ids = tokenizer.encode(line, add_special_tokens=False)
        text = IncrementalText(tokenizer)
        for n in range(1, len(ids) + 1):
            text.update(ids[:n])
        assert text.update(ids, final=True) == tokenizer.decode(ids, skip_special_tokens=True)


def test_no_tokenizer_gives_no_text():
    assert IncrementalText(None).update([1, 2, 3], final=True) == ""
