from megatron_vlm.parallel.setup import destroy_parallel, initialize_parallel

__all__ = ["initialize_parallel", "destroy_parallel"]
