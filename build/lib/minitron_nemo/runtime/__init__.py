"""Distributed runtime: process groups, device selection and the CPU compatibility layer."""
