"""Running exported bundles (§3.4.2): the expert cache policies in Python (`python`) and the native C++ runner (`native`)."""
