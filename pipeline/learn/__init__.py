"""Learning from recordings: labelled windows, training, evaluation and its report."""
