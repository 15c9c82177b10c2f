"""Site data: readers with schema checks, partitioning, splits, the synthetic corpus."""
