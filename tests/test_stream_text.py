"""Streamed text always adds up to the final text, which is the whole output decoded (cut at a
stop string), also when UTF-8 characters span several tokens next to a stop string and when the
output ends inside one. A byte-level tokenizer with one token per byte makes every multi-byte
character span tokens."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from flashformer.engine import _Request
from flashformer.sampling import SamplingParams
from flashformer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, {}, None)


def stream(tokenizer, ids, stop=None, max_tokens=None):
    params = SamplingParams(max_tokens=max_tokens or len(ids), stop=stop, ignore_eos=True)
    request = _Request(0, None, [1], params, tokenizer, (), "cpu")
    deltas = []
    for token in ids:
        deltas.append(request.add(token, 0.0, cache_full=False))
        if request.finish_reason:
            break
    assert all("\ufffd" not in d.text for d in deltas[:-1])  # nothing half-decoded is ever streamed
    return "".join(d.text for d in deltas), request.output()


def test_multibyte_characters_stream_whole(tokenizer):
    text = "héllo € wörld 😀!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # characters span tokens
    streamed, output = stream(tokenizer, ids)
    assert streamed == output.text == text and output.finish_reason == "length"


@pytest.mark.parametrize("text, stop, expected", [
    ("a€b|xyz", "b|x", "a€"),        # a stop string right after a three-byte character
    ("xx€byy", "€b", "xx"),          # a stop string that holds one
    ("ab😀😀cd", "😀c", "ab😀"),
    ("no stop here €", "zz", "no stop here €"),
])
def test_stop_strings_next_to_multibyte_characters(tokenizer, text, stop, expected):
    streamed, output = stream(tokenizer, tokenizer.encode(text), stop=stop)
    assert output.text == expected == streamed
    assert output.finish_reason == ("stop" if stop in text else "length")


def test_an_output_ending_inside_a_character_is_decoded_as_decode_does(tokenizer):
    ids = tokenizer.encode("ok €")[:-1]  # the last byte of € is missing
    streamed, output = stream(tokenizer, ids)
    assert output.text == tokenizer.decode(ids) and output.text.startswith("ok ") and output.text.endswith("\ufffd")
    assert streamed == output.text


def test_the_text_is_not_re_decoded_per_token(tokenizer, monkeypatch):
    """Constant work per token: the whole output is decoded once, when it ends (for an incomplete
    character at the very end), not once per token."""
    calls = []
    decode = Tokenizer.decode
    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids, **kw: calls.append(len(ids)) or decode(self, ids, **kw))
    text = "ein langer Text, ünd noch € mehr. " * 20
    streamed, output = stream(tokenizer, tokenizer.encode(text))
    assert streamed == output.text == text
    assert calls == [len(tokenizer.encode(text))]


def test_token_bytes_are_each_tokens_own_and_join_into_the_text(tokenizer):
    """OpenAI's logprobs `bytes`: a token's own bytes, so that a client joining them gets the text
    back also where a character spans tokens (each piece alone decodes to U+FFFD)."""
    text = "héllo € wörld 😀!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # (a token a byte: each byte of a multi-byte character alone decodes to U+FFFD)
    assert sum("\ufffd" in tokenizer.token_text(t) for t in ids) == sum(b >= 0x80 for b in text.encode())
    assert b"".join(bytes(tokenizer.token_bytes(t)) for t in ids) == text.encode()
    assert [tokenizer.token_bytes(t) for t in tokenizer.encode("a!", add_special_tokens=False)] == [[97], [33]]


def test_token_bytes_of_byte_fallback_pieces():
    """A SentencePiece-style tokenizer (Llama-2, Mistral): characters outside the vocabulary become
    byte pieces ("<0xC3>"), which stand for their byte; whole pieces are their text's UTF-8."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁": 257, "h": 258, "i": 259}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = Tokenizer(tok, {}, None)
    text = "hi é€"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert [tok.id_to_token(t) for t in ids][:4] == ["h", "i", "▁", "<0xC3>"]
    assert tokenizer.token_text(ids[3]) == "\ufffd" and tokenizer.token_bytes(ids[3]) == [0xC3]
    assert tokenizer.token_bytes(ids[2]) == [0x20]  # ("▁" is a space)
    assert b"".join(bytes(tokenizer.token_bytes(t)) for t in ids) == text.encode()
