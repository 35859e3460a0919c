"""lrexport.allocate."""
