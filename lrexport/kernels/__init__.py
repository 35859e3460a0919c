"""lrexport.kernels."""
