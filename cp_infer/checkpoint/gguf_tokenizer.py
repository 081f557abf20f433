"""A GGUF file's tokenizer, built from its metadata as a ``tokenizers`` tokenizer.

GGUF carries no ``tokenizer.json``: the vocabulary (``tokenizer.ggml.tokens``), the BPE merges,
each token's type (normal, control, user-defined, ...), the special ids, whether to prepend BOS,
llama.cpp's name for the pre-tokenizer (``tokenizer.ggml.pre``) and the chat template are
metadata. :func:`gguf_tokenizer` rebuilds the byte-level BPE tokenizer they describe (the
``gpt2`` model of llama.cpp, which Llama 3, SmolLM, Qwen and most recent models use), with the
split llama.cpp applies for that pre-tokenizer name. transformers' GGUF loader builds the same
one (the tests compare them on text); other tokenizer models are refused by name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cp_infer.checkpoint.gguf import GGUFFile, open_gguf

__all__ = ["GGUFTokenizer", "gguf_tokenizer"]

logger = logging.getLogger(__name__)

# llama.cpp's token types
_CONTROL, _USER_DEFINED = 3, 4

# The regular expressions llama.cpp splits text with before BPE, by ``tokenizer.ggml.pre``.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2,),
    "gpt2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),  # every digit alone, then GPT-2's split
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
}


@dataclass(frozen=True)
class GGUFTokenizer:
    """A GGUF model's tokenizer and what goes with it.

    Attributes:
        tokenizer: the ``tokenizers.Tokenizer`` (BOS added by ``encode`` when the model wants
            it).
        bos_token, eos_token: the special tokens' text (None when the file names none).
        bos_id, eos_id: their ids.
        chat_template: the Jinja chat template, or None.
        add_bos: whether a prompt starts with BOS.
    """

    tokenizer: object
    bos_token: str | None
    eos_token: str | None
    bos_id: int | None
    eos_id: int | None
    pad_token: str | None
    chat_template: str | None
    add_bos: bool

    def hf_tokenizer(self):
        """A transformers ``PreTrainedTokenizerFast`` over the same tokenizer (the server's:
        chat templates, special-token handling)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=self.tokenizer,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            chat_template=self.chat_template,
        )

    def save(self, directory: Path) -> list[str]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``
        (what ``AutoTokenizer.from_pretrained`` reads) into ``directory``; returns their names."""
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def _byte_chars() -> list[str]:
    """GPT-2's printable spelling of bytes 0..255 (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def gguf_tokenizer(file: GGUFFile | str | Path) -> GGUFTokenizer:
    """The tokenizer a GGUF file describes.

    Raises:
        ValueError: the file has no vocabulary, or a tokenizer model other than llama.cpp's
            ``gpt2`` (byte-level BPE).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    f = file if isinstance(file, GGUFFile) else open_gguf(file)
    kind = f.get("tokenizer.ggml.model", None)
    if kind is None:
        raise ValueError(f"{f.path} has no tokenizer; give token ids instead of text")
    if kind != "gpt2":
        raise ValueError(
            f"{f.path} has a {kind!r} tokenizer; cp_infer builds llama.cpp's 'gpt2' (byte-level "
            "BPE) tokenizers from GGUF. Convert the model with transformers and pass its "
            "directory, or give token ids"
        )
    tokens = [str(t) for t in f.get("tokenizer.ggml.tokens")]
    types = [int(t) for t in f.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges")]
    # a token outside the byte alphabet (rare, mislabelled) is spelled in it, as its UTF-8 bytes
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    spell = dict(zip(range(256), _byte_chars(), strict=True))
    vocab = {
        t if set(t) <= set(alphabet) else "".join(spell[b] for b in t.encode()): i
        for i, t in enumerate(tokens)
    }
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    pre = str(f.get("tokenizer.ggml.pre", "default"))
    if pre not in _SPLITS:
        logger.warning("%s: pre-tokenizer %r unknown here; splitting text as GPT-2 does", f.path,
                       pre)  # fmt: skip
    splits = [
        pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS.get(pre, (_GPT2,))
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # control tokens (<|im_end|>) stay whole and are special; user-defined ones stay whole
    byte_alphabet = set(alphabet)
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == _CONTROL and set(t) <= byte_alphabet
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )

    def special_token(key: str) -> tuple[str | None, int | None]:
        i = f.get(f"tokenizer.ggml.{key}", None)
        return (
            (tokens[int(i)], int(i))
            if i is not None and 0 <= int(i) < len(tokens)
            else (None, None)
        )

    bos, bos_id = special_token("bos_token_id")
    eos, eos_id = special_token("eos_token_id")
    pad, _ = special_token("padding_token_id")
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    template = f.get("tokenizer.chat_template", None)
    return GGUFTokenizer(
        tokenizer=tok, bos_token=bos, eos_token=eos, bos_id=bos_id, eos_id=eos_id,
        pad_token=pad, chat_template=str(template) if template is not None else None,
        add_bos=add_bos,
    )  # fmt: skip
