"""A word-level tokenizer with a chat template, for tiny checkpoints without a model hub.

Token ``i`` is the word ``w<i>``; text is words separated by spaces. The chat template wraps
each message as ``w1 <content> w2`` and ends with ``w3`` when a reply is asked for, so chats
tokenize to known ids. With ``bos_id``, encoding a text with its special tokens puts that
token first (a post-processor, as Llama 3's tokenizer has) and the chat template begins with it. transformers loads the directory with ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "write_word_tokenizer"]

CHAT_TEMPLATE = (  # a BOS, when the tokenizer has one, leads the text (as Llama 3's template)
    "{% if bos_token %}{{ bos_token }} {% endif %}"
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
    "{% if add_generation_prompt %}w3{% endif %}"
)


def write_word_tokenizer(
    directory: Path, vocab_size: int, *, eos_id: int = 0, bos_id: int | None = None
) -> None:
    """Write tokenizer.json and tokenizer_config.json for ``vocab_size`` words into a checkpoint.

    Args:
        bos_id: the token a text starts with when it is encoded with its special tokens (as a
            Llama 3 tokenizer's post-processor puts BOS first); None: no such token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if bos_id is not None:
        bos = f"w{bos_id}"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": f"w{eos_id}",
        "unk_token": "w0",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 20,
    }
    if bos_id is not None:
        config["bos_token"] = f"w{bos_id}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
