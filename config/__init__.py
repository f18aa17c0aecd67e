"""The shipped configuration files, installed as the package ``supervisor.defaults``."""
