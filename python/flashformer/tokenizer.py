"""tokenizer.json through the `tokenizers` package, and HF-style chat templates through jinja2."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from .config import read_json


def _raise_exception(message):
    raise TemplateError(message)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    text = value.get("content") if isinstance(value, dict) else value
    return text if isinstance(text, str) else None


def _byte_level_bytes() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary stands for (GPT-2's alphabet, which
    tokenizers' ByteLevel pre-tokenizer and decoder use): the printable bytes as themselves, the
    other 68 as chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, map(chr, printable)))
    chars.update((b, chr(256 + n)) for n, b in enumerate(b for b in range(256) if b not in chars))
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_bytes()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece-style byte piece


def _decodes_bytes(decoder: dict | None) -> bool:
    """Whether a tokenizer.json decoder (its JSON) maps pieces through the byte-level alphabet."""
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_decodes_bytes(d) for d in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"


def _chat_template(model_dir: Path, config: dict) -> str | None:
    """The default chat template: tokenizer_config.json's, else chat_template.jinja / .json."""
    template, source = config.get("chat_template"), "tokenizer_config.json"
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template, source = (model_dir / "chat_template.jinja").read_text(), "chat_template.jinja"
    if template is None and (model_dir / "chat_template.json").is_file():
        template, source = read_json(model_dir / "chat_template.json").get("chat_template"), "chat_template.json"
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{model_dir / source}: 'chat_template' must be a string, got {type(template).__name__}")
    return template


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict, chat_template: str | None):
        self._tok = tokenizer
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = chat_template
        self._token_texts: dict[int, str] = {}  # token_text's, as asked for (at most the vocabulary)
        self._token_bytes: dict[int, tuple[int, ...]] = {}  # token_bytes', likewise
        self._byte_level: bool | None = None  # whether the decoder is byte-level (read when first needed)

    @classmethod
    def load(cls, model_dir: str | Path) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None when it has no tokenizer.json."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            tokenizer = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers package raises a bare Exception on bad files
            raise ValueError(f"{path} could not be loaded: {exc}") from exc
        config_path = model_dir / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        return cls(tokenizer, config, _chat_template(model_dir, config))

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> TextStream:
        """An incremental decoder of one output: constant work per token (tokenizers' DecodeStream)."""
        return TextStream(self, skip_special_tokens)

    def token_text(self, token: int) -> str:
        """One token's own text (special tokens included), e.g. for logprobs: each step's chosen
        tokens and up to 20 alternatives a row, so decoded once a token id."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self._tok.decode([token], skip_special_tokens=False)
        return text

    def token_bytes(self, token: int) -> list[int]:
        """One token's own bytes (OpenAI's logprobs `bytes`, which a client joins where a character
        spans tokens): its text's UTF-8, and for a token that holds part of a character (its text
        alone decodes to U+FFFD) the bytes it stands for: byte-level BPE's (GPT-2's alphabet) or a
        byte-fallback piece's ("<0xE2>")."""
        raw = self._token_bytes.get(token)
        if raw is None:
            raw = self._token_bytes[token] = tuple(self._raw_bytes(token))
        return list(raw)  # (a list of its own: an output's entry is the caller's to change)

    def _raw_bytes(self, token: int) -> list[int]:
        text = self.token_text(token)
        piece = self._tok.id_to_token(token) if "\ufffd" in text else None
        if piece is not None:
            if self._byte_level is None:  # (the decoder's own JSON, not the whole tokenizer's)
                decoder = self._tok.decoder
                self._byte_level = decoder is not None and _decodes_bytes(json.loads(decoder.__getstate__()))
            if self._byte_level and all(c in _BYTE_LEVEL for c in piece):
                return [_BYTE_LEVEL[c] for c in piece]
            byte = _BYTE_FALLBACK.fullmatch(piece)
            if byte:
                return [int(byte[1], 16)]
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the checkpoint's chat template."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (no chat_template in tokenizer_config.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise ValueError(f"the checkpoint's chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the template writes its own special tokens, as in HF."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


class TextStream:
    """The text of an output as its tokens arrive: step() returns what a token adds (nothing while
    it ends inside a UTF-8 character; that text comes with the token that completes it), so the
    pieces add up to decode() of the tokens, but for an incomplete character at the very end, which
    `finish()` returns."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self.text = ""

    def step(self, token: int) -> str:
        self.ids.append(token)
        piece = self._stream.step(self.tokenizer._tok, token) or ""
        self.text += piece
        return piece

    def finish(self) -> str:
        """What decode() of every token adds to the pieces so far (once, at the end: O(tokens))."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        tail = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += tail
        return tail
