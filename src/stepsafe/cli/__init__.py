"""The stepsafe command line."""
