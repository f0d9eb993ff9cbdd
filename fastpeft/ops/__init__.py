"""Functional ops and their autograd Functions."""
