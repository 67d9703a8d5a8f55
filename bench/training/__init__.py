"""One cell's training: the loop and its EMA weights."""
