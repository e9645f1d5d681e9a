"""Prefect flows (generate one pair, process a dataset) and the command line over them."""
