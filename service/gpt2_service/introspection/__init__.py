"""Introspection: what the serving model computes for one input, stage by stage, from the same
model code as generation. Inputs are checked and budgeted first; the forward pass runs later,
on the engine thread."""
