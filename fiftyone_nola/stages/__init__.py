"""FiftyOne-aware stages: library functions that read and write FiftyOne datasets."""
