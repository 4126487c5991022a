"""``erw-bench``'s library: shared helpers and ``Workload`` (common), the cost analysis (cost) and the training
throughput benchmark (train). The command line is ``erw_fast.cli.bench``."""
