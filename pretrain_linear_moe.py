"""Thin entry point: megatron.training.pretrain with linear_moe's model, data and flags."""

from linear_moe.pretrain import main

if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this file
    main()
