"""Stage 7, tokenizer: train a byte-level BPE with ``tokenizers`` on the curated text and save it as a
transformers tokenizer (``PreTrainedTokenizerFast.save_pretrained``), or take an existing folder.

Special tokens (ids 0-3 when trained here): ``<|endoftext|>`` is eos and bos (every document in the
packed data is followed by it, so it is also what precedes a document), ``<|pad|>`` pads, and
``<|im_start|>`` / ``<|im_end|>`` frame chat turns in the ChatML template, whose assistant turns are
marked with ``{% generation %}`` so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
works for fine-tuning. No special token is added when text is encoded.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .docs import document_stage, map_docs
from .recipe import RecipeError, TokenizerConfig

logger = logging.getLogger(__name__)

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], cfg: TokenizerConfig, out_dir: Path, length: int | None = None
) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    logger.info("trained a byte-level BPE tokenizer with %d tokens", tok.get_vocab_size())
    return fast


def load_existing(path: str) -> PreTrainedTokenizerFast:
    """An existing tokenizer folder, checked for an eos token; bos and pad fall back to eos."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"tokenizer.path: cannot load a tokenizer from {path}: {e}") from None
    if not getattr(tok, "backend_tokenizer", None):
        raise RecipeError(f"tokenizer.path: {path} is not a fast (tokenizers-backed) tokenizer")
    if tok.eos_token is None:
        raise RecipeError(f"tokenizer.path: the tokenizer in {path} has no eos token; documents are joined with it")
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    if tok.pad_token is None:
        logger.info("tokenizer has no pad token; using eos (%s)", tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=2)
def _backend(tokenizer_file: str) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_file)


def _encode(docs: list, tokenizer_file: str, eos_id: int) -> list:
    return _backend(tokenizer_file).encode_batch_fast([d["text"] for d in docs], add_special_tokens=False)


@document_stage(("input_ids", "num_tokens", "num_chars"), every_row=True, prepare=_encode)
def tokenize_doc(doc, enc, tokenizer_file: str, eos_id: int) -> dict:
    """``input_ids`` (document tokens + eos) for kept rows; ``num_tokens`` and ``num_chars`` for every row.

    Removed rows are tokenized too, only to count their tokens for the report.
    """
    if doc["reason"]:
        ids, count = [], len(enc.ids)
    else:
        ids, count = enc.ids + [eos_id], len(enc.ids) + 1
    return {"input_ids": ids, "num_tokens": count, "num_chars": len(doc["text"])}


def tokenize_batch(batch: dict, tokenizer_file: str, eos_id: int) -> dict:
    return map_docs(batch, tokenize_doc, tokenizer_file=tokenizer_file, eos_id=eos_id)
