"""Optional accelerators of the training step, each checked against its torch twin before use: the fused loss and
pooling (Triton), the row-wise Adagrad kernels, and CUDA graph capture of a whole step. Triton is imported only
when a kernel is chosen."""
