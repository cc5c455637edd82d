"""Evaluation tasks for momtitan models: synthetic recall probes (MQAR) that need no downloads."""
