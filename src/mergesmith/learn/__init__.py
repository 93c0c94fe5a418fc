"""Learning merge coefficients with autograd (AdaMerging, DAM); each writes an ordinary recipe."""
