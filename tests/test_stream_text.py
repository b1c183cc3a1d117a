"""Streamed text is always a prefix of the final text, also when an incomplete UTF-8 character at
the end (decoded as several "\ufffd") completes into fewer characters next to a stop string."""

from flashformer.engine import _Request
from flashformer.sampling import SamplingParams


class PrefixDecoder:
    """A tokenizer stub whose decode of the first n ids is texts[n - 1]."""

    def __init__(self, texts):
        self.texts = texts

    def decode(self, ids):
        return self.texts[len(ids) - 1]


def stream(texts, stop):
    request = _Request(0, None, [1], SamplingParams(max_tokens=len(texts), stop=stop), PrefixDecoder(texts), (), "cpu")
    deltas = [request.add(token, 0.0, cache_full=False) for token in range(len(texts))]
    return "".join(d.text for d in deltas), request.output()


def test_replacement_characters_at_the_end_do_not_count_as_held_back_text():
    # Two bytes of a three-byte character decode as two "\ufffd"; the third makes them one "|".
    streamed, output = stream(["\ufffdv", "\ufffdv\ufffd\ufffd", "\ufffdv|x", "\ufffdv|xyz"], stop="v|x")
    assert output.finish_reason == "stop" and output.text == "\ufffd"
    assert streamed == output.text


def test_text_without_a_stop_streams_whole():
    streamed, output = stream(["a", "ab\ufffd", "abc", "abcd"], stop=None)
    assert streamed == output.text == "abcd" and output.finish_reason == "length"
