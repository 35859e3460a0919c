"""lrexport.emit."""
