"""lrexport.factorize."""
