"""Image datasets: the procedurally generated pre-training set and (later) uploaded datasets."""
