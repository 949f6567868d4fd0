"""What the methods measure about attention: normalised entropy and cross-frame intensity."""
