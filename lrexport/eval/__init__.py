"""lrexport.eval."""
