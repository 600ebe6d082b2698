"""Loading the benchmarks, the train/held-out split, the records that cross stage boundaries and their checks."""
