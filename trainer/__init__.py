"""Stage two, `train-student`: `storage` -> batches -> sparse-target KD loss (AdaKD) -> student."""
