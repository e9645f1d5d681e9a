"""Prefect tasks, one module per stage. Each reads its inputs from the store, calls
freetalk_core, writes its outputs to the store and returns a small `StageRef`."""
