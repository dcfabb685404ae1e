"""Broadprop: manual backprop with tensor broadcasting, checked against PyTorch autograd."""
