"""Tools around runs: the SVD analysis, the results report, the dry-run planner, statistics, the quantization error,
the reference-checkpoint converter, synthetic weights and plotting."""
