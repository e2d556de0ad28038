"""What both stages need and neither owns: code below `pipeline/` and `trainer/`, importing neither."""
