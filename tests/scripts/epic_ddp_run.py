"""Train a tiny ViT with EpicTrainer and write what this process saw to ``<out>/rank<r>.json``.

Run under ``accelerate launch`` (several processes) or plain ``python`` (one process) by
``tests/test_multiprocess.py``. Every rank records the row ids of its own training batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import RecordingCollator, make_config, small_digits, tiny_vit, with_pixels  # noqa: E402

from hf_epic.epic_trainer import EpicTrainer  # noqa: E402
from hf_epic.experiments.runtime import shutdown_distributed


def main() -> None:
    """Parse the arguments, train, and write this rank's record."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16, help="per-device batch size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--embedding_source", default="eval_pass", choices=["eval_pass", "training_pass"])
    parser.add_argument("--save_embeddings", action="store_true", help="save each round's embeddings")
    parser.add_argument("--drop_rule", default="first_isolation", help="epic_drop_rule")
    options = parser.parse_args()

    collator = RecordingCollator()
    args = make_config(
        options.output_dir,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        epic_start_epoch=1,
        epic_interval=1,
        epic_fraction=0.3,
        epic_embedding_source=options.embedding_source,
        epic_save_embeddings=options.save_embeddings,
        epic_drop_rule=options.drop_rule,
    )
    trainer = EpicTrainer(
        model=tiny_vit(0),
        args=args,
        train_dataset=with_pixels(small_digits(options.rows)),
        data_collator=collator,
    )
    trainer.train()
    state = trainer.epic_state
    record = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "dropped": state.dropped,
        "rounds": [r["newly_dropped"] for r in state.rounds],
        "records": state.rounds,
        "eval_passes": trainer.epic_callback.eval_passes,
        "epoch_start_steps": state.epoch_start_steps,
        "epoch_end_steps": state.epoch_end_steps,
        "batches": collator.batches,
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
