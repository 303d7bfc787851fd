"""Instruction tuning data: JSONL of chat messages, formatted with the tokenizer's chat template.

One record per line:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Only assistant tokens are trained on; every other token gets the label -100. A template that marks
assistant text with `{% generation %}` (the ChatML template of data_scripts' tokenizers does) says
exactly which tokens those are (`return_assistant_tokens_mask`). Otherwise the spans come from
rendering the template on prefixes of the conversation (the text of the first i messages plus the
generation prompt is where assistant message i starts; everything the turn adds after it, its
content and end-of-turn marker, is trained on) and the tokenizer's offset mapping, so any
prefix-stable template works.

Malformed records (bad JSON, missing or unknown roles, empty content, no assistant turn, nothing
left to train on after truncation) are skipped and reported as `file:line: reason`; a file with no
usable record is an error.
"""

import json
import logging
import re
from pathlib import Path

from datasets import Dataset

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# Used when the tokenizer has no chat template: plain-text role markers and the tokenizer's EOS at the
# end of every turn, so it needs no new tokens (a pretrained vocabulary is kept as it is).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give `tokenizer` the default template if it has none; True when it was added."""
    if tokenizer.chat_template:
        return False
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has neither a chat template nor an EOS token; give it a chat_template.")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    logger.warning(
        "tokenizer has no chat template: using trainers.chat_data.DEFAULT_CHAT_TEMPLATE (saved with the adapter)"
    )
    return True


def check_record(record) -> str | None:
    """Why `record` is not a usable conversation, or None when it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing or empty 'messages' list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        if "role" not in m:
            return f"message {i} has no 'role'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; roles are {list(ROLES)}"
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"message {i} ({m['role']}) has empty or missing 'content'"
    if messages[0]["role"] == "assistant":
        return "the conversation starts with an assistant message (nothing to condition on)"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to train on)"
    return None


def read_chat_jsonl(path) -> tuple[list[tuple[int, list[dict]]], list[str]]:
    """(line number, messages) of each usable record, and `file:line: reason` for each malformed one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Chat data file {path} does not exist.")
    records, problems = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})")
                continue
            if (why := check_record(record)) is not None:
                problems.append(f"{path}:{lineno}: {why}")
                continue
            records.append((lineno, [{"role": m["role"], "content": m["content"]} for m in record["messages"]]))
    return records, problems


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn."""
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise ValueError(
                "The chat template is not prefix-stable (rendering the first messages of a conversation is not a "
                "prefix of rendering all of it), so assistant turns cannot be located; use a template without "
                "lookahead, e.g. trainers.chat_data.DEFAULT_CHAT_TEMPLATE."
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def tokenize_chat(tokenizer, messages: list[dict], max_seq_len: int) -> dict:
    """input_ids (T,) and labels (T,): labels are the ids on assistant tokens, -100 elsewhere."""
    if GENERATION_MARKER.search(tokenizer.chat_template or ""):
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = enc["input_ids"][:max_seq_len], enc["assistant_masks"][:max_seq_len]
        return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_seq_len], enc["offset_mapping"][:max_seq_len]
    # a token belongs to the turn its first character is in
    labels = [tok if any(s <= start < e for s, e in spans) else -100 for tok, (start, _) in zip(ids, offsets)]
    return {"input_ids": ids, "labels": labels}


def load_chat(path, tokenizer, max_seq_len: int) -> tuple[Dataset, list[str]]:
    """A torch-format Dataset of tokenized conversations and the list of problems found."""
    records, problems = read_chat_jsonl(path)
    rows = []
    for lineno, messages in records:
        row = tokenize_chat(tokenizer, messages, max_seq_len)
        if all(label == -100 for label in row["labels"]):
            problems.append(f"{path}:{lineno}: no assistant token within max_seq_len={max_seq_len}")
            continue
        rows.append(row)
    for p in problems[:20]:
        logger.warning("skipped %s", p)
    if len(problems) > 20:
        logger.warning("... and %d more malformed records in %s", len(problems) - 20, path)
    if not rows:
        raise ValueError(
            f"{path} has no usable conversation ({len(problems)} malformed record(s); first: {problems[:1]})."
        )
    return Dataset.from_list(rows).with_format("torch"), problems
