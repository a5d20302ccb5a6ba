"""The recovery fine-tune: the loop, what it compares (losses, taps, blending), its run state and
checkpoints, its data readers, its log, and running under ``torchrun``."""
