# segnet_ext._C has no Python-level members: importing it registers the native ops
# with the PyTorch dispatcher, reachable as torch.ops.segnet_ext.*:
#   max_pool2x2(Tensor x, bool ceil_mode=False) -> (Tensor values, Tensor packed_indices)
#   max_unpool2x2(Tensor values, Tensor packed_indices, SymInt[2] output_size) -> Tensor
#   max_unpool2x2_backward(Tensor grad_output, Tensor packed_indices, SymInt[2] pooled_size) -> Tensor
#   bn_stats(Tensor x) -> (Tensor mean, Tensor var)
#   scale_shift_relu(Tensor x, Tensor scale, Tensor shift, bool relu, Tensor? residual=None) -> Tensor
#   bn_relu_backward_reduce(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, Tensor mean, bool relu)
#       -> (Tensor sum_g, Tensor sum_gc)
#   bn_relu_backward_apply(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor k1,
#       Tensor k2, Tensor k3, bool relu) -> Tensor
#   conv2d_scale_shift_relu(Tensor x, Tensor weight, Tensor scale, Tensor shift, int[2] stride,
#       int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor
#   kernel_choices() -> str[]   (the per-shape choices between our CUDA kernels and cuDNN so far)
#   cpu_capability() -> str   ("AVX512", "AVX2" or "DEFAULT": the level the CPU kernels run at)
