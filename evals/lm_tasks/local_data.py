"""``custom_dataset`` functions for the YAML tasks in this folder (lm-eval loads this
file by path through ``!function``)."""

from evals.harness import lambada_dataset, piqa_dataset

__all__ = ["lambada_dataset", "piqa_dataset"]
