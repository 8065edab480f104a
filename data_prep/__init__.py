"""Dataset preparation: synthetic dataset generator and converters to FFCV / WebDataset shards."""
