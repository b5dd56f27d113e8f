"""`effft bench`: our speed against a reference, measured alternating in one run (model.py:
the network against timm's; data.py: the pipeline from files against the cache; fit.py: a
training epoch against a plain Lightning loop; predict.py: predict from files to the CSV against
the model's own forward; rounds.py: the alternation and the table they share)."""
