"""Changing a model on a running line: a candidate shadows production on live frames
(shadow.py), is promoted only through its gates (gates.py) and can be rolled back
(history.py); confirmed defects form each inspection's regression set (regression.py); every
change is recorded in the audit trail (audit.py). The agent's service loop calls these; they
decide nothing about frames."""
