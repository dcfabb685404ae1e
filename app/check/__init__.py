"""The check: the reference forward (torch only), autograd on fresh leaves, finite differences."""
