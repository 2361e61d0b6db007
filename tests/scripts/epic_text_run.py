"""Train a tiny BERT text classifier with EpicTrainer and DataCollatorWithPadding; write ``<out>/rank<r>.json``.

Run under ``accelerate launch`` (two CPU processes) by ``tests/test_multiprocess.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from conftest import make_config  # noqa: E402
from tiny_text import build_text_dataset, build_tokenizer, tiny_bert  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

from hf_epic.epic_trainer import EpicTrainer  # noqa: E402
from hf_epic.experiments.runtime import shutdown_distributed

PLANTED = (11, 24, 37, 50, 63, 76)


def main() -> None:
    """Parse the arguments, train, and write this rank's record."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=5)
    options = parser.parse_args()

    tokenizer = build_tokenizer(os.path.join(options.output_dir, "tokenizer"))
    train = build_text_dataset(tokenizer, options.rows, planted=PLANTED)
    args = make_config(
        options.output_dir,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        remove_unused_columns=True,
        epic_start_epoch=2,
        epic_interval=1,
        epic_fraction=0.2,
        epic_embedding_batch_size=16,
    )
    trainer = EpicTrainer(
        model=tiny_bert(tokenizer),
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    state = trainer.epic_state
    record = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "dropped": state.dropped,
        "rounds": [r["newly_dropped"] for r in state.rounds],
        "round_epochs": [r["epoch"] for r in state.rounds],
        "poisons_dropped_total": state.rounds[-1]["poisons_dropped_total"] if state.rounds else None,
        "epoch_start_steps": state.epoch_start_steps,
        "epoch_end_steps": state.epoch_end_steps,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epoch": trainer.state.epoch,
    }
    with open(os.path.join(options.output_dir, f"rank{args.process_index}.json"), "w") as handle:
        json.dump(record, handle)
    shutdown_distributed()


if __name__ == "__main__":
    main()
    # The records are written and closed. Skip the interpreter's teardown, where gloo can abort a
    # process after the work is done (pytorch/pytorch#179291), which would fail the launch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
