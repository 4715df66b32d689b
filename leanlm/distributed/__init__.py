"""Beyond one process: tensor parallelism over torch.distributed (tensor_parallel.py, process_group.py)."""
