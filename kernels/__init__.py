"""quantrt.kernels: bit packing, the storage formats in pure torch (quantize.py), the reference linears
(reference.py), and the Triton weight-only matmul kernels. Takes tensors and ints, returns tensors; knows
nothing of configs, modules or caches."""
