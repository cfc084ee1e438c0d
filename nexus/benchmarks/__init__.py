"""Throughput sweeps: how fast a catalog model serves on each node, cell by cell.

    sweep      the request (model, nodes, batch sizes, context lengths) and its limits
    cells      one measured cell's record, percentiles, the table as CSV
    measure    worker side: drive a backend through one node's cells
    jobs       the `benchmark` job (one child per node, merged) and its `benchmark_node` children
    records    master side: benchmark rows, each node's measured capacity per model
    plot       tok/s against batch size, one line per context length, one panel per node
"""
