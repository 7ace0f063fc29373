# segnet_ext._C has no Python-level members: importing it registers the native ops
# with the PyTorch dispatcher, reachable as torch.ops.segnet_ext.*:
#   max_pool2x2(Tensor x, bool ceil_mode=False) -> (Tensor values, Tensor packed_indices)
#   max_unpool2x2(Tensor values, Tensor packed_indices, SymInt[2] output_size) -> Tensor
#   max_unpool2x2_backward(Tensor grad_output, Tensor packed_indices, SymInt[2] pooled_size) -> Tensor
