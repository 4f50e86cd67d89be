"""Autoscaling: the pure decision (policy, load_flow) and the loop that scrapes the pods (loop)."""
