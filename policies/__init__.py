"""Shipped geomcompile policies (YAML), loadable by name: ``gc.load_policy("resnet")``."""
