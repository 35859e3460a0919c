"""lrexport.calib."""
