"""A tiny offline text-classification set-up: a word-level vocabulary, BertTokenizerFast, a tiny BERT.

Sentences of 3 to 14 words mix neutral filler words with words of their class (two classes: words
"good..." and "bad..."), so a tiny BERT learns them in a few epochs. A few planted rows carry the
other class's label (``is_poison``): isolated points in gradient space once the model has learnt.
"""

from __future__ import annotations

import os
import random

FILLER = ["the", "a", "movie", "film", "was", "and", "it", "plot", "actors", "story", "very", "quite"]
WORDS = {
    0: ["bad", "awful", "boring", "dull", "poor", "weak"],
    1: ["good", "great", "fun", "fine", "nice", "neat"],
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(folder: str):
    """A ``BertTokenizerFast`` over a word-level vocabulary written to ``folder/vocab.txt`` (no download)."""
    from transformers import BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(SPECIAL + FILLER + WORDS[0] + WORDS[1]) + "\n")
    return BertTokenizerFast.from_pretrained(folder)  # a local folder holding vocab.txt: nothing downloaded


def build_text_dataset(tokenizer, num_rows: int = 120, planted: tuple[int, ...] = (), seed: int = 0):
    """Tokenised sentences of varying length (no padding), with ``label``, ``row_id`` and ``is_poison``.

    Rows 0 and 1 have the same length, so a check that looks only at the first two rows cannot tell
    the lengths vary.
    """
    import datasets

    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(num_rows):
        label = i % 2
        length = 6 if i < 2 else rng.randint(3, 14)
        words = [
            rng.choice(WORDS[label]) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(length)
        ]
        words[rng.randrange(length)] = rng.choice(WORDS[label])
        texts.append(" ".join(words))
        labels.append(1 - label if i in planted else label)
    ds = datasets.Dataset.from_dict(
        {
            "text": texts,
            "label": labels,
            "row_id": list(range(num_rows)),
            "is_poison": [i in planted for i in range(num_rows)],
        }
    )
    ds = ds.cast_column("label", datasets.ClassLabel(names=["negative", "positive"]))
    return ds.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])


def tiny_bert(tokenizer, seed: int = 0):
    """A 1-layer BERT sequence classifier with hidden size 32, built from a config (random weights)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)
