"""Discrete-event simulator, trace readers, what-if scenarios, reports and plots."""
