"""`leanlm optimize` and `leanlm plan`: which configuration of a model runs best on this machine under a quality
budget. formats.py is the table of what leanlm can run, predict.py the cheap predictions (`plan`), search.py the
budgeted search over measured candidates, measure.py the real measurements, report.py and card.py the outputs."""
