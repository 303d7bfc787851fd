"""Right padding of tokenized rows into a batch, for every fine-tuning task."""

import torch


def right_pad(pad_token_id: int):
    """A collate_fn that right-pads `input_ids` to the longest row with `pad_token_id` and sets
    `attention_mask` to 1 on real tokens. `labels` of a token task (one per token) are padded with
    -100, which the loss ignores; `labels` of a row task (one per row) are stacked. Right padding
    suits a causal model: its outputs at real tokens do not depend on what follows them."""

    def collate(rows: list[dict]) -> dict:
        n = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), n), pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), n), dtype=torch.long)
        per_token = torch.as_tensor(rows[0]["labels"]).dim() > 0
        labels = torch.full((len(rows), n), -100, dtype=torch.long) if per_token else None
        for i, r in enumerate(rows):
            t = len(r["input_ids"])
            input_ids[i, :t], attention_mask[i, :t] = r["input_ids"], 1
            if per_token:
                labels[i, :t] = r["labels"]
        if not per_token:
            labels = torch.stack([torch.as_tensor(r["labels"]) for r in rows])  # (B,)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate
