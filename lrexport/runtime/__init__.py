"""lrexport.runtime."""
